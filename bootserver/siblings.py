"""What the other processes of this server (worker processes, workers.py) keep in memory only: the store's write
counters and the BMC power states each saw. Each process publishes its own to a file in data_dir/run every
PUBLISH_SECONDS; /metrics and the pages of any process read the others' beside their own.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

PUBLISH_SECONDS = 1.0  # how stale another process's figures may be in /metrics and the pages
FIGURES_GLOB = "process-*.json"


class Siblings:
    """The figures that the other processes of this server keep in memory, read from the files they publish; and
    this process's own, published. Without a directory (one process), there are no others and nothing is written."""

    def __init__(self, run_dir: Path | None = None, index: int = 0) -> None:
        self._dir = run_dir
        self.index = index  # 0: the owner; workers 1..N-1
        self._published: str | None = None
        self._read: dict[str, tuple[int, dict[str, Any]]] = {}  # file name -> (its mtime_ns, its figures)

    @classmethod
    def owner(cls, run_dir: Path) -> Siblings:
        """The owner's, with the files of an earlier run removed (it may have had more workers)."""
        run_dir.mkdir(mode=0o700, exist_ok=True)
        for stale in run_dir.glob(FIGURES_GLOB):
            stale.unlink(missing_ok=True)
        return cls(run_dir, 0)

    def publish(self, figures: dict[str, Any]) -> None:
        """Write this process's figures for the others (only when they changed)."""
        if self._dir is None:
            return
        text = json.dumps({"pid": os.getpid(), **figures}, sort_keys=True)
        if text == self._published:
            return
        path = self._dir / f"process-{self.index}.json"
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(text)
        os.replace(temporary, path)  # a reader sees the old file or the new one, never half of one
        self._published = text

    def others(self) -> list[dict[str, Any]]:
        """The figures each other process published last."""
        if self._dir is None:
            return []
        own, found = f"process-{self.index}.json", []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._dir):
                if entry.name == own or not entry.name.startswith("process-") or not entry.name.endswith(".json"):
                    continue
                figures = self._figures(entry)
                if figures is not None:
                    found.append(figures)
        return found

    def _figures(self, entry: os.DirEntry[str]) -> dict[str, Any] | None:
        try:
            stamp = entry.stat().st_mtime_ns
            cached = self._read.get(entry.name)
            if cached is None or cached[0] != stamp:
                cached = self._read[entry.name] = (stamp, json.loads(Path(entry.path).read_text()))
        except (OSError, ValueError):  # replaced or removed meanwhile: the next read finds the new one
            return None
        return cached[1]
