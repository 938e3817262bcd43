from django import forms

from islands.models import Island


class RenameIslandForm(forms.ModelForm[Island]):
    class Meta:
        model = Island
        fields = ["name"]
        error_messages = {
            "name": {
                "required": "Give the Island a name.",
                "max_length": "Keep the name to %(limit_value)d characters (it has %(show_value)d).",
            }
        }
