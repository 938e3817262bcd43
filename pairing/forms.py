from django import forms

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
