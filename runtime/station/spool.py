"""A sink's on-disk spool: every record waits here, one JSON file each (written atomically), until its sink has
delivered it, so an outage, a restart or a kill -9 never loses a record and delivery stays in order. Bounded in
bytes: past the bound the oldest files are deleted and counted as dropped; a full disk drops the new record (counted),
never stops inspection. What is left when a run ends goes out first on the next run (same folder)."""
from __future__ import annotations

import os
import re
import threading
from collections import deque

from ..atomic import write_bytes_atomic
from ..errors import ClipadError

_FILE = re.compile(r"^(\d{12})\.json$")


class Spool:
    def __init__(self, folder: str, max_bytes: int, memory: int = 256):
        """``memory``: how many of the newest records are also kept in memory, so a healthy sink never reads back
        what it just wrote."""
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ClipadError(f"--spool-dir {folder}: cannot create ({exc.strerror})") from None
        self.folder, self.max_bytes, self.memory = folder, int(max_bytes), memory
        self.lock = threading.Lock()
        self.order: deque[int] = deque()
        self.sizes: dict[int, int] = {}
        self.cache: dict[int, bytes] = {}
        for name in sorted(os.listdir(folder)):
            match = _FILE.match(name)
            if match:
                seq = int(match.group(1))
                self.order.append(seq)
                self.sizes[seq] = os.path.getsize(os.path.join(folder, name))
        self.carried_over = len(self.order)     # left by a previous run: goes out first
        self.next = (self.order[-1] + 1) if self.order else 1
        self.bytes = sum(self.sizes.values())
        self.dropped = 0
        self.last_error: str | None = None

    def _path(self, seq: int) -> str:
        return os.path.join(self.folder, f"{seq:012d}.json")

    def push(self, data: bytes) -> None:
        """Append one record; drops (and counts) the oldest past the bound, or this one when the disk is full."""
        with self.lock:
            seq, self.next = self.next, self.next + 1
            try:
                write_bytes_atomic(self._path(seq), data)
            except ClipadError as exc:
                self.dropped += 1
                self.last_error = str(exc)
                return
            self.order.append(seq)
            self.sizes[seq] = len(data)
            self.bytes += len(data)
            if len(self.cache) < self.memory:
                self.cache[seq] = data
            while self.bytes > self.max_bytes and len(self.order) > 1:
                self._remove(self.order[0])
                self.dropped += 1

    def oldest(self) -> tuple[int, bytes] | None:
        with self.lock:
            while self.order:
                seq = self.order[0]
                data = self.cache.get(seq)
                if data is None:
                    try:
                        with open(self._path(seq), "rb") as fh:
                            data = fh.read()
                    except OSError:   # removed from outside: skip it, counted
                        self._remove(seq)
                        self.dropped += 1
                        continue
                return seq, data
            return None

    def done(self, seq: int) -> None:
        with self.lock:
            if self.order and self.order[0] == seq:
                self._remove(seq)

    def _remove(self, seq: int) -> None:
        self.order.popleft() if self.order and self.order[0] == seq else self.order.remove(seq)
        self.bytes -= self.sizes.pop(seq, 0)
        self.cache.pop(seq, None)
        try:
            os.remove(self._path(seq))
        except FileNotFoundError:
            pass

    def __len__(self) -> int:
        return len(self.order)

    def in_memory(self) -> int:
        return len(self.cache)
