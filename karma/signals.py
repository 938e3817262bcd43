"""What karma tells the apps built on it, without importing them."""

from django.dispatch import Signal

# Sent with `event` (the KarmaEvent just recorded) and `before` (the score it
# moved from), inside the transaction that recorded it: notify listens, to
# tell the owner when the score crosses a level boundary.
score_changed = Signal()
