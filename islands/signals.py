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
