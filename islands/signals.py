"""What islands tells the apps built on it, without importing them.

Imports point down (docs/architecture.md): islands is the ground floor and
knows nothing of karma. When an attempt at a job ends, islands sends
`job_finished`; karma's AppConfig.ready() connects the karma rule for jobs.
"""

from django.dispatch import Signal

# Sent with `attempt_pk` (the Attempt's primary key) and `now`, inside the
# transaction that ended an attempt at a job (a final state, a timeout, a
# cancel), exactly once per attempt: a receiver's writes commit or roll back
# with that change, and an exception it raises undoes it.
job_finished = Signal()

# Sent with `change` (the StatusChange just created, a silence) and `now`,
# inside the watcher's transaction that recorded an Island going silent
# (Island.objects.record_silences), once per silence. The heartbeat path
# sends nothing: a silence a late heartbeat records is over already.
island_silent = Signal()

# Sent with `island` (just linked to its owner), `address` (where the Island
# asked from, when known, else None) and `now`, inside the transaction that
# linked it (Island.objects.link: a pairing code, a phone, an Island key's
# first registration; a removed Island paired again to its owner, too).
island_linked = Signal()
