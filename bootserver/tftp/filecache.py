"""Whole files in memory for TFTP transfers: a block is then a slice of bytes, not a pread system call.

In lock-step every block is one ACK in and one DATA out; reading the block from the file was a quarter of
the server's CPU per block (the profile in benchmarks/results/2026-12-06-full-cdae6b5.md). The files TFTP
carries in a boot are small (iPXE binaries, 72 KiB-1 MiB) and asked for by every machine of a rack, so
each is read once and shared by every transfer of it.

A cached copy is keyed by the file's identity (device, inode, size, modification time): a file replaced or
rewritten in place is read again, and a transfer already running keeps the copy it started with, so the
size it announced (tsize) and the blocks it sends always agree. Files over `max_file` bytes are not cached
(they are read block by block), and the cache holds at most `max_bytes`, the least recently used going
first.
"""

from __future__ import annotations

import os
from collections import OrderedDict

MAX_FILE = 32 << 20
MAX_BYTES = 128 << 20

Identity = tuple[int, int, int, int]


class FileCache:
    def __init__(self, max_bytes: int = MAX_BYTES, max_file: int = MAX_FILE) -> None:
        self.max_bytes = max_bytes
        self.max_file = max_file
        self._files: OrderedDict[Identity, bytes] = OrderedDict()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def contents(self, fd: int) -> bytes | None:
        """The whole contents of the open file `fd`, from the cache or read now; None when it is too big to
        cache (the caller reads it block by block). OSError if the file shrinks while it is read."""
        st = os.fstat(fd)
        if st.st_size > self.max_file:
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        data = self._files.get(key)
        if data is not None:
            self._files.move_to_end(key)
            return data
        # Blocking: a file of at most max_file bytes, once per version of it (the page cache has it
        # after the first boot).
        data = _read_all(fd, st.st_size)
        self._files[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._files) > 1:
            _, old = self._files.popitem(last=False)
            self._bytes -= len(old)
        return data


def _read_all(fd: int, size: int) -> bytes:
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            raise OSError(f"file shrank while it was read (short read at offset {offset} of {size})")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
