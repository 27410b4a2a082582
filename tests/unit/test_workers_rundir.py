"""Where the workers' run directory lives, that a crashed supervisor's leftovers do not pile up, and
the supervisor's count of restarts in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueguard.metrics import WorkerRestarts
from queueguard.workers import count_restart, read_restarts, restarts_file, run_directory


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


@pytest.mark.parametrize("garbled", ["", "[]", "null", '{"exited": "x"}', '{"exited": 1e400}', "[" * 100_000,
                                     '{"exited": ' + "9" * 400 + "}"])
def test_a_garbled_restarts_file_is_counted_anew_and_never_breaks_metrics(tmp_path: Path, garbled: str) -> None:
    """The supervisor's count of restarts: whatever is in the file, the next restart writes a
    good one, and /metrics reports what it can (0) rather than failing."""
    (tmp_path / "metrics").mkdir()
    path = restarts_file(tmp_path)
    path.write_text(garbled)
    family = next(iter(WorkerRestarts(path).collect()))
    assert [s.value for s in family.samples] == [0.0, 0.0]
    count_restart(tmp_path, "hung")
    count_restart(tmp_path, "hung")
    assert read_restarts(path) == {"hung": 2}
    family = next(iter(WorkerRestarts(path).collect()))
    assert {s.labels["reason"]: s.value for s in family.samples} == {"exited": 0.0, "hung": 2.0}
