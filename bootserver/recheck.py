"""File-system checks that every boot script would repeat (is the kernel there, was a template edited), asked at
most once a second: a stat per check was a tenth of a script's cost. A change shows within that second."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

RECHECK_SECONDS = 1.0


def at_most_every(seconds: float, check: Callable[[], bool],
                  clock: Callable[[], float] = time.monotonic) -> Callable[[], bool]:
    """`check`, called again only once `seconds` have passed since its last call; in between, its last answer."""
    last = {"at": clock(), "answer": check()}

    def recheck() -> bool:
        now = clock()
        if now - last["at"] >= seconds:
            last["at"], last["answer"] = now, check()
        return last["answer"]

    return recheck


class FilePresence:
    """Whether paths are regular files, each asked of the file system at most every `seconds`."""

    def __init__(self, seconds: float = RECHECK_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds, self._clock = seconds, clock
        self._checks: dict[str, Callable[[], bool]] = {}

    def is_file(self, path: str | os.PathLike[str]) -> bool:
        key = os.fspath(path)
        check = self._checks.get(key)
        if check is None:
            check = self._checks[key] = at_most_every(self._seconds, lambda: os.path.isfile(key), self._clock)
        return check()
