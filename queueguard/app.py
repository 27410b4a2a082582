"""Wiring: settings → components → pipelines → front ends, and the daemon's life cycle.

The composition root: the only module that knows every part and the only one
that imports a front end. Each front end gets its own Pipeline (its own
`frontend` label) over the same checks, state and quarantine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from queueguard import metrics, sdnotify
from queueguard.burst.check import BurstCheck
from queueguard.connlimits import ConnectionLimits
from queueguard.frontends.base import Frontend
from queueguard.frontends.smtp_proxy import SmtpProxy
from queueguard.host_counts import HostCounts
from queueguard.logging_setup import configure
from queueguard.patterns import PatternCheck
from queueguard.pipeline import Pipeline
from queueguard.policy.holder import PolicyHolder
from queueguard.policy.schema import Policy
from queueguard.pressure.admission import Admission
from queueguard.pressure.governor import Governor
from queueguard.pressure.publish import PressurePublisher, pressure_sources, publisher_from_settings, queue_total
from queueguard.pressure.sensors import PsiTrigger, default_sensors
from queueguard.quarantine.store import SUMMARY_TTL, Filter, QuarantineStore
from queueguard.queuewatch.service import QueueWatch
from queueguard.ratelimit.check import RateLimitCheck
from queueguard.relay import Relay
from queueguard.routing import Router
from queueguard.scan.check import ScanCheck
from queueguard.settings import Settings, host_problems, split_hostport
from queueguard.stage import ConnectCheck, MessageCheck, RcptCheck
from queueguard.workers import (
    ENV_RUN_DIR,
    WorkerFailed,
    WorkerId,
    beat,
    current_worker,
    host_counts_file,
    inherited_socket,
    supervise,
)

log = logging.getLogger("queueguard")


@dataclass
class App:
    """Every long-lived component, built once from settings."""

    settings: Settings
    policies: PolicyHolder
    relay: Relay
    router: Router
    quarantine: QuarantineStore
    ratelimit: RateLimitCheck
    bursts: BurstCheck
    patterns: PatternCheck
    admission: Admission
    connections: ConnectionLimits
    scan: ScanCheck | None
    queuewatch: QueueWatch
    publisher: PressurePublisher | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def rcpt_checks(self, *, relay: bool) -> list[RcptCheck]:
        """Rate limits first (admission under soften defers rate-limited flows); route caps only
        where we relay: behind a milter the MTA routes, not us."""
        checks: list[RcptCheck] = [self.ratelimit, self.admission]
        if relay:
            checks.append(self.router)
        return checks

    @property
    def message_checks(self) -> list[MessageCheck]:
        """Cheapest first: admission needs only the size, patterns and bursts a parse, scan clamd."""
        checks: list[MessageCheck] = [self.admission, self.patterns, self.bursts]
        if self.scan is not None:
            checks.append(self.scan)
        return checks

    def pipeline(self, frontend: str, *, relay: bool, hold_in_mta: bool = False) -> Pipeline:
        """Connection limits only where we take the client's connection ourselves (the proxy);
        behind a milter the MTA counts its clients (Postfix's anvil)."""
        connect: list[ConnectCheck] = [self.admission, self.connections] if relay else [self.admission]
        return Pipeline(
            frontend=frontend, policy=self.policies.current, connect_checks=connect,
            rcpt_checks=self.rcpt_checks(relay=relay), message_checks=self.message_checks,
            quarantine=None if hold_in_mta else self.quarantine, hold_in_mta=hold_in_mta,
            relay=self.relay if relay else None, route_for=self.router.route_for,
            header_prefix=self.settings.smtp.header_prefix, add_headers=self.settings.smtp.add_headers,
        )

    def policy_changed(self, policy: Policy) -> None:
        """Parts that keep derived state (the scan gate's bounds, pressure thresholds) take the new policy."""
        if self.scan is not None:
            self.scan.reload(policy)

    def status(self) -> dict[str, object]:
        """What the status page and `STATUS=` show: one dict, cheap to build."""
        worker = current_worker()
        return {
            "node": self.settings.node or socket.gethostname(),
            "worker": None if worker is None else f"{worker.index}/{worker.count}",
            "uptime_seconds": round(time.time() - self.started),
            "queuewatch": self.queuewatch.snapshot(),
            "policy": self.policies.summary(),
            "pressure": self.admission.status(),
            "connections": self.connections.status(),
            "scan": self.scan.status() if self.scan is not None else None,
            "ratelimit": self.ratelimit.status(),
            "bursts": self.bursts.status(),
            "quarantine": self.quarantine.cached_summary(),
            "routes": self.router.status(),
            "published_pressure": self.publisher.report() if self.publisher is not None else None,
            "downstreams": [
                {"route": name, "address": d.name, "up": d.available(), "open": d.open_count}
                for name, group in self.relay.groups.items() for d in group.downstreams
            ],
        }


class StartupError(Exception):
    """queueguard cannot run with these settings; the message says why, in one line per problem."""


def _writable(directory: Path) -> None:
    """The quarantine must take mail from the first wave on: find out now, not at the first 250."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StartupError(f"quarantine directory {directory} is not writable: {e.strerror or e}") from e


def _host_counts(worker: WorkerId | None) -> HostCounts | None:
    """A worker counts its connections in the table every worker of the host maps."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    if worker is None or not run_dir:
        return None
    return HostCounts(host_counts_file(Path(run_dir)), worker.index)


def build(settings: Settings, processes: int = 1) -> App:
    """Construct the components; nothing listens yet. `processes`: the worker processes of this
    host, which split its per-host bounds (the scan limits: clamd is one per host)."""
    if missing := host_problems(settings):
        raise StartupError("\n".join(missing))
    policies = PolicyHolder(settings.policies)
    problems = policies.reload()
    if problems:
        raise StartupError("policy errors, not starting:\n" + "\n".join(str(p) for p in problems))
    _writable(settings.quarantine.directory)
    clamd = settings.clamd
    governor = Governor(default_sensors(clamd.pid_file, clamd.memory_cgroup, clamd=clamd.enabled),
                        clock=time.monotonic)
    scan = ScanCheck(clamd, governor, processes=processes) if clamd.enabled else None
    if scan is not None:
        scan.set_policy(policies.current())
    router = Router(settings, policies.current)
    router.readers.update(pressure_sources(settings))
    queuewatch = QueueWatch.from_settings(settings)
    if scan is not None:
        queuewatch.clamd = None  # the scan stage's health checks own the clamd gauges; one writer
    publisher = publisher_from_settings(settings, policies.current, governor)
    q = settings.queuewatch
    if publisher is not None and (q.exim_spool or q.postfix_queue or q.mailman_queue):
        publisher.queue = lambda: queue_total(queuewatch.snapshot())
    ratelimit = RateLimitCheck.from_settings(settings, processes)
    return App(
        settings=settings, policies=policies, relay=Relay.from_settings(settings), router=router,
        quarantine=QuarantineStore(
            settings.quarantine.directory, min_free_bytes=settings.quarantine.min_free_bytes,
            min_free_inodes=settings.quarantine.min_free_inodes),
        ratelimit=ratelimit, bursts=BurstCheck.from_settings(settings, ratelimit.members),
        patterns=PatternCheck(), admission=Admission(governor),
        connections=ConnectionLimits(host=_host_counts(current_worker())),
        scan=scan, queuewatch=queuewatch, publisher=publisher,
    )


def frontends(app: App, worker: WorkerId | None) -> list[Frontend]:
    """The SMTP proxy always (every worker, sharing the port), the milter and the policy socket
    where the settings ask for them (every worker, on the socket the supervisor bound)."""
    s = app.settings
    out: list[Frontend] = [SmtpProxy(app.pipeline("smtp", relay=True), s.smtp, reuse_port=worker is not None)]
    if s.milter.enabled:
        from queueguard.frontends.milter import MilterServer

        hold = s.milter.quarantine == "hold"
        out.append(MilterServer(app.pipeline("milter", relay=False, hold_in_mta=hold), s.milter,
                                s.smtp.max_message_size, sock=inherited_socket("milter") if worker else None))
    if s.policy_socket.enabled:
        from queueguard.frontends.policy_socket import PolicySocket

        out.append(PolicySocket(app.pipeline("policy", relay=False, hold_in_mta=True), s.policy_socket,
                                sock=inherited_socket("policy") if worker else None))
    return out


async def start(app: App, worker: WorkerId | None = None) -> tuple[list[Frontend], asyncio.Server]:
    """Open every listener and background task; returns the front ends and the web server. A
    worker other than 0 runs only what every worker needs (see queueguard/workers.py)."""
    from queueguard.web import start_web
    from queueguard.webauth import from_settings

    s = app.settings
    started: list[Frontend] = []
    for frontend in frontends(app, worker):
        await frontend.start()
        started.append(frontend)
    host, port = split_hostport(s.metrics, 9925)
    run_dir = os.environ.get(ENV_RUN_DIR) if worker is not None else None
    access = from_settings(s.status, session_dir=Path(run_dir) / "sessions" if run_dir else None,
                           processes=worker.count if worker is not None else 1)
    web = await start_web(host, port, app.status, access, reuse_port=worker is not None)
    loop = asyncio.get_running_loop()
    app.tasks.append(loop.create_task(app.policies.watch(on_change=app.policy_changed)))
    app.tasks.append(loop.create_task(app.admission.governor.watch(lambda: app.policies.current().pressure,
                                                                   PsiTrigger())))
    if app.scan is not None:
        app.tasks.append(loop.create_task(app.scan.run()))
    app.tasks.extend(loop.create_task(t) for t in [*app.router.background(), *app.ratelimit.background()])
    app.tasks.append(loop.create_task(_refresh_quarantine_summary(app.quarantine)))
    if worker is not None:
        app.tasks.append(loop.create_task(metrics.flusher()))  # its increments into the shared files
    if worker is None or worker.primary:
        if app.publisher is not None:
            app.tasks.append(loop.create_task(app.publisher.run()))
        app.tasks.append(loop.create_task(app.queuewatch.run()))
        app.tasks.append(loop.create_task(_recover_quarantine(app.quarantine)))
        app.tasks.append(loop.create_task(_expire_quarantine(app.quarantine, s.quarantine.retention)))
    return started, web


async def _recover_quarantine(store: QuarantineStore) -> None:
    """After a crash: index entries the index missed, drop temp files of interrupted writes."""
    try:
        done = await asyncio.to_thread(store.recover)
    except Exception:
        log.exception("quarantine recovery failed in %s", store.dir)
        return
    if any(done.values()):
        log.warning("quarantine recovery in %s: %s", store.dir, done)
    else:
        log.info("quarantine %s: index open, nothing to recover", store.dir)


def expire_quarantine(store: QuarantineStore, retention: float, now: float) -> int:
    """Delete entries older than `retention` (settings quarantine.retention); returns how many."""
    removed = 0
    for entry in store.list(Filter(until=now - retention)):
        removed += store.delete(entry.id)
    return removed


async def _refresh_quarantine_summary(store: QuarantineStore) -> None:
    """Keeps the quarantine gauges current for /metrics (and the status page) without I/O on the loop."""
    while True:
        try:
            await asyncio.to_thread(store.summary, force=True)
        except Exception:  # the gauges go stale, the task must not end with them
            log.exception("quarantine summary of %s failed", store.dir)
        await asyncio.sleep(SUMMARY_TTL)


async def _expire_quarantine(store: QuarantineStore, retention: float, every: float = 3600.0) -> None:
    """Hourly: the quarantine must never be what fills a disk (2014 inode incident)."""
    while True:
        await asyncio.sleep(every)
        try:
            removed = await asyncio.to_thread(expire_quarantine, store, retention, time.time())
        except Exception:
            log.exception("quarantine retention run failed in %s", store.dir)
            continue
        if removed:
            log.info("quarantine retention: deleted %d entries older than %.0f days", removed, retention / 86400)


async def stop(app: App, started: list[Frontend], web: asyncio.Server) -> None:
    """Stop every front end (one failing does not keep the others open), then the tasks."""
    web.close()
    for frontend in started:
        try:
            await frontend.stop(app.settings.smtp.shutdown_grace)
        except Exception:
            log.exception("stopping %s failed", type(frontend).__name__)
    for task in app.tasks:
        task.cancel()
    await asyncio.gather(*app.tasks, return_exceptions=True)
    await app.ratelimit.close()
    app.relay.close()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads policies (the last good one stays on errors).
    With `workers` over 1 this process supervises that many workers (queueguard/workers.py)."""
    configure(settings.log_format, settings.log_level)
    worker = current_worker()
    if worker is None and settings.worker_count() > 1:
        build(settings)  # refuse here, once, with the same one-line errors as a single process
        shared: dict[str, socket.socket] = {}
        try:
            if settings.milter.enabled:
                from queueguard.frontends import milter

                shared["milter"] = milter.bind(settings.milter)
            if settings.policy_socket.enabled:
                from queueguard.frontends import policy_socket

                shared["policy"] = policy_socket.bind(settings.policy_socket)
        except OSError as e:
            for sock in shared.values():
                sock.close()
            raise StartupError(f"cannot listen: {e}") from e
        try:
            return await supervise(settings, settings.worker_count(), shared)
        except WorkerFailed as e:
            raise StartupError(str(e)) from e
        finally:
            for sock in shared.values():
                if sock.family == socket.AF_UNIX:
                    with contextlib.suppress(OSError):
                        os.unlink(sock.getsockname())
                sock.close()
    app = build(settings, worker.count if worker else 1)
    try:
        started, web = await start(app, worker)
    except OSError as e:  # a port in use, an address not on this host
        raise StartupError(f"cannot listen: {e.strerror or e}"
                           f" (smtp {settings.smtp.listen}, metrics {settings.metrics})") from e
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    async def reload() -> None:
        """Off the loop (YAML, validation, RE2 compiles), then the parts that derive state from it."""
        sdnotify.reloading()
        problems = await asyncio.to_thread(app.policies.reload)
        try:
            if not problems:
                app.policy_changed(app.policies.current())
        finally:  # systemd waits for READY after RELOADING, whatever happened
            sdnotify.ready("reload failed, running last good policy" if problems else "policy reloaded")

    loop.add_signal_handler(signal.SIGHUP, lambda: app.tasks.append(loop.create_task(reload())))
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    run_dir = os.environ.get(ENV_RUN_DIR)
    if worker is not None and run_dir:  # ready only now: the supervisor forwards SIGHUP to ready workers
        app.tasks.append(loop.create_task(beat(Path(run_dir), worker.index)))
    watchdog = sdnotify.Watchdog()
    app.tasks.append(loop.create_task(watchdog.run()))
    app.tasks.append(loop.create_task(sdnotify.status_loop(lambda: _status_line(app), 10.0)))
    _tune_gc()
    sdnotify.ready("accepting mail")
    log.info("queueguard ready: smtp=%s downstreams=%s metrics=%s policies=%s state=%s",
             settings.smtp.listen, ",".join(d.address for d in settings.downstreams), settings.metrics,
             settings.policies, settings.state)
    await stopping.wait()
    sdnotify.stopping("draining")
    log.info("queueguard stopping: finishing in-flight messages (grace %.0fs)", settings.smtp.shutdown_grace)
    await stop(app, started, web)
    return 0


def _tune_gc() -> None:
    """Fewer collections on the message path, measured at ~5 % of the proxy's CPU.

    Every SMTP command allocates a few dozen short-lived objects, so the default gen-0
    threshold (700) ran a collection every few messages, each walking everything loaded at
    start. Freezing what start-up built takes it out of every collection; a larger gen-0
    threshold runs them less often (cyclic garbage waits a little longer; memory stays bounded).
    """
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


def _status_line(app: App) -> str:
    verdicts = {
        action: sum(
            s.value for m in metrics.verdicts.collect() for s in m.samples
            if s.name.endswith("_total") and s.labels.get("stage") == "final" and s.labels.get("action") == action
        )
        for action in ("accept", "tempfail", "reject", "quarantine")
    }
    return " ".join(f"{k}={int(v)}" for k, v in verdicts.items())
