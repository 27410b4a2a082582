"""Open-connection counts shared by the worker processes of one host, in one mapped file.

With `workers: N` the kernel spreads one client's connections over every worker, so limits
counted per process (connlimits.py) let a client hold N times `max_per_ip` open. Here every
worker maps the same file, written by the supervisor before any worker starts: one row per
worker, and each worker writes only its own row (no locks; a 32-bit aligned store is atomic),
while a count is the sum over all rows. A worker that dies takes its connections with it, and
the supervisor zeroes its row when it reaps it (and its successor again before it accepts
anything), so nothing leaks.

Keys are not stored: each row is a count-min sketch, DEPTH arrays of WIDTH counters, a key
counted in one counter per array, read as the smallest sum. Collisions can only add (a client
looks busier, never idler), and reaching a limit by collision needs other clients' connections
in the same counter of every array at once, under a hash keyed with a per-host random salt that
senders cannot aim at. 2 x 65,536 counters x 4 bytes: 512 KiB per worker.

The connection rate per client (`rate_per_ip`) is shared the same way: after the rows, one table
of GCRA times (TATs) that every worker reads and writes under an flock of the file, so a client
gets one rate on the host, not one per worker. A key's TAT is the smallest over its DEPTH slots
and an update raises each slot to at least the new TAT: collisions can only make a client look
busier, never idler. 2 x 65,536 doubles: 1 MiB per host.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path

DEPTH = 2
WIDTH = 1 << 16
SALT = 16
ROW = DEPTH * WIDTH * 4
TATS = DEPTH * WIDTH * 8


class HostCounts:
    """This worker's view of the host's counts: `add` to its own row, `get` over all rows."""

    def __init__(self, path: Path, index: int) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(self._fd, 0)
        except BaseException:
            os.close(self._fd)
            raise
        self._salt = bytes(self._map[:SALT])
        self._rows = (len(self._map) - SALT - TATS) // ROW
        if not 0 <= index < self._rows:
            self._map.close()
            os.close(self._fd)
            raise ValueError(f"worker {index} has no row in {path} ({self._rows} rows)")
        self._counts = memoryview(self._map)[SALT:SALT + self._rows * ROW].cast("i")
        self._tats = memoryview(self._map)[SALT + self._rows * ROW:].cast("d")
        self._own = index * DEPTH * WIDTH
        self._counts[self._own:self._own + DEPTH * WIDTH] = memoryview(bytes(ROW)).cast("i")

    @staticmethod
    def create(path: Path, workers: int) -> Path:
        """The zeroed file for `workers` rows, with a fresh salt (by the supervisor, before any worker)."""
        with open(path, "wb") as f:
            f.write(secrets.token_bytes(SALT))
            f.truncate(SALT + workers * ROW + TATS)
        return path

    @staticmethod
    def clear(path: Path, index: int) -> None:
        """Zero a dead worker's row (by the supervisor, which reaped it: nobody writes it now);
        its successor zeroes it again before it accepts anything."""
        with open(path, "r+b") as f:
            f.seek(SALT + index * ROW)
            f.write(bytes(ROW))

    def _slots(self, key: str) -> tuple[int, ...]:
        digest = hashlib.blake2b(key.encode(), digest_size=4 * DEPTH, key=self._salt).digest()
        return tuple(d * WIDTH + int.from_bytes(digest[4 * d:4 * d + 4], "little") % WIDTH for d in range(DEPTH))

    def add(self, key: str, delta: int) -> None:
        for slot in self._slots(key):
            self._counts[self._own + slot] += delta

    def get(self, key: str) -> int:
        step = DEPTH * WIDTH
        return min(sum(self._counts[row * step + slot] for row in range(self._rows)) for slot in self._slots(key))

    def take(self, key: str, step: Callable[[float | None], float | None]) -> bool:
        """One event for `key` if `step` allows it, for the whole host: `step` gets the key's
        time (None: never seen) and returns its new one, or None to refuse; read, decided and
        written under the file's lock, so two workers cannot both take the last place."""
        slots = self._slots(key)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            new = step(min(self._tats[slot] for slot in slots) or None)
            if new is None:
                return False
            for slot in slots:
                self._tats[slot] = max(self._tats[slot], new)
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._counts.release()
        self._tats.release()
        self._map.close()
        os.close(self._fd)
