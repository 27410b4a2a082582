"""`queueguard serve` refuses to start, with one clear line and exit 2, on what it could not run
with: a port in use, a quarantine it cannot write, a broken policy. It never announces "ready"
and then fails on the first message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from queueguard.harness.ports import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    policies = cwd / "policies"
    policies.mkdir(exist_ok=True)
    if not any(policies.iterdir()):
        (policies / "p.yaml").write_text("lists: {}\n")
    argv = [sys.executable, "-m", "queueguard.cli", "serve", "--policies", str(policies),
            "--metrics", f"127.0.0.1:{free_port()}", "--downstream", f"127.0.0.1:{free_port()}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd, env=env)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = serve("--listen", f"127.0.0.1:{port}", "--quarantine", str(tmp_path / "q"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("queueguard: cannot listen: ")
    assert "Traceback" not in r.stderr and "queueguard ready" not in r.stderr


def test_quarantine_not_writable(tmp_path: Path) -> None:
    r = serve("--listen", f"127.0.0.1:{free_port()}", "--quarantine", "/proc/queueguard-quarantine", cwd=tmp_path)
    assert r.returncode == 2
    assert "quarantine directory /proc/queueguard-quarantine is not writable" in r.stderr
    assert "Traceback" not in r.stderr


def test_broken_policy(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text("ratelimits:\n  - name: x\n    key: recipient\n    rate: 60/10x\n")
    r = serve("--listen", f"127.0.0.1:{free_port()}", "--quarantine", str(tmp_path / "q"), cwd=tmp_path)
    assert r.returncode == 2
    assert "p.yaml:4: ratelimits[0].rate: bad rate '60/10x'" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_listen_address_is_a_settings_error(tmp_path: Path) -> None:
    r = serve("--listen", "nonsense", "--quarantine", str(tmp_path / "q"), cwd=tmp_path)
    assert r.returncode == 2
    assert "smtp.listen: " in r.stderr and "give an IP address and port" in r.stderr


@pytest.mark.parametrize("metrics", ["0.0.0.0", "[::]"])
def test_status_page_off_loopback_without_credentials(tmp_path: Path, metrics: str) -> None:
    """Refused before anything listens (so this test binds nothing beyond loopback)."""
    smtp_port = free_port()
    r = serve("--listen", f"127.0.0.1:{smtp_port}", "--quarantine", str(tmp_path / "q"),
              "--metrics", f"{metrics}:{free_port()}", cwd=tmp_path)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"queueguard: metrics: {metrics}:") and "is not a loopback address" in line
    assert line.endswith("set status.password_hash (queueguard passwd) or status.token_file")
    assert "queueguard ready" not in r.stderr
    with socket.create_server(("127.0.0.1", smtp_port)):  # it never took its SMTP port either
        pass


def test_missing_status_token_file(tmp_path: Path) -> None:
    settings = tmp_path / "queueguard.yaml"
    settings.write_text(f"status:\n  token_file: {tmp_path / 'no-token'}\n")
    r = serve("--settings", str(settings), "--listen", f"127.0.0.1:{free_port()}",
              "--quarantine", str(tmp_path / "q"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"queueguard: status.token_file: {tmp_path / 'no-token'}: No such file or directory"
