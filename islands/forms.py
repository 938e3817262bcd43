from datetime import UTC, datetime, timedelta

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


class MaintenanceForm(forms.Form):
    """The card's "Maintenance… until": a time of day in UTC, the next one to come."""

    until = forms.TimeField(
        label="Until (UTC)",
        widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        error_messages={"required": "Say until when (a time, UTC).", "invalid": "Give a time such as 14:00."},
    )

    def until_at(self, now: datetime) -> datetime:
        """The next moment with this time of day, after now (today or tomorrow), in UTC."""
        moment = datetime.combine(now.astimezone(UTC).date(), self.cleaned_data["until"], tzinfo=UTC)
        return moment if moment > now else moment + timedelta(days=1)
