"""QueueWatch: run every configured watcher each interval, export metrics, keep a snapshot.

Directory scans and /proc reads run in a worker thread (a 100,000-message
spool takes tens of milliseconds to list, which the event loop that answers
SMTP must not wait for); probes are async. A watcher that fails (missing
directory, no permission) reports `queueguard_queuewatch_up{watcher} 0` with
the error in the snapshot, and its queue series are removed rather than left
showing stale numbers. The worker is a daemon thread of its own, not the
loop's executor, which is joined at exit: a scan stuck in a hung filesystem
must not keep the daemon from stopping. While a scan is stuck, no second one
starts and after `scan_timeout` every spool watcher reports down.

How "stuck" is judged (see flow.py): Exim and Postfix are judged as a whole
(hold excluded), reported as queue "all", since Postfix moves a message
between its queues without delivering it; each Mailman queue is a separate
stage with its own runner, so each is judged alone (bad and shunt excluded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from queueguard import metrics
from queueguard.queuewatch.flow import PARKING_QUEUES, STUCK_WINDOW, FlowPoint, History, diff_scans
from queueguard.queuewatch.probes import ProbeResult, probe_clamd, probe_smtp
from queueguard.queuewatch.spools import FROZEN_SCAN_LIMIT, QueueScan, scan_exim, scan_mailman, scan_postfix
from queueguard.queuewatch.system import (
    DEFAULT_MAILMAN_RUNNERS,
    FsUsage,
    Proc,
    count_processes,
    count_runners,
    fs_usage,
    list_processes,
)
from queueguard.scan.clamd import ClamdClient
from queueguard.settings import Downstream, QueueWatchSettings, Settings

log = logging.getLogger("queueguard.queuewatch")
WHOLE_MTA = "all"
WHOLE_MTAS = ("exim", "postfix")
T = TypeVar("T")


@dataclass
class WatcherState:
    ok: bool = True
    error: str = ""
    seconds: float = 0.0


@dataclass
class _Spools:
    """What one worker-thread pass found."""

    scans: dict[str, list[QueueScan]] = field(default_factory=dict)
    filesystems: list[FsUsage] = field(default_factory=list)
    procs: list[Proc] | None = None
    watchers: dict[str, WatcherState] = field(default_factory=dict)


class QueueWatch:
    """Collects queue, filesystem, process, clamd and downstream health.

    `clock` gives wall-clock seconds (ages are wall-clock differences);
    `proc_root` lets a test point /proc elsewhere.
    """

    def __init__(
        self,
        settings: QueueWatchSettings,
        *,
        quarantine_dir: Path | None = None,
        clamd: ClamdClient | None = None,
        downstreams: Sequence[Downstream] = (),
        clock: Callable[[], float] = time.time,
        proc_root: Path = Path("/proc"),
        frozen_limit: int = FROZEN_SCAN_LIMIT,
        scan_timeout: float | None = None,
    ) -> None:
        self.settings = settings
        self.scan_timeout = scan_timeout if scan_timeout is not None else max(10.0, settings.interval)
        self._scan: asyncio.Future[_Spools] | None = None
        self._scan_started = 0.0
        self.clamd = clamd
        self.downstreams = list(downstreams)
        self.clock = clock
        self.proc_root = proc_root
        self.frozen_limit = frozen_limit
        paths = [*settings.filesystems, settings.exim_spool, settings.postfix_queue, settings.mailman_queue,
                 quarantine_dir]
        self.fs_paths = list(dict.fromkeys(p for p in paths if p is not None))
        self.expected_runners: list[str] = list(settings.mailman_runners)
        if not self.expected_runners and settings.mailman_queue is not None:
            self.expected_runners = list(DEFAULT_MAILMAN_RUNNERS)
        self._previous: dict[str, list[QueueScan]] = {}
        self._histories: dict[tuple[str, str], History] = {}
        self._queues: dict[tuple[str, str], dict[str, object]] = {}
        self._spools = _Spools()
        self._runners: dict[str, int] = {}
        self._processes: dict[str, int] = {}
        self._clamd: ProbeResult | None = None
        self._downstreams: dict[str, ProbeResult] = {}
        self._collected_at: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueWatch:
        """Watch what the daemon's settings name: its quarantine, clamd if enabled, every downstream."""
        clamd = ClamdClient.from_settings(settings.clamd) if settings.clamd.enabled else None
        seen: dict[str, Downstream] = {d.address: d for d in settings.downstreams}
        for route in settings.routes.values():
            for d in route.downstreams:
                seen.setdefault(d.address, d)
        return cls(settings.queuewatch, quarantine_dir=settings.quarantine.directory, clamd=clamd,
                   downstreams=list(seen.values()))

    async def run(self) -> None:
        """Collect every `interval` seconds until cancelled; one failed round is logged, not fatal."""
        while True:
            try:
                await self.collect()
            except Exception:
                log.exception("queuewatch round failed")
            await asyncio.sleep(self.settings.interval)

    async def collect(self) -> None:
        """One round: scan spools (thread), probe clamd and downstreams (concurrently), update metrics."""
        probes = [probe_smtp(d.address, d.proxy_protocol) for d in self.downstreams]
        if self.clamd is not None:
            probes.append(probe_clamd(self.clamd))
        spools, results = await asyncio.gather(self._scan_round(), asyncio.gather(*probes))
        now = self.clock()
        self._apply_spools(spools, now)
        for d, result in zip(self.downstreams, results, strict=False):
            self._downstreams[d.address] = result
            metrics.downstream_reachable.labels(d.address).set(1 if result.up else 0)
        if self.clamd is not None:
            self._apply_clamd(results[-1])
        self._collected_at = now

    async def _scan_round(self) -> _Spools:
        """This round's spool pass, or (still running after `scan_timeout`) every spool watcher down.

        A pass still running from an earlier round is waited for again, never doubled:
        a spool that hangs costs one thread, not one per round.
        """
        if self._scan is not None and self._scan.get_loop() is not asyncio.get_running_loop():
            self._scan = None  # left pending by an earlier asyncio.run; it cannot be awaited here
        if self._scan is None:
            self._scan = _in_daemon_thread(self._scan_spools)
            self._scan.add_done_callback(_retrieved)  # it may end after its round gave up on it
            self._scan_started = time.monotonic()
        scan = self._scan
        try:
            return await asyncio.wait_for(asyncio.shield(scan), self.scan_timeout)
        except TimeoutError:
            stalled = time.monotonic() - self._scan_started
            error = f"scan still running after {stalled:.0f}s (hung filesystem?)"
            return _Spools(watchers={n: WatcherState(False, error, stalled) for n in self._watcher_names()})
        finally:
            if scan.done():
                self._scan = None

    def _watcher_names(self) -> list[str]:
        s = self.settings
        names = [n for n, p in (("exim", s.exim_spool), ("postfix", s.postfix_queue),
                                ("mailman", s.mailman_queue)) if p is not None]
        if self.fs_paths:
            names.append("filesystems")
        if self.expected_runners or s.processes:
            names.append("processes")
        return names

    # -- worker thread ---------------------------------------------------------

    def _scan_spools(self) -> _Spools:
        out = _Spools()
        s = self.settings
        now = self.clock()
        exim, postfix, mailman = s.exim_spool, s.postfix_queue, s.mailman_queue
        if exim is not None:
            found = _watch(out, "exim", lambda: [scan_exim(exim, self.frozen_limit)])
            if found is not None:
                out.scans["exim"] = found
        if postfix is not None:
            known = _known_arrivals(self._previous.get("postfix", []))
            found = _watch(out, "postfix", lambda: scan_postfix(postfix, known, now))
            if found is not None:
                out.scans["postfix"] = found
        if mailman is not None:
            found = _watch(out, "mailman", lambda: scan_mailman(mailman))
            if found is not None:
                out.scans["mailman"] = found
        if self.fs_paths:
            out.filesystems = _watch(out, "filesystems", self._fs_round) or []
        if self.expected_runners or s.processes:
            out.procs = _watch(out, "processes", lambda: list_processes(self.proc_root))
        return out

    def _fs_round(self) -> list[FsUsage]:
        """One row per filesystem (the first configured path names it); an error names each path that failed."""
        usages = []
        failed = []
        devices = set()
        for path in self.fs_paths:
            try:
                device = os.stat(path).st_dev
                if device not in devices:
                    devices.add(device)
                    usages.append(fs_usage(path))
            except OSError as e:
                failed.append(f"{path}: {e.strerror or e}")
        if failed:
            raise OSError("; ".join(failed))
        return usages

    # -- event loop: metrics and state ------------------------------------------

    def _apply_spools(self, spools: _Spools, now: float) -> None:
        for name, state in spools.watchers.items():
            metrics.queuewatch_up.labels(name).set(1 if state.ok else 0)
            metrics.queuewatch_scan_seconds.labels(name).set(state.seconds)
        for mta in ("exim", "postfix", "mailman"):
            if mta in spools.scans:
                self._apply_mta(mta, spools.scans[mta], now)
            elif mta in spools.watchers:
                self._forget_mta(mta)
        self._apply_filesystems(spools.filesystems)
        if spools.procs is not None:
            self._apply_processes(spools.procs)
        self._spools = spools

    def _apply_mta(self, mta: str, scans: list[QueueScan], now: float) -> None:
        previous = self._previous.get(mta)
        flows = diff_scans(previous, scans)
        current_queues = {s.queue for s in scans}
        for key in [k for k in self._queues if k[0] == mta and k[1] not in current_queues]:
            self._drop_queue_series(*key)
        for scan in scans:
            flow = flows[scan.queue]
            oldest = scan.oldest_arrival()
            age = max(0.0, now - oldest) if oldest is not None else 0.0
            labels = (mta, scan.queue)
            metrics.queue_messages.labels(*labels).set(scan.messages)
            metrics.queue_oldest_age.labels(*labels).set(age)
            metrics.queue_arrived.labels(*labels).inc(flow.arrived)
            metrics.queue_departed.labels(*labels).inc(flow.departed)
            if scan.frozen is not None:
                metrics.queue_frozen.labels(*labels).set(scan.frozen)
            else:
                with contextlib.suppress(KeyError):
                    metrics.queue_frozen.remove(*labels)
            self._queues[labels] = {
                "mta": mta, "queue": scan.queue, "messages": scan.messages,
                "oldest_age_seconds": round(age, 1), "frozen": scan.frozen,
                "arrived": flow.arrived, "departed": flow.departed,
            }
        units: dict[str, list[QueueScan]] = {}
        for scan in scans:
            if (mta, scan.queue) in PARKING_QUEUES:
                continue
            unit = WHOLE_MTA if mta in WHOLE_MTAS else scan.queue
            units.setdefault(unit, []).append(scan)
        for unit, members in units.items():
            history = self._histories.setdefault((mta, unit), History(STUCK_WINDOW))
            history.add(FlowPoint(now, sum(s.messages for s in members),
                                  sum(flows[s.queue].departed for s in members)))
            stuck = history.stuck(now)
            metrics.queue_stuck.labels(mta, unit).set(1 if stuck else 0)
            for s in members:
                self._queues[(mta, s.queue)]["stuck"] = stuck
                self._queues[(mta, s.queue)]["departed_window"] = sum(
                    p.departed for p in history.points if p.at > now - history.window)
        self._previous[mta] = scans

    def _forget_mta(self, mta: str) -> None:
        """The watcher failed: remove its series instead of showing stale numbers."""
        for key in [k for k in self._queues if k[0] == mta]:
            self._drop_queue_series(*key)
        for key in [k for k in self._histories if k[0] == mta]:
            del self._histories[key]
            with contextlib.suppress(KeyError):
                metrics.queue_stuck.remove(*key)
        self._previous.pop(mta, None)

    def _drop_queue_series(self, mta: str, queue: str) -> None:
        for gauge in (metrics.queue_messages, metrics.queue_oldest_age, metrics.queue_frozen):
            with contextlib.suppress(KeyError):
                gauge.remove(mta, queue)
        self._queues.pop((mta, queue), None)

    def _apply_filesystems(self, usages: list[FsUsage]) -> None:
        for u in usages:
            metrics.filesystem_free_bytes.labels(u.path).set(u.free_bytes)
            metrics.filesystem_size_bytes.labels(u.path).set(u.size_bytes)
            metrics.filesystem_free_inodes.labels(u.path).set(u.free_inodes)
            metrics.filesystem_inodes.labels(u.path).set(u.inodes)

    def _apply_processes(self, procs: list[Proc]) -> None:
        self._processes = count_processes(self.settings.processes, procs)
        for name, n in self._processes.items():
            metrics.process_up.labels(name).set(1 if n else 0)
        running = count_runners(procs)
        self._runners = {r: running.get(r, 0) for r in self.expected_runners}
        self._runners.update({r: n for r, n in running.items() if r not in self._runners})
        for runner in self.expected_runners:
            metrics.mailman_runner_up.labels(runner).set(1 if running.get(runner) else 0)

    def _apply_clamd(self, result: ProbeResult) -> None:
        self._clamd = result
        metrics.clamd_up.set(1 if result.up else 0)
        for state in ("live", "idle", "max"):
            value = result.stats.get(f"threads_{state}")
            if value is not None:
                metrics.clamd_threads.labels(state).set(value)
        if "queue_items" in result.stats:
            metrics.clamd_queue.set(result.stats["queue_items"])

    # -- snapshot ---------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Plain data for `queue status` and the status page (shape: queueguard/web.py)."""
        snap: dict[str, object] = {
            "time": self._collected_at,
            "queues": [dict(q) for _, q in sorted(self._queues.items())],
            "filesystems": [
                {"path": u.path, "free_bytes": u.free_bytes, "size_bytes": u.size_bytes,
                 "free_inodes": u.free_inodes, "inodes": u.inodes}
                for u in self._spools.filesystems
            ],
            "processes": [{"name": n, "running": c} for n, c in self._processes.items()],
            "mailman_runners": [
                {"runner": r, "running": c, "expected": r in self.expected_runners}
                for r, c in sorted(self._runners.items())
            ],
            "downstreams": [
                {"name": a, "up": r.up, "detail": r.detail, "seconds": round(r.seconds, 4)}
                for a, r in self._downstreams.items()
            ],
            "watchers": [
                {"name": n, "ok": w.ok, "error": w.error, "seconds": round(w.seconds, 4)}
                for n, w in self._spools.watchers.items()
            ],
        }
        if self._clamd is not None:
            snap["clamd"] = {"up": self._clamd.up, "detail": self._clamd.detail, **self._clamd.stats}
        return snap


def _watch(out: _Spools, name: str, work: Callable[[], T]) -> T | None:
    """Run one watcher, recording whether it worked and how long it took."""
    start = time.monotonic()
    try:
        result: T | None = work()
        state = WatcherState()
    except OSError as e:
        result = None
        state = WatcherState(False, f"{type(e).__name__}: {e}")
    state.seconds = time.monotonic() - start
    out.watchers[name] = state
    return result


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Take a late scan's error (its round already reported the watchers down), so asyncio does
    not log it as never retrieved; the next round runs a new scan."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("queue watch: a scan that outlived its round failed: %r", future.exception())


def _in_daemon_thread(work: Callable[[], T]) -> asyncio.Future[T]:
    """Run `work` on a new daemon thread. asyncio.run joins the default executor's threads
    on exit, so a scan blocked there (hung NFS, a FIFO) would hang shutdown; this one is abandoned."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def succeed(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def fail(error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def target() -> None:
        try:
            settle = functools.partial(succeed, work())
        except BaseException as e:  # handed to the awaiting task, which re-raises it
            settle = functools.partial(fail, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=target, name="queuewatch-scan", daemon=True).start()
    return future


def _known_arrivals(scans: Sequence[QueueScan]) -> dict[str, float]:
    known: dict[str, float] = {}
    for s in scans:
        known.update(s.arrivals)
    return known
