from django import forms

from islands.models import ISLAND_KEY_BATCH_MAX
from pairing.codes import MalformedCode, normalize_code


class PairCodeForm(forms.Form):
    code = forms.CharField(
        label="Pairing code",
        max_length=64,
        error_messages={"required": "Enter the 6-character code your Island shows."},
        widget=forms.TextInput(
            attrs={
                "class": "code-input",
                "autocapitalize": "characters",
                "autocomplete": "one-time-code",
                "autocorrect": "off",
                "spellcheck": "false",
                "inputmode": "text",
                "maxlength": "32",
                "placeholder": "A3X9K2",
                "data-code-input": "",
                "autofocus": "",
            }
        ),
    )

    def clean_code(self) -> str:
        try:
            return normalize_code(self.cleaned_data["code"])
        except MalformedCode as exc:
            raise forms.ValidationError(str(exc), code="malformed") from None


class IslandKeyForm(forms.Form):
    count = forms.IntegerField(
        label="How many Islands",
        min_value=1,
        max_value=ISLAND_KEY_BATCH_MAX,
        initial=1,
        error_messages={
            "required": "Say how many keys to make.",
            "invalid": "Enter a whole number.",
            "min_value": "Make at least one key.",
            "max_value": f"At most {ISLAND_KEY_BATCH_MAX} keys at a time.",
        },
        widget=forms.NumberInput(
            attrs={"min": "1", "max": str(ISLAND_KEY_BATCH_MAX), "inputmode": "numeric"}
        ),
    )
