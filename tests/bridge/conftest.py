"""The bridge's tests pair Islands as tests/islands does."""

from tests.islands.conftest import island

__all__ = ["island"]
