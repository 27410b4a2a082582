"""The clamav-daemon drop-in and the ticket-worker examples parse cleanly in systemd-analyze
(unknown keys or bad values would be reported and silently ignored by systemd)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SYSTEMD = Path(__file__).resolve().parents[3] / "systemd"


def verify(units: Path, *names: str) -> str:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}
    out = subprocess.run(["systemd-analyze", "verify", *(str(units / n) for n in names)],
                         capture_output=True, text=True, env=env, timeout=60)
    return (out.stdout + out.stderr).strip()


def test_units_verify(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing (Debian package systemd)"
    (tmp_path / "clamav-daemon.service").write_text(
        "[Service]\nExecStart=/usr/sbin/clamd --foreground=true\n"
    )
    shutil.copytree(SYSTEMD / "clamav-daemon.service.d", tmp_path / "clamav-daemon.service.d")
    shutil.copy(SYSTEMD / "examples" / "ticket-workers.slice", tmp_path)
    (tmp_path / "ticket.service").write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / "ticket.service.d").mkdir()
    shutil.copy(SYSTEMD / "examples" / "ticket-worker-dropin.conf", tmp_path / "ticket.service.d")
    assert verify(tmp_path, "clamav-daemon.service", "ticket.service", "ticket-workers.slice") == ""
    drop_in = (SYSTEMD / "clamav-daemon.service.d" / "queueguard.conf").read_text()
    for key in ("OOMScoreAdjust=-", "Restart=on-failure", "MemoryLow="):
        assert key in drop_in
    (tmp_path / "ticket.service.d" / "bad.conf").write_text("[Service]\nMemoryMaxx=1G\n")
    assert "Unknown key" in verify(tmp_path, "ticket.service")  # the check can fail
