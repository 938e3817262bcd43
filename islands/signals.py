"""What islands tells the apps built on it, without importing them.

Imports point down (docs/architecture.md): islands is the ground floor and
knows nothing of karma. When a job reaches its terminal state, islands sends
`job_finished`; karma's AppConfig.ready() connects the karma rule for jobs.
"""

from django.dispatch import Signal

# Sent with `job_pk` (the Job's primary key) and `now`, inside the
# transaction that gave the job its terminal state, exactly once per job:
# a receiver's writes commit or roll back with that state, and an exception
# it raises undoes the whole change.
job_finished = Signal()
