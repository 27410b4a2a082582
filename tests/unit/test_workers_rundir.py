"""Where the workers' run directory lives, and that a crashed supervisor's leftovers do not pile up."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueguard.workers import run_directory


def test_under_systemd_one_directory_emptied_at_each_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/run is memory and RuntimeDirectoryPreserve keeps it: a supervisor killed with -9 left its
    directory (megabytes of counts and metrics files) behind; the next start takes it over."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path}:/elsewhere")
    first = run_directory()
    (first / "connections").write_bytes(b"\0" * 4096)
    second = run_directory()
    assert first == second == tmp_path / "workers" and list(second.iterdir()) == []
    assert second.stat().st_mode & 0o777 == 0o700


def test_without_systemd_a_new_private_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    a, b = run_directory(), run_directory()
    try:
        assert a != b and a.name.startswith("queueguard-workers-")
    finally:
        a.rmdir()
        b.rmdir()
