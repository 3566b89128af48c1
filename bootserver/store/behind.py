"""Records written behind (Store.record_behind): kept in memory for at most WRITE_BEHIND_SECONDS, then written
together in one transaction. What a reader must see of them meanwhile (the tokens they carry) is answered from here.
No SQL: the store writes them (Store.flush_behind)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .records import Token

WRITE_BEHIND_SECONDS = 0.1  # the longest a record waits in memory (the bound: flushed at least this often)
WRITE_BEHIND_LIMIT = 2000  # records held at most: the next one waits for a synchronous write (never dropped)


@dataclass(frozen=True)
class Behind:
    """One record() call to be written: its arguments and the time it was made (the event's time)."""

    mac: str
    time: float
    kind: str
    detail: dict[str, Any]
    state: str | None = None
    facts: dict[str, str] | None = None
    token: Token | None = None
    only_from: frozenset[str] | None = None


@dataclass
class Pending:
    """The records not yet written, in order: those queued, and those being written (`flying`, taken by a write
    not yet committed), with the tokens among them all by id and each machine's newest."""

    records: list[Behind] = field(default_factory=list)
    flying: list[Behind] = field(default_factory=list)
    _tokens: dict[str, Token] = field(default_factory=dict)
    _newest: dict[str, Token] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records) + len(self.flying)

    def add(self, record: Behind) -> None:
        self.records.append(record)
        if record.token is not None:
            self._index(record.token)

    def take(self) -> list[Behind]:
        """Every queued record, for a write; they fly (still found here) until it lands or fails."""
        assert not self.flying, "one write at a time"
        self.flying, self.records = self.records, []
        return self.flying

    def landed(self) -> None:
        """The write of the flying records committed: only the queued ones are left here."""
        self.flying = []
        self._tokens.clear()
        self._newest.clear()
        for record in self.records:
            if record.token is not None:
                self._index(record.token)

    def failed(self) -> None:
        """The write of the flying records failed: first in the queue again, before any queued since."""
        self.records, self.flying = [*self.flying, *self.records], []

    def token(self, token_id: str) -> Token | None:
        """A queued token by id, spent (retired) when a newer one of its machine is queued too."""
        token = self._tokens.get(token_id)
        return None if token is None else self.retired(token)

    def newest(self, mac: str) -> Token | None:
        return self._newest.get(mac)

    def retired(self, token: Token) -> Token:
        """`token` as it is once the queue is written: retired by a newer boot token of its machine queued here."""
        newest = self._newest.get(token.mac)
        if token.used is None and newest is not None and newest.id != token.id and newest.issued >= token.issued:
            return dataclasses.replace(token, used=newest.issued)
        return token

    def _index(self, token: Token) -> None:
        self._tokens[token.id] = token
        newest = self._newest.get(token.mac)
        if newest is None or token.issued >= newest.issued:
            self._newest[token.mac] = token
