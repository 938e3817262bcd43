"""The project's settings with no middleware at all and a one-view URLconf: Django's floor.

Served by bench/bare_asgi.py on a daphne of its own, next to the real
application, so `bench.heartbeats` can put the API's answers beside what
Django on daphne does with nothing in the way.
"""

from archipelag.settings import *  # noqa: F403

MIDDLEWARE = list[str]()
ROOT_URLCONF = "bench.bare_asgi"
