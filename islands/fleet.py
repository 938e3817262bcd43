"""How "Your Islands" lists a fleet: search, status filter, sort, cards or table.

All of it comes from the query string, so every view of the list is a link
that works without JavaScript (and the Refresh button and the live updates
re-render the same view). Everything but the status order is done in SQL;
the status is derived from the clock (Island.status_at), so it is sorted in
Python over the rows already loaded: the page costs the same queries for 1
Island or 500.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from django.db.models import F, OrderBy, Q

from islands.models import Island, IslandQuerySet

# More Islands than this, and the list is a compact table unless asked otherwise.
CARDS_UP_TO = 6
SEARCH_MAX_LENGTH = 100
# What "Sort by" offers, each with the order its first click gives.
SORTS = {
    "status": "Status",
    "name": "Name",
    "karma": "Karma",
    "earnings": "Earnings",
    "heartbeat": "Last heartbeat",
}
# Descending first: the most karma, the most earnings, the latest heartbeat.
DESCENDING_FIRST = {"karma", "earnings", "heartbeat"}
# Sorted by status, the ones needing attention come first.
STATUS_ORDER = {
    Island.LiveStatus.OFFLINE: 0,
    Island.LiveStatus.NEW: 1,
    Island.LiveStatus.SUSPENDED: 2,
    Island.LiveStatus.SIGNED_OFF: 3,
    Island.LiveStatus.ONLINE: 4,
}
# What the status filter offers, in the order shown.
FILTERABLE = [
    Island.LiveStatus.ONLINE,
    Island.LiveStatus.OFFLINE,
    Island.LiveStatus.SIGNED_OFF,
    Island.LiveStatus.NEW,
    Island.LiveStatus.SUSPENDED,
]


@dataclass(frozen=True, slots=True)
class FleetView:
    search: str = ""
    status: str = ""
    sort: str = "status"
    descending: bool = False
    layout: str = ""  # "cards", "table", or "" for "by the number of Islands"

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> "FleetView":
        """The view a query string asks for; anything unknown falls back to the default."""
        sort = params.get("sort", "status")
        if sort not in SORTS:
            sort = "status"
        order = params.get("order", "")
        descending = order == "desc" if order in ("asc", "desc") else sort in DESCENDING_FIRST
        status = params.get("status", "")
        layout = params.get("view", "")
        return cls(
            search=" ".join(params.get("q", "").split())[:SEARCH_MAX_LENGTH],
            status=status if status in Island.LiveStatus.values else "",
            sort=sort,
            descending=descending,
            layout=layout if layout in ("cards", "table") else "",
        )

    @property
    def filtered(self) -> bool:
        return bool(self.search or self.status)

    def order_for(self, sort: str) -> str:
        """The `order` a click on `sort`'s column header asks for: the other way if already sorted by it."""
        if sort == self.sort:
            return "asc" if self.descending else "desc"
        return "desc" if sort in DESCENDING_FIRST else "asc"

    def headers(self) -> list[tuple[str, str, str, str]]:
        """Each sortable column: its key, label, the order a click asks for, and its aria-sort."""
        return [
            (
                key,
                label,
                self.order_for(key),
                ("descending" if self.descending else "ascending") if key == self.sort else "none",
            )
            for key, label in SORTS.items()
        ]

    def islands(self, owned: IslandQuerySet, now: datetime) -> list[Island]:
        """The Islands this view shows, in its order: one query."""
        islands = owned
        if self.status:
            islands = islands.shown_as(Island.LiveStatus(self.status), now)
        if self.search:
            islands = islands.filter(Q(name__icontains=self.search) | Q(host_id__icontains=self.search))
        rows = list(islands.order_by(*self._order_by()))
        if self.sort == "status":
            rows.sort(key=lambda island: STATUS_ORDER.get(island.status_at(now), 9), reverse=self.descending)
        return rows

    def _order_by(self) -> list[OrderBy | str]:
        column = {"karma": "karma", "earnings": "earnings", "heartbeat": "last_heartbeat_at"}.get(self.sort)
        if column is None:
            # By name (and, within a status, by name: the sort is stable).
            return ["-name", "-pk"] if self.descending and self.sort == "name" else ["name", "pk"]
        field = F(column).desc(nulls_last=True) if self.descending else F(column).asc(nulls_first=True)
        return [field, "name", "pk"]

    def layout_for(self, total: int) -> str:
        if self.layout:
            return self.layout
        return "table" if total > CARDS_UP_TO else "cards"
