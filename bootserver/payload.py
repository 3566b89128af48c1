"""What the core hands to a protocol to send: a file on disk or bytes rendered in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import Forbidden, NotFound


@dataclass(frozen=True)
class Payload:
    """One thing to send. Exactly one of `path` and `data` is set.

    Small rendered things (scripts, overlays) travel as bytes; large files as a path so that
    HTTP can use sendfile and TFTP can read blocks without loading the whole file.
    """

    name: str
    path: Path | None = None
    data: bytes | None = None
    mac: str | None = None  # the machine this payload concerns, for the event log
    client: str | None = None  # the address it was decided for, when that decided it (an installer file)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("Payload needs exactly one of path and data")

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size


def resolve_under(root: Path, relative: str) -> Path:
    """The file `relative` names inside `root`, refusing anything that would leave `root`.

    Refused with Forbidden: absolute paths, backslashes, NUL, `..` components, and symlinks whose
    target lies outside `root`. Missing files raise NotFound.
    """
    if "\0" in relative or "\\" in relative:
        raise Forbidden(f"refused path {relative!r}: backslash or NUL")
    if relative.startswith("/") or any(part == ".." for part in relative.split("/")):
        raise Forbidden(f"refused path {relative!r}: absolute or contains '..'")
    root = root.resolve()
    candidate = root / relative
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise NotFound(f"no file {relative!r}") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permission problems
        raise Forbidden(f"refused path {relative!r}: {exc}") from None
    if real != root and root not in real.parents:
        raise Forbidden(f"refused path {relative!r}: it leads outside {root}")
    if not real.is_file() or not os.access(real, os.R_OK):
        raise NotFound(f"no readable file {relative!r}")
    return real
