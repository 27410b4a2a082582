"""`queueguard replay` from the built wheel, in a fresh venv outside the checkout.

The wheel is built from a copy of what the Dockerfile copies (pyproject.toml,
README.md, queueguard/), without build isolation, so no package index is
needed. The fresh venv gets the wheel alone; its dependencies come from this
test's venv through a .pth line placed after its own site-packages (the
documented command in docs/replay.md installs them from PyPI instead). Then,
from a directory outside the checkout, every module imports without `tests` or
`bench`, and vrts-spam-wave runs at scale 0.2 with the checkout's unpacked Exim
given by --exim-root: real Exim, clamd, promtool and the wheel's own
`queueguard serve`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.unit.test_packaging import import_everything

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def build_wheel(out: Path) -> Path:
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "queueguard", src / "queueguard", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (out / "dist").glob("queueguard-*.whl")
    return wheel


def fresh_venv(where: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # zz: after the wheel's own files. A directory added by a plain path line gets no .pth processing, so
    # the editable install there (which maps queueguard to the checkout) stays inactive.
    (Path(site) / "zz-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_replay_from_an_installed_wheel_outside_the_checkout(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"queueguard/shipped/exim/proxy-deployment.conf", "queueguard/shipped/exim/readsocket-acl.conf",
            "queueguard/shipped/prometheus/queueguard-alerts.yml", "queueguard/shipped/policies/default.yaml",
            "queueguard/replay/scenarios/vrts_spam_wave.py", "queueguard/harness/guard.py"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench", "contrib", "policies")]

    venv = tmp_path / "venv"
    python = fresh_venv(venv, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    got = import_everything(str(python), outside)
    assert got["attempts"] == [] and got["loaded"] == []
    assert all(Path(f).is_relative_to(venv) for f in got["files"])  # the wheel's files, not the checkout's

    summary = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QUEUEGUARD_EXIM_ROOT")}
    run = subprocess.run([str(venv / "bin" / "queueguard"), "replay", "vrts-spam-wave", "--scale", "0.2",
                          "--exim-root", str(REPO / ".deps" / "exim" / "root"), "--json", str(summary)],
                         cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vrts-spam-wave" in run.stdout and ": PASS" in run.stdout
    doc = json.loads(summary.read_text())
    acc = doc["accounting"]
    assert doc["ok"] and doc["lost"] == 0
    placed = acc["delivered"] + acc["quarantined"] + sum(acc["rejected"].values()) + acc["queued_at_sender"]
    assert acc["sent"] == placed
    assert acc["quarantined"] > 0 and acc["rejected"].get("scan:clamav", 0) > 0
    assert doc["figures"]["measured"]["protected"]["clamd_restarts"] == 0  # the control arm's clamd is meant to die


def test_replay_without_an_exim_says_how_to_get_one(tmp_path: Path) -> None:
    """An Exim root without usr/sbin/exim4: the replay stops before starting anything and names the fixes."""
    run = subprocess.run([sys.executable, "-m", "queueguard.cli", "replay", "mx-stopped", "--scale", "0.1",
                          "--exim-root", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"Exim root {tmp_path.resolve()}" in run.stderr and "no usr/sbin/exim4 under it" in run.stderr
    assert "--exim-root" in run.stderr and ".deps/exim/root" in run.stderr
