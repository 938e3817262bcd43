from decimal import Decimal

from django import forms

from karma.models import MAX_ADJUSTMENT, REASON_MAX_LENGTH


class KarmaAdjustmentForm(forms.Form):
    """A manual change of karma: the admin's action and `manage.py adjust_karma` both check it here."""

    delta = forms.DecimalField(
        label="Change",
        max_digits=6,
        decimal_places=2,
        min_value=-MAX_ADJUSTMENT,
        max_value=MAX_ADJUSTMENT,
        help_text="Points to add (negative to take away); karma stays between 0 and 100.",
    )
    reason = forms.CharField(
        max_length=REASON_MAX_LENGTH,
        # Required and stripped: a blank reason is refused.
        help_text="Shown to the Island's owner with the change.",
    )

    def clean_delta(self) -> Decimal:
        delta: Decimal = self.cleaned_data["delta"]
        if delta == 0:
            raise forms.ValidationError("A change of zero changes nothing.")
        return delta
