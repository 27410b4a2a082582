"""Real processes with a chosen name, for code that reads /proc/<pid>/comm."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def process_named(directory: Path, name: bytes) -> Iterator[int]:
    """A running `sleep` whose comm is `name` (its program file's name, any bytes); its pid."""
    prog = os.fsencode(directory) + b"/" + name
    shutil.copy("/bin/sleep", prog)
    child = subprocess.Popen([prog, "30"])
    try:
        comm = Path("/proc") / str(child.pid) / "comm"
        deadline = time.monotonic() + 5  # the kernel renames the child a moment after exec returns
        while comm.read_bytes() != name + b"\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert comm.read_bytes() == name + b"\n"
        yield child.pid
    finally:
        child.kill()
        child.wait()
