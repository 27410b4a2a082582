"""Several worker processes behind one set of ports, supervised by the main process (`workers: N`).

Each worker is a whole `queueguard serve` with its own event loop; the kernel
spreads new connections over them (SO_REUSEPORT on the SMTP and metrics
ports), so a host uses every core. Limits and burst counts must then be
shared: more than one worker needs `state: redis://` (settings refuse
otherwise). The main process does no mail itself:

- starts N workers with QUEUEGUARD_WORKER=i/N, PROMETHEUS_MULTIPROC_DIR (so any
  worker's /metrics answers for all) and QUEUEGUARD_RUN_DIR (ready and
  heartbeat files, and the host's connection counts: host_counts.py);
- says READY=1 to systemd once every worker listens, and pings systemd's
  watchdog while it supervises: the watchdog covers the whole set, because a
  worker whose event loop hangs stops beating and is killed and restarted;
- restarts a worker that exits or stops beating (logged, with a backoff for one
  that keeps dying, and counted in `restarts.json` beside the metrics, which every
  worker's /metrics reports as `queueguard_worker_restarts_total{reason}`: the
  supervisor serves no scrape itself, and a worker that dies as it starts could not
  count its own restarts);
- forwards SIGHUP (each worker reloads its policy, the last good one stays on
  errors) and SIGTERM/SIGINT (each drains its in-flight mail), and waits.

The milter's and the policy service's sockets are bound once, by the main
process (a unix socket cannot be shared by SO_REUSEPORT), and every worker
inherits them and accepts on them (QUEUEGUARD_INHERIT=milter=FD,policy=FD): a
Postfix or Sendmail site uses every core too, and one worker dying or hanging
leaves them answering.

Worker 0 also runs what must run once per host: queue watch, quarantine
recovery and retention, pressure publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from queueguard import sdnotify
from queueguard.host_counts import HostCounts
from queueguard.settings import Settings

log = logging.getLogger("queueguard.workers")

ENV_WORKER = "QUEUEGUARD_WORKER"
ENV_RUN_DIR = "QUEUEGUARD_RUN_DIR"
ENV_INHERIT = "QUEUEGUARD_INHERIT"
ENV_COUNTS_FD = "QUEUEGUARD_COUNTS_FD"
ENV_SUPERVISOR = "QUEUEGUARD_SUPERVISOR"
HEARTBEAT = 1.0
"""Seconds between a worker's heartbeats (touching its file from its event loop)."""
HEARTBEAT_STALE = 15.0
"""A worker whose heartbeat is this old is hung: killed and restarted."""
READY_TIMEOUT = 60.0
MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class WorkerId:
    index: int
    count: int

    @property
    def primary(self) -> bool:
        """Worker 0 runs the once-per-host parts."""
        return self.index == 0


def current_worker(environ: dict[str, str] | None = None) -> WorkerId | None:
    """This process's place in the set, or None when it serves alone."""
    value = (os.environ if environ is None else environ).get(ENV_WORKER, "")
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit()):
        return None
    return WorkerId(int(index), int(count))


def inherited_socket(name: str, environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket `name` the supervisor handed this worker, or None."""
    for item in (os.environ if environ is None else environ).get(ENV_INHERIT, "").split(","):
        key, _, fd = item.partition("=")
        if key == name and fd.isdigit():
            return socket.socket(fileno=int(fd))
    return None


def host_counts_file(run_dir: Path) -> Path:
    """The connection counts every worker maps (host_counts.py): through the descriptor the
    supervisor holds open (ENV_COUNTS_FD), so a cleaner deleting the file can neither keep a new
    worker from starting nor split the host's counts; the file in the run directory without one."""
    fd = os.environ.get(ENV_COUNTS_FD, "")
    return Path(f"/proc/self/fd/{fd}") if fd.isdigit() else run_dir / "connections"


def ready_file(run_dir: Path, index: int) -> Path:
    return run_dir / f"ready-{index}"


def heartbeat_file(run_dir: Path, index: int) -> Path:
    return run_dir / f"heartbeat-{index}"


async def beat(run_dir: Path, index: int) -> None:
    """In a worker: say it is ready, then touch its heartbeat from its event loop until stopped.
    A worker whose supervisor is gone (killed with -9, it could not stop us) drains and exits
    rather than serve on unsupervised beside the next generation (SO_REUSEPORT lets both bind)."""
    supervisor = int(os.environ.get(ENV_SUPERVISOR) or os.getppid())  # given: it may die before we look
    ready_file(run_dir, index).write_text(str(os.getpid()))
    path = heartbeat_file(run_dir, index)
    while True:
        if os.getppid() != supervisor:
            log.warning("worker %d: the supervisor (pid %d) is gone; draining and exiting", index, supervisor)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        try:
            path.touch()
        except OSError as e:  # the run directory was cleaned away: keep checking the supervisor
            log.error("worker %d: cannot touch its heartbeat %s: %s", index, path, e)
        await asyncio.sleep(HEARTBEAT)


def run_directory() -> Path:
    """The workers' shared directory: `workers/` under systemd's RuntimeDirectory (/run/queueguard,
    which no tmp cleaner ages; one service, one supervisor), emptied first, since a supervisor
    killed with -9 leaves its own behind and /run is memory; else a new one in the temporary
    directory. A cleaner that deletes files written once (the settings, the metrics files)
    broke workers' restarts, metrics and the host-wide counts after its ten days."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not runtime:
        return Path(tempfile.mkdtemp(prefix="queueguard-workers-"))
    path = Path(runtime) / "workers"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


class Worker:
    def __init__(self, index: int, count: int, argv: list[str], env: dict[str, str], run_dir: Path,
                 fds: tuple[int, ...] = (), prepare: Callable[[], None] = lambda: None) -> None:
        """`prepare` runs before every start: it writes the files a worker reads (they may have
        been cleaned away since the last one)."""
        self.index = index
        self.argv = argv
        self.env = {**env, ENV_WORKER: f"{index}/{count}"}
        self.run_dir = run_dir
        self.fds = fds
        self.prepare = prepare
        self.proc: asyncio.subprocess.Process | None = None
        self.failures = 0
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.why: str | None = None
        """Why it is being restarted (`exited` or `hung`), until it is."""
        self.was_ready = False
        self._beat: float | None = None
        self._beat_seen = 0.0

    async def start(self) -> None:
        for path in (ready_file(self.run_dir, self.index), heartbeat_file(self.run_dir, self.index)):
            path.unlink(missing_ok=True)
        self.prepare()
        self.proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env, pass_fds=self.fds)
        self.started_at, self.restart_at = time.monotonic(), None
        self.was_ready, self._beat, self._beat_seen = False, None, self.started_at
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    def hung(self, now: float) -> bool:
        """No new heartbeat for HEARTBEAT_STALE by our monotonic clock, once it was ready (or for
        READY_TIMEOUT since its start). Judged by when we saw the file change, not by its mtime
        against the wall clock, which a clock step moves for every worker at once; a heartbeat
        file that is gone is a heartbeat that stopped."""
        beat = self.heartbeat()
        if beat != self._beat:
            self._beat, self._beat_seen = beat, now
        limit = HEARTBEAT_STALE if self.was_ready or self.ready else READY_TIMEOUT
        return now - self._beat_seen > limit

    @property
    def ready(self) -> bool:
        """Its ready file names it (remembered in `was_ready`: the file may be cleaned away)."""
        try:
            ready = self.proc is not None and ready_file(self.run_dir, self.index).read_text() == str(self.proc.pid)
        except OSError:
            return False
        self.was_ready = self.was_ready or ready
        return ready

    def heartbeat(self) -> float | None:
        try:
            return heartbeat_file(self.run_dir, self.index).stat().st_mtime
        except OSError:
            return None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class WorkerFailed(Exception):
    """A worker exited before it ever became ready (its own error is in the log above)."""


def worker_settings(settings: Settings, run_dir: Path) -> Path:
    """The resolved settings (flags applied) as a file every worker reads, each as one process."""
    doc = settings.model_dump(mode="json")
    doc["workers"] = 1
    path = run_dir / "settings.yaml"
    tmp = path.with_name(".settings.yaml.tmp")  # written whole, then renamed: a worker starting may read it now
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)
    return path


async def supervise(settings: Settings, count: int, shared: dict[str, socket.socket] | None = None) -> int:
    """Run `count` workers until SIGTERM/SIGINT; see the module docstring. `shared`: listening
    sockets by name that every worker inherits (`inherited_socket`)."""
    from prometheus_client import multiprocess

    run_dir = run_directory()
    (run_dir / "metrics").mkdir()
    counts_fd = os.open(HostCounts.create(run_dir / "connections", count), os.O_RDWR)
    counts = Path(f"/proc/self/fd/{counts_fd}")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update({"PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics"), ENV_RUN_DIR: str(run_dir),
                ENV_COUNTS_FD: str(counts_fd),
                ENV_SUPERVISOR: str(os.getpid()),
                # workers import what this process imports, however it was launched
                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    shared = shared or {}
    if shared:
        env[ENV_INHERIT] = ",".join(f"{name}={sock.fileno()}" for name, sock in shared.items())
    fds = (*(sock.fileno() for sock in shared.values()), counts_fd)
    argv = [sys.executable, "-m", "queueguard.cli", "serve", "--settings", str(worker_settings(settings, run_dir))]

    def prepare() -> None:
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        worker_settings(settings, run_dir)

    workers = [Worker(i, count, argv, env, run_dir, fds, prepare) for i in range(count)]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, _forward, workers, signal.SIGHUP)
    watchdog = asyncio.create_task(sdnotify.Watchdog().run())
    try:
        for w in workers:
            await w.start()
        await _wait_ready(workers, stopping)
        if stopping.is_set():
            return 0
        sdnotify.ready(f"{count} workers accepting mail")
        log.info("queueguard ready: %d workers on smtp=%s metrics=%s", count, settings.smtp.listen, settings.metrics)
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
            if not stopping.is_set():
                try:
                    await _tend(workers, multiprocess, counts)
                except Exception:  # a bug here must not take every worker down with the supervisor
                    log.exception("tending the workers failed; trying again")
        sdnotify.stopping("draining")
        log.info("queueguard stopping: %d workers draining", count)
        await _stop(workers, settings.smtp.shutdown_grace + 15)
        return 0
    finally:
        watchdog.cancel()
        for w in workers:
            w.signal(signal.SIGKILL)
        os.close(counts_fd)
        shutil.rmtree(run_dir, ignore_errors=True)


async def _wait_ready(workers: list[Worker], stopping: asyncio.Event) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(w.ready for w in workers) and not stopping.is_set():
        for w in workers:
            if w.proc is not None and w.proc.returncode is not None:
                raise WorkerFailed(f"worker {w.index} exited with code {w.proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise WorkerFailed(f"workers not ready after {READY_TIMEOUT:.0f}s")
        await asyncio.sleep(0.05)


def _forward(workers: list[Worker], sig: int) -> None:
    """To the workers that are ready: one still starting has no handler yet (SIGHUP's default
    would kill it), and it loads the current policy as it starts anyway."""
    for w in workers:
        if w.was_ready or w.ready:
            w.signal(sig)


def restart_delay(failures: int) -> float:
    """0, 1, 3, 7, 15, 30, 30 ... seconds: at once the first time, slower for one that keeps dying."""
    return float(min(MAX_BACKOFF, 2 ** failures - 1))


def count_restart(run_dir: Path, why: str) -> None:
    """One more restart in `restarts.json` (written whole, then renamed: workers read it at every
    scrape; see metrics.exposition)."""
    path = restarts_file(run_dir)
    counts = read_restarts(path)
    counts[why] = counts.get(why, 0) + 1
    tmp = path.with_name(".restarts.json.tmp")
    tmp.write_text(json.dumps(counts))
    os.replace(tmp, path)


def read_restarts(path: Path) -> dict[str, int]:
    """The counts in `path`; none from a file that is missing or not what we write (a dict of
    counts), so a garbled file is written anew rather than stopping the count."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if type(v) is int and 0 <= v < 2**53}


def restarts_file(run_dir: Path) -> Path:
    return run_dir / "metrics" / "restarts.json"


async def _tend(workers: list[Worker], multiprocess: object, counts: Path) -> None:
    """Kill the hung, restart the dead (after restart_delay), forget old failures of the steady.
    Each worker on its own: one that cannot be restarted now (no memory for a process, a full
    /run) must not leave the others after it untended."""
    now = time.monotonic()
    for w in workers:
        try:
            await _tend_one(w, now, multiprocess, counts)
        except Exception:
            if w.restart_at is not None:  # its start failed: the next try after the back-off
                w.restart_at = now + restart_delay(w.failures)
                w.failures += 1
            log.exception("worker %d: tending it failed; trying again", w.index)


async def _tend_one(w: Worker, now: float, multiprocess: object, counts: Path) -> None:
    proc = w.proc
    if proc is None:
        return
    if proc.returncode is None:
        if not w.hung(now):
            if w.failures and now - w.started_at > MAX_BACKOFF:
                w.failures = 0
            return
        log.error("worker %d (pid %d) stopped beating: killing it", w.index, proc.pid)
        w.why = "hung"
        w.signal(signal.SIGKILL)
        await proc.wait()
    if w.restart_at is None:
        # its live gauges (connections open, scans in flight) must not count any more, nor
        # its connections towards the limits (they closed with it); neither may keep it down
        try:
            multiprocess.mark_process_dead(proc.pid, str(w.run_dir / "metrics"))  # type: ignore[attr-defined]
            HostCounts.clear(counts, w.index)
        except OSError as e:
            log.error("worker %d: clearing what it left failed (%s); restarting it anyway", w.index, e)
        w.restart_at = now + restart_delay(w.failures)
        w.failures += 1
        w.why = w.why or "exited"
        log.error("worker %d (pid %d) exited with code %s; restarting in %.0fs", w.index, proc.pid,
                  proc.returncode, w.restart_at - now)
    if now >= w.restart_at:
        await w.start()
        why, w.why = w.why, None
        if why is not None:
            try:
                count_restart(w.run_dir, why)
            except OSError as e:
                log.error("worker %d: counting its restart failed: %s", w.index, e)


async def _stop(workers: list[Worker], grace: float) -> None:
    for w in workers:
        w.signal(signal.SIGTERM)
    procs = [w.proc for w in workers if w.proc is not None]
    try:
        async with asyncio.timeout(grace):
            await asyncio.gather(*(p.wait() for p in procs))
    except TimeoutError:
        log.error("workers still running %.0fs after SIGTERM: killing them", grace)
