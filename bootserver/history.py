"""What happened to every machine, read-only: for the pages, the API, the live streams, /metrics and the CLI.

The core hands it out (Booter.history()). Whoever holds it can read every machine and event and change none:
writes go through the core's decisions (approve, reprovision, boot_from_disk), which record why.
"""

from __future__ import annotations

from collections.abc import Iterable

from .siblings import Siblings
from .store import Event, Listed, Node, Store


class History:
    def __init__(self, store: Store, siblings: Siblings | None = None) -> None:
        """`siblings`: the server's other processes, whose store figures /metrics adds to this one's."""
        self._store = store
        self._siblings = siblings or Siblings()

    @property
    def location(self) -> str:
        """Where the store is, for messages (a URL's password masked)."""
        return self._store.location

    # -- machines -------------------------------------------------------------------------------------

    def node(self, mac: str) -> Node | None:
        return self._store.node(mac)

    def nodes(self, after: str | None = None, limit: int | None = None, states: Iterable[str] = ()) -> list[Node]:
        """Machines by MAC: those after `after`, at most `limit`, only in `states` when given."""
        return self._store.nodes(after=after, limit=limit, states=states)

    def listing(self, states: Iterable[str] = ()) -> list[Listed]:
        """Every machine (in `states`, when given): MAC, state, IP and last seen only."""
        return self._store.listing(states)

    def nodes_of(self, macs: Iterable[str]) -> list[Node]:
        """These machines (those that exist), in the order given."""
        return self._store.nodes_of(macs)

    def counts(self) -> dict[str, int]:
        """How many machines are in each state."""
        return self._store.state_counts()

    def held_count(self) -> int:
        return self._store.held_count()

    # -- events ---------------------------------------------------------------------------------------

    def events(self, mac: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events of `mac` with id greater than `after`, oldest first."""
        return self._store.events(mac, after, limit)

    def recent_events(self, mac: str, limit: int = 500) -> list[Event]:
        """The newest `limit` events of `mac`, oldest first."""
        return self._store.recent_events(mac, limit)

    def events_after(self, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events of every machine with id greater than `after`, oldest first."""
        return self._store.events_after(after, limit)

    def last_event_id(self, mac: str | None = None) -> int:
        """The newest event's id (of `mac`, or of any machine); 0 when there is none."""
        return self._store.last_event_id(mac)

    # -- the store itself ------------------------------------------------------------------------------

    def store_settings(self) -> dict[str, str]:
        """The backend and the settings its commits' durability rests on, read from the live connection."""
        return {"backend": self._store.kind, **self._store.durability()}

    def group_commits(self) -> tuple[int, int, int]:
        """Since the server's processes opened the store: batches committed, the requests they held, the most one
        held."""
        figures = self.store_figures()
        return figures["group_commits"], figures["group_committed_requests"], figures["largest_group_commit"]

    def written_behind(self) -> tuple[int, int, int, int, int]:
        """Since the server's processes opened the store: write-behind flushes, the records they wrote, the most one
        wrote, records that waited for a synchronous write (the queue was full), and records queued now."""
        figures = self.store_figures()
        return (figures["behind_flushes"], figures["written_behind"], figures["largest_behind"],
                figures["behind_waits"], figures["queued_behind"])

    def store_figures(self) -> dict[str, int]:
        """Store.figures() of this process and the others of the server (as they published them last): totals
        summed, the largest_* the largest."""
        total = self._store.figures()
        for other in self._siblings.others():
            for name, value in other.get("store", {}).items():
                if name in total and isinstance(value, int):
                    total[name] = max(total[name], value) if name.startswith("largest_") else total[name] + value
        return total

    # -- totals over every event, kept as they are recorded ------------------------------------------

    def bytes_served(self) -> dict[str, int]:
        return self._store.bytes_served()

    def step_durations(self) -> dict[str, tuple[int, float]]:
        return self._store.step_durations()

    def claim_conflicts(self) -> int:
        return self._store.claim_conflicts()
