"""Runner and process matching on real /proc entries, and statvfs figures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from queueguard.queuewatch.system import (
    Proc,
    count_processes,
    count_runners,
    fs_usage,
    list_processes,
    mailman_runner_name,
    process_matches,
)
from tests.components.processes import process_named


@pytest.mark.parametrize(
    ("argv", "runner"),
    [
        (("/usr/bin/python3", "/usr/lib/mailman3/bin/runner", "-C", "/etc/mailman3/mailman.cfg",
          "--runner=out:0:1"), "out"),
        (("/opt/mailman/venv/bin/runner", "--runner", "in"), "in"),
        (("python3", "/x/bin/runner", "-r", "virgin:1:2"), "virgin"),
        (("python3", "/x/bin/runner", "-rbounces"), "bounces"),
        (("rsync", "-r", "out"), None),  # -r out, but not Mailman's runner
        (("/usr/bin/python3", "/usr/lib/mailman3/bin/master"), None),
    ],
)
def test_mailman_runner_name(argv: tuple[str, ...], runner: str | None) -> None:
    assert mailman_runner_name(Proc(1, "python3", argv)) == runner


def test_process_matches_comm_program_or_script() -> None:
    clamd = Proc(1, "clamd", ("/usr/sbin/clamd", "--foreground"))
    script = Proc(2, "python3", ("/usr/bin/python3", "/usr/bin/mailman-web"))
    long_name = Proc(3, "exim4-daemon-he", ("/usr/sbin/exim4-daemon-heavy", "-bd"))
    assert process_matches("clamd", clamd)
    assert process_matches("mailman-web", script)
    assert process_matches("exim4-daemon-heavy", long_name)
    assert not process_matches("clam", clamd)
    assert count_processes(["clamd", "redis-server"], [clamd, script]) == {"clamd": 1, "redis-server": 0}


@pytest.fixture
def fake_runner(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real process whose command line looks like a Mailman runner's."""
    script = tmp_path / "bin" / "runner"
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script), "-C", "x.cfg", "--runner=out:0:1"])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while b"--runner" not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)  # readiness: the child has not exec'd yet
    yield proc
    proc.kill()
    proc.wait()


def test_list_processes_sees_a_real_runner(fake_runner: subprocess.Popen[bytes]) -> None:
    procs = list_processes()
    assert any(p.pid == os.getpid() for p in procs)
    assert count_runners(procs).get("out", 0) >= 1
    mine = [p for p in procs if p.pid == fake_runner.pid]
    assert mine and mailman_runner_name(mine[0]) == "out"


def test_fs_usage_matches_statvfs(tmp_path: Path) -> None:
    u = fs_usage(tmp_path)
    st = os.statvfs(tmp_path)
    assert u.size_bytes == st.f_blocks * st.f_frsize > 0
    assert 0 <= u.free_bytes <= u.size_bytes
    assert 0 <= u.free_inodes <= u.inodes or u.inodes == 0
    with pytest.raises(FileNotFoundError):
        fs_usage(tmp_path / "missing")


def test_process_name_that_is_not_utf8(tmp_path: Path) -> None:
    """A real process named b'sl\\xff' (its program file's name) made list_processes raise
    UnicodeDecodeError, which is no OSError: every queue watch round failed."""
    with process_named(tmp_path, b"sl\xff") as pid:
        procs = {p.pid: p for p in list_processes()}
        assert procs[pid].comm == "sl\N{REPLACEMENT CHARACTER}"
