"""Workers' metrics (PROMETHEUS_MULTIPROC_DIR): increments and a gauge's sets are buffered and
flushed, so a scrape answered by one worker sees every worker's values.

Each "worker" here is a real Python process importing queueguard.metrics with the variable set,
as the supervisor starts them; the scrape is this module's exposition() in another process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent("""
    import asyncio, sys
    from queueguard import metrics
    metrics.transactions.labels("smtp").inc(int(sys.argv[1]))
    metrics.added_latency.labels("smtp").observe(0.002)
    metrics.downstream_up.labels("ds").set(1)
    if sys.argv[2] == "flusher":  # the worker's flusher task, stopped as the app stops it
        async def run() -> None:
            task = asyncio.ensure_future(metrics.flusher())
            await asyncio.sleep(3 * metrics.FLUSH_EVERY)
            metrics.transactions.labels("smtp").inc(1000)  # after the last periodic flush
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        asyncio.run(run())
    elif sys.argv[2] == "scrape":  # answers a scrape itself: its own increments are in it
        text = metrics.exposition().decode()
        print(next(l for l in text.splitlines() if l.startswith("queueguard_transactions_total{")))
    # "killed": ends without flushing, as a worker killed with SIGKILL
""")

SCRAPE = textwrap.dedent("""
    from queueguard import metrics
    for line in metrics.exposition().decode().splitlines():
        if line.startswith(("queueguard_transactions_total{", "queueguard_added_latency_seconds_count{",
                            "queueguard_downstream_up{")):
            print(line)
""")


def run(code: str, directory: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_scrape_sees_what_every_worker_flushed(tmp_path: Path) -> None:
    run(WORKER, tmp_path, "3", "flusher")
    assert "queueguard_transactions_total" in run(WORKER, tmp_path, "4", "scrape")  # own increments, flushed first
    lines = run(SCRAPE, tmp_path).splitlines()
    assert 'queueguard_transactions_total{frontend="smtp"} 1007.0' in lines  # 3 + 1000 (flushed at stop) + 4
    assert 'queueguard_added_latency_seconds_count{frontend="smtp"} 2.0' in lines
    assert 'queueguard_downstream_up{downstream="ds"} 1.0' in lines


def test_unflushed_changes_are_all_a_hard_kill_loses(tmp_path: Path) -> None:
    run(WORKER, tmp_path, "5", "killed")
    lines = run(SCRAPE, tmp_path).splitlines()
    assert not any(line.startswith("queueguard_transactions_total{") and not line.endswith(" 0.0") for line in lines)
    assert 'queueguard_downstream_up{downstream="ds"} 1.0' not in lines
    run(WORKER, tmp_path, "2", "flusher")
    assert 'queueguard_downstream_up{downstream="ds"} 1.0' in run(SCRAPE, tmp_path).splitlines()


def test_a_gauge_takes_its_last_set_and_the_increments_after_it(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        from queueguard import metrics
        gauge = metrics.connections_active.labels("smtp")
        gauge.inc(5)
        gauge.set(2)
        gauge.inc(1)
        metrics.flush()
        metrics.downstream_up.labels("ds").set(1)
        metrics.downstream_up.labels("ds").set(0)
        metrics.flush()
    """)
    run(code, tmp_path)
    scrape = SCRAPE.replace('"queueguard_downstream_up{"',
                            '"queueguard_downstream_up{", "queueguard_connections_active{"')
    lines = run(scrape, tmp_path).splitlines()
    assert 'queueguard_connections_active{frontend="smtp"} 3.0' in lines
    assert 'queueguard_downstream_up{downstream="ds"} 0.0' in lines
