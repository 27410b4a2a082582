"""Run miltertest (OpenDKIM's real milter client) Lua scripts against a milter.

Scripts live in tests/integration/milter/; each gets `-D sock=<libmilter spec>`,
`-D dir=<script dir>` (for `dofile(dir .. "/common.lua")`) and any variables
the test passes. A script signals failure with `error(...)`; miltertest then
exits non-zero and `run` raises with its output.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "integration" / "milter"


class MiltertestError(AssertionError):
    """The script failed (its error text and miltertest's output are in the message)."""


def miltertest_bin() -> str:
    exe = shutil.which("miltertest")
    if exe is None:
        raise RuntimeError("miltertest is missing: install the miltertest package (setup.sh does)")
    return exe


def run(script: str, sock: str, variables: Mapping[str, object] | None = None, *, timeout: float = 120.0,
        verbose: int = 0) -> str:
    """Run `script` (a name in tests/integration/milter or a path); return its stdout."""
    path = Path(script) if "/" in script else SCRIPTS / script
    args = [miltertest_bin(), *(["-v"] * verbose), "-s", str(path), "-D", f"sock={sock}",
            "-D", f"dir={path.parent}"]
    for name, value in (variables or {}).items():
        args += ["-D", f"{name}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise MiltertestError(
            f"miltertest {path.name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout
