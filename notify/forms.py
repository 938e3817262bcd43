from typing import Any

from django import forms
from django.contrib.auth.forms import PasswordResetForm, UserCreationForm
from django.contrib.auth.models import User
from django.core.validators import URLValidator

from notify.models import (
    GRACE_MAX_MINUTES,
    WEBHOOK_EVENTS,
    WEBHOOKS_PER_ACCOUNT,
    EmailAddress,
    Preferences,
    WebhookEndpoint,
)
from notify.webhooks import check_url

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


class PreferencesForm(forms.ModelForm["Preferences"]):
    """The switches on /settings/notifications: the grace, a switch per kind, Islands muted."""

    offline_grace_minutes = forms.IntegerField(
        label="Tell me an Island is offline after",
        min_value=0,
        max_value=GRACE_MAX_MINUTES,
        help_text="Minutes of silence, 0 to 60. An Island back within this time causes no message.",
    )
    muted_islands = forms.MultipleChoiceField(
        label="Mute these Islands", required=False, widget=forms.CheckboxSelectMultiple
    )

    class Meta:
        model = Preferences
        fields = ["offline_grace_minutes", "offline", "online", "linked", "karma_level", "muted_islands"]

    def __init__(self, *args: Any, islands: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        muted = self.fields["muted_islands"]
        assert isinstance(muted, forms.MultipleChoiceField)
        muted.choices = islands
        if self.instance.offline_grace_minutes is None:
            self.initial["offline_grace_minutes"] = int(self.instance.offline_grace.total_seconds()) // 60


class WebhookForm(forms.Form):
    url = forms.CharField(
        label="URL",
        max_length=2000,
        widget=forms.URLInput(attrs={"placeholder": "https://example.com/hooks/archipelag"}),
    )
    events = forms.MultipleChoiceField(
        label="Events",
        choices=WEBHOOK_EVENTS,
        widget=forms.CheckboxSelectMultiple,
        initial=[value for value, _ in WEBHOOK_EVENTS],
    )

    def __init__(self, *args: Any, user: User, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_url(self) -> str:
        url: str = self.cleaned_data["url"].strip()
        try:
            URLValidator(schemes=["http", "https"])(url)
        except forms.ValidationError:
            raise forms.ValidationError("Enter a full URL, such as https://example.com/hooks.") from None
        problem = check_url(url)
        if problem:
            raise forms.ValidationError(problem)
        return url

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if WebhookEndpoint.objects.filter(user=self.user).count() >= WEBHOOKS_PER_ACCOUNT:
            raise forms.ValidationError(f"An account has at most {WEBHOOKS_PER_ACCOUNT} webhook endpoints.")
        return cleaned
