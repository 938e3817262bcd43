"""Karma-weighted placement: which Island gets a job.

The dispatcher (or anything else placing work) calls pick_island; the
formula is in karma/rules.py ("Placement") and on /reference/karma.
"""

import random
import uuid
from datetime import datetime

from islands.models import Island
from karma import rules

# Placement is a fair draw, not a secret: a seeded PRNG is right here, and
# tests pass their own seeded Random to check the distribution.
_DRAW = random.Random()  # noqa: S311


def candidates(
    runtime: str,
    *,
    min_vram_mb: int | None = None,
    min_ram_mb: int | None = None,
    min_cpu_cores: int | None = None,
    now: datetime | None = None,
) -> list[tuple[uuid.UUID, float]]:
    """The ids of the Islands able to take a job now, each with its weight in the draw.

    Eligible: online now (not signed off, suspended or removed), able to run
    `runtime`, with at least the hardware asked for, and karma at or above
    the placement floor. Ordered by id, so a seeded draw is reproducible.
    """
    islands = Island.objects.can_run(runtime).online(now).filter(karma__gte=rules.PLACEMENT_FLOOR)
    if min_vram_mb is not None:
        islands = islands.filter(gpu_vram_mb__gte=min_vram_mb)
    if min_ram_mb is not None:
        islands = islands.filter(ram_mb__gte=min_ram_mb)
    if min_cpu_cores is not None:
        islands = islands.filter(cpu_cores__gte=min_cpu_cores)
    # Only ids and scores: the pool may be large, and only the winner is loaded.
    weighted = [
        (pk, rules.placement_weight(karma)) for pk, karma in islands.order_by("id").values_list("id", "karma")
    ]
    return [(pk, weight) for pk, weight in weighted if weight > 0]


def pick_island(
    runtime: str,
    *,
    min_vram_mb: int | None = None,
    min_ram_mb: int | None = None,
    min_cpu_cores: int | None = None,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> Island | None:
    """Draw an Island for a job, with a chance proportional to its placement weight.

    None when no Island is eligible. Two queries: the pool's ids and scores, then the winner.
    """
    pool = candidates(
        runtime, min_vram_mb=min_vram_mb, min_ram_mb=min_ram_mb, min_cpu_cores=min_cpu_cores, now=now
    )
    if not pool:
        return None
    ids, weights = zip(*pool, strict=True)
    winner = (rng or _DRAW).choices(ids, weights=weights)[0]
    return Island.objects.get(pk=winner)
