from django import forms
from django.contrib.auth.forms import PasswordResetForm, UserCreationForm
from django.contrib.auth.models import User

from notify.models import EmailAddress

TAKEN = "Another account uses this address."


class SignupForm(UserCreationForm[User]):
    """Django's signup form with an email address, kept pending until confirmed.

    The address is not a model field here: User.email only ever holds a
    confirmed address (it is what password reset looks up).
    """

    email = forms.EmailField(
        max_length=254,
        help_text="We send a confirmation link; alerts and password resets go here.",
        widget=forms.EmailInput(attrs={"autocomplete": "email"}),
    )
    field_order = ["username", "email", "password1", "password2"]

    def clean_email(self) -> str:
        email: str = self.cleaned_data["email"].strip()
        if EmailAddress.objects.confirmed_elsewhere(email):
            raise forms.ValidationError(TAKEN)
        return email


class EmailForm(forms.Form):
    email = forms.EmailField(max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email"}))

    def __init__(self, *args: object, user: User, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.user = user

    def clean_email(self) -> str:
        email: str = self.cleaned_data["email"].strip()
        if EmailAddress.objects.confirmed_elsewhere(email, self.user):
            raise forms.ValidationError(TAKEN)
        return email


class ResetForm(PasswordResetForm):
    email = forms.EmailField(
        label="Email", max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email"})
    )
