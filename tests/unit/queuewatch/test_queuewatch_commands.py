"""`queueguard queue status` on real spool directories: table, JSON, exit codes."""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import pytest

from queueguard.queuewatch.commands import human_age, human_bytes, register, render_table, run_status
from tests.unit.queuewatch.spoolbuild import exim_message, mailman_message


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="queueguard")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_table_and_json_from_flags(tmp_path: Path) -> None:
    now = int(time.time())
    exim = tmp_path / "exim"
    for i in range(3):
        exim_message(exim, now - 7200 * (i + 1), i, split=True)
    mailman_message(tmp_path / "mm", "out", now - 60.0, 1)
    out = io.StringIO()
    assert run_status(parse("queue", "status", "--exim-spool", str(exim), "--mailman-queue",
                            str(tmp_path / "mm")), out) == 0
    table = out.getvalue()
    exim_row = next(line for line in table.splitlines() if line.startswith("exim"))
    assert exim_row.split()[:5] == ["exim", "main", "3", "6.0h", "0"]
    assert "mailman runner out" in table and "MISSING" in table

    out = io.StringIO()
    assert run_status(parse("queue", "status", "--exim-spool", str(exim), "--json"), out) == 0
    snap = json.loads(out.getvalue())
    assert snap["queues"][0]["messages"] == 3


def test_settings_file(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    settings = tmp_path / "qg.yaml"
    settings.write_text(f"queuewatch:\n  exim_spool: {tmp_path}\nquarantine:\n  directory: {tmp_path}/q\n"
                        "downstreams: [{address: '127.0.0.1:9'}]\n")
    out = io.StringIO()
    # the quarantine directory (watched for space and inodes) does not exist: that watcher fails
    assert run_status(parse("queue", "status", "--settings", str(settings), "--json"), out) == 1
    snap = json.loads(out.getvalue())
    assert snap["queues"][0]["messages"] == 0
    assert [w["name"] for w in snap["watchers"] if not w["ok"]] == ["filesystems"]
    assert snap["downstreams"][0]["name"] == "127.0.0.1:9" and snap["downstreams"][0]["up"] is False
    (tmp_path / "q").mkdir()
    assert run_status(parse("queue", "status", "--settings", str(settings)), io.StringIO()) == 0


def test_missing_spool_exits_1_and_says_why(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_status(parse("queue", "status", "--exim-spool", str(tmp_path / "nope")), out) == 1
    assert "watcher exim FAILED: FileNotFoundError" in out.getvalue()


def test_nothing_to_watch_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_status(parse("queue", "status"), io.StringIO()) == 2
    assert "nothing to watch" in capsys.readouterr().err


def test_render_table_with_missing_keys() -> None:
    text = render_table({"queues": [{"mta": "postfix", "queue": "deferred"}], "watchers": "junk"})
    assert text.splitlines()[1].split() == ["postfix", "deferred", "n/a", "n/a", "n/a", "n/a"]
    assert render_table({}).splitlines()[1].strip() == "(none)"


def test_humanize() -> None:
    assert [human_age(v) for v in (5, 600, 36000, 3 * 86400, None)] == ["5s", "10m", "10.0h", "3.0d", "n/a"]
    assert [human_bytes(v) for v in (512, 2048, 5 * 1024**3, "x")] == ["512 B", "2.0 KiB", "5.0 GiB", "n/a"]
