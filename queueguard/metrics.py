"""Every metric queueguard exports, in one place (prefix `queueguard_`).

Module-level objects on the default registry; tests read deltas. Sections
follow the package layout; add new metrics to the section of the part that
owns them. With several worker processes (settings `workers`) the supervisor
sets PROMETHEUS_MULTIPROC_DIR before a worker starts: every process writes its
values there and any worker's /metrics answers for all of them (`exposition`),
so a scrape sees one target. A gauge says how its workers' values combine:
`livesum` for what each worker holds (connections, scans in flight), `max` for
a shared condition any worker may see (pressure, breaker, Redis down), and
`mostrecent` (the default) for a fact every worker reads alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import prometheus_client
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily

P = "queueguard_"
log = logging.getLogger("queueguard.metrics")
_M = TypeVar("_M", bound="_FastLabels")

FLUSH_EVERY = 0.1
"""Seconds a worker's increments may wait before its metric file has them (flusher)."""
_dirty: dict[Any, None] = {}
_dirty_lock = threading.Lock()


def _buffered(base: Any) -> Any:
    """prometheus_client's multiprocess value, its increments kept in memory until `flush`.

    Each write to the metric file takes a lock and packs two doubles into the mmap; a message
    makes about fifteen. Buffered, a counter's inc() costs 0.7 µs instead of 1.4 and a histogram's
    observe() 1.0 instead of 2.7: about 1 % of a worker's CPU. Increments (counters, histograms,
    livesum gauges) are summed here, a gauge's set() (with the timestamp it was given) replaces
    the value, and the value is written at most every FLUSH_EVERY seconds and before this worker
    answers a scrape. A worker killed hard loses at most its last FLUSH_EVERY of changes."""

    class Buffered(base):  # type: ignore[misc]
        def inc(self, amount: float) -> None:
            with _dirty_lock:
                self._value += amount
                self._timestamp = 0.0
                _dirty[self] = None

        def set(self, value: float, timestamp: float | None = None) -> None:
            with _dirty_lock:
                self._value = value
                self._timestamp = timestamp or 0.0
                _dirty[self] = None

    return Buffered


def flush() -> None:
    """Write the buffered increments of this process to its metric file; a value that could not
    be written stays buffered for the next flush."""
    with _dirty_lock:
        while _dirty:
            value = next(iter(_dirty))
            value._file.write_value(value._key, value._value, value._timestamp)
            del _dirty[value]


async def flusher() -> None:
    """Every FLUSH_EVERY seconds, for as long as the worker runs (and once more when it stops).
    A failing write (the metric files' directory cleaned away) is logged and tried again: it must
    not stop this worker's counts from reaching the files for good."""
    try:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            try:
                flush()
            except Exception:
                log.exception("writing this worker's metrics failed")
                await asyncio.sleep(10)  # not a log line every 0.1 s
    finally:
        with contextlib.suppress(Exception):
            flush()


if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # prometheus_client calls os.getpid() (a system call) on every inc/set/observe to notice a
    # fork; a worker is exec'd by the supervisor and never forks one that writes metrics, so its
    # pid is fixed: about 20 calls per message, 1.5 % of a worker's CPU.
    _PID = os.getpid()
    prometheus_client.values.ValueClass = _buffered(
        prometheus_client.values.MultiProcessValue(lambda: _PID))  # type: ignore[no-untyped-call]


class _FastLabels(prometheus_client.metrics.MetricWrapperBase):
    """`labels()` answered from a dict after the first call for a label set.

    prometheus_client validates, converts and takes a lock on every `labels()` call (~2 µs);
    the SMTP path makes about a dozen per message, which was 3 % of the proxy's CPU.
    `remove()` and `clear()` keep the dict in step.
    """

    def labels(self: _M, *labelvalues: Any, **labelkwargs: Any) -> _M:
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)
        cache: dict[tuple[Any, ...], _M] = self.__dict__.setdefault("_qg_children", {})
        child = cache.get(labelvalues)
        if child is None:
            child = cache[labelvalues] = super().labels(*labelvalues)
        return child

    def remove(self, *labelvalues: Any) -> None:
        self.__dict__.get("_qg_children", {}).pop(labelvalues, None)
        super().remove(*labelvalues)

    def clear(self) -> None:
        self.__dict__.get("_qg_children", {}).clear()
        super().clear()


class Counter(_FastLabels, prometheus_client.Counter):
    pass


class Gauge(_FastLabels, prometheus_client.Gauge):
    def __init__(self, *args: Any, multiprocess_mode: str = "mostrecent", **kwargs: Any) -> None:
        kwargs["multiprocess_mode"] = multiprocess_mode
        super().__init__(*args, **kwargs)


def exposition() -> bytes:
    """The text a scrape gets: this process's registry, or every worker's values combined, with
    the supervisor's count of worker restarts."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        flush()  # this worker's own increments; the others' are at most FLUSH_EVERY behind
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(WorkerRestarts(Path(directory) / "restarts.json"))
        return prometheus_client.generate_latest(registry)
    return prometheus_client.generate_latest(prometheus_client.REGISTRY)


class WorkerRestarts(prometheus_client.registry.Collector):
    """`queueguard_worker_restarts_total{reason}` from the file the supervisor keeps (workers.py
    count_restart): the supervisor itself serves no scrape."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterable[prometheus_client.Metric]:
        family = CounterMetricFamily(P + "worker_restarts", "Worker processes restarted by the supervisor, by "
                                     "why (exited: the process ended; hung: it stopped beating and was killed)",
                                     labels=["reason"])
        try:
            counts = json.loads(self.path.read_text())
        except Exception:  # missing, garbled, absurdly nested: no count rather than no /metrics
            counts = {}
        for reason in ("exited", "hung"):
            value = counts.get(reason, 0) if isinstance(counts, dict) else 0
            family.add_metric([reason], float(value) if type(value) is int and 0 <= value < 2**53 else 0.0)
        yield family


class Histogram(_FastLabels, prometheus_client.Histogram):
    pass


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- core: front ends and pipeline -------------------------------------------
connections = Counter(P + "connections_total", "Client connections accepted", ["frontend"])
connections_active = Gauge(P + "connections_active", "Client connections open now", ["frontend"],
                           multiprocess_mode="livesum")
transactions = Counter(P + "transactions_total", "Mail transactions started", ["frontend"])
verdicts = Counter(
    P + "verdicts_total", "Verdicts by stage, action and reason", ["frontend", "stage", "action", "reason"]
)
rule_hits = Counter(P + "rule_hits_total", "Rule matches by rule, kind and action", ["rule", "kind", "action", "mode"])
messages_bytes = Counter(P + "message_bytes_total", "Bytes of message data received", ["frontend"])
added_latency = Histogram(
    P + "added_latency_seconds", "Time queueguard adds to a message (end of DATA to our answer, less downstream)",
    ["frontend"], buckets=LATENCY_BUCKETS,
)
internal_errors = Counter(P + "internal_errors_total", "Exceptions turned into 451 4.3.0", ["stage"])
protocol_errors = Counter(P + "protocol_errors_total", "Refused client input by kind", ["kind"])
connection_limits = Counter(
    P + "connection_limit_refusals_total", "Connections refused at the door by a per-client limit", ["reason"]
)

# --- relay: downstream MTAs ----------------------------------------------------
downstream_up = Gauge(P + "downstream_up", "1 when the downstream answered its last attempt", ["downstream"],
                      multiprocess_mode="max")
downstream_latency = Histogram(
    P + "downstream_latency_seconds", "Time for a downstream to take one message", ["downstream"],
    buckets=LATENCY_BUCKETS,
)
downstream_replies = Counter(P + "downstream_replies_total", "Downstream answers by class", ["downstream", "class"])
downstream_connections = Gauge(P + "downstream_connections", "Open pooled connections", ["downstream"],
                               multiprocess_mode="livesum")
downstreams_available = Gauge(P + "downstreams_available", "Downstreams currently marked healthy", ["route"],
                              multiprocess_mode="max")
route_active = Gauge(P + "route_active_transactions", "Open transactions toward a route", ["route"],
                     multiprocess_mode="livesum")
route_pressure = Gauge(P + "route_pressure_level", "Pressure reported by the host behind a route (0/1/2)", ["route"],
                       multiprocess_mode="max")
route_deferrals = Counter(
    P + "route_deferrals_total", "RCPTs deferred by a route (split, shed, concurrency, rate)", ["route", "reason"]
)
route_reported_queue = Gauge(P + "route_reported_queue", "Local queue size the host behind a route reports", ["route"])
pressure_published = Counter(P + "pressure_published_total", "Pressure reports written to Redis, by result", ["result"])

# --- policy --------------------------------------------------------------------
policy_reloads = Counter(P + "policy_reloads_total", "Successful policy loads")
policy_reload_failures = Counter(P + "policy_reload_failures_total", "Policy reloads refused for errors")
policy_last_success = Gauge(P + "policy_last_success_timestamp_seconds", "When the running policy was loaded")
policy_rules = Gauge(P + "policy_rules", "Rules in the running policy", ["kind"])

# --- ratelimit: rules, in-process and shared (Redis) state ---------------------
ratelimit_hits = Counter(P + "ratelimit_hits_total", "Enforced rate-limit rules exceeded", ["rule", "action"])
ratelimit_shadow_hits = Counter(
    P + "ratelimit_shadow_hits_total", "Shadow rate-limit rules that would have acted", ["rule", "action"]
)
ratelimit_keys_tracked = Gauge(P + "ratelimit_keys_tracked", "Keys held by the in-process limiter", ["store"],
                               multiprocess_mode="livesum")
ratelimit_evictions = Counter(
    P + "ratelimit_evictions_total", "Live keys dropped because the in-process limiter hit its key cap"
)

# --- shared state (Redis) of rate limits and burst counts ----------------------
state_errors = Counter(
    P + "state_errors_total", "Failed calls to the shared state, by component", ["component", "backend"]
)
state_fallback_active = Gauge(
    P + "state_fallback_active", "1 while in-process state stands in for the shared state", ["component"],
    multiprocess_mode="max")
state_members = Gauge(
    P + "state_members", "Guard processes sharing the state, as last counted in Redis (each takes its share "
    "of a limit while Redis is down)", multiprocess_mode="max"
)

# --- scan: clamd client, admission gate, pressure governor, clamd health -------
scan_seconds = Histogram(
    P + "scan_seconds", "Time clamd took for one INSTREAM scan", ["result"], buckets=LATENCY_BUCKETS
)
scans = Counter(P + "scans_total", "Scans by result (clean, infected, error)", ["result"])
scan_cache = Counter(P + "scan_cache_total", "Messages whose scan answer was looked up in the cache of recent "
                     "scans (hit: clamd not asked), by result", ["result"])
scan_in_flight = Gauge(P + "scan_in_flight", "Scans running in clamd now", multiprocess_mode="livesum")
scan_waiting = Gauge(P + "scan_waiting", "Messages waiting for a scan slot", multiprocess_mode="livesum")
scan_limit = Gauge(P + "scan_concurrency_limit", "Current (adaptive, pressure-capped) scan concurrency limit",
                   multiprocess_mode="livesum")
scan_gate_refused = Counter(P + "scan_gate_refused_total", "Scan slots refused by the gate", ["reason"])
scan_deferrals = Counter(P + "scan_deferrals_total", "Mail deferred by the scan stage, by reason", ["reason"])
pressure_deferrals = Counter(
    P + "pressure_deferrals_total", "Connections and mail deferred under memory pressure, by reason", ["reason"]
)
pressure_level = Gauge(P + "pressure_level", "Memory pressure level: 0 normal, 1 soften, 2 shed",
                       multiprocess_mode="max")
pressure_sensor = Gauge(P + "pressure_sensor", "Last value read from each pressure sensor", ["sensor"])
pressure_level_changes = Counter(P + "pressure_level_changes_total", "Pressure level changes", ["level"])
clamd_up = Gauge(P + "clamd_up", "1 when clamd answers PING and scans (0 after clamd.breaker_failures failed scans "
                 "in a row, until a scan works)")
clamd_breaker_open = Gauge(P + "clamd_breaker_open", "1 while the clamd breaker answers 451 unconnected",
                           multiprocess_mode="max")
clamd_threads = Gauge(P + "clamd_threads", "clamd threads from STATS", ["state"])
clamd_queue = Gauge(P + "clamd_queue_items", "Items queued inside clamd, from STATS")
clamd_memory = Gauge(P + "clamd_memory_bytes", "clamd memory from STATS (MEMSTATS) or its RSS", ["kind"])

# --- queuewatch: MTA and Mailman queues, spool filesystems, daemons, downstreams -
QUEUE_LABELS = ["mta", "queue"]
queue_messages = Gauge(P + "queue_messages", "Messages in a watched queue", QUEUE_LABELS)
queue_oldest_age = Gauge(
    P + "queue_oldest_age_seconds", "Age of the oldest message in a watched queue (0 when empty)", QUEUE_LABELS
)
queue_frozen = Gauge(
    P + "queue_frozen_messages", "Frozen Exim messages; absent while the queue is too big to count them",
    QUEUE_LABELS,
)
queue_arrived = Counter(P + "queue_arrived_total", "Messages new to the MTA, by the queue they appeared in",
                        QUEUE_LABELS)
queue_departed = Counter(
    P + "queue_departed_total", "Messages gone from the MTA (delivered, bounced, deleted), by last queue",
    QUEUE_LABELS,
)
queue_stuck = Gauge(P + "queue_stuck", "1 when nothing left a non-empty, growing or big queue for 30m",
                    QUEUE_LABELS)
queuewatch_up = Gauge(P + "queuewatch_up", "1 when the watcher's last scan worked", ["watcher"])
queuewatch_scan_seconds = Gauge(P + "queuewatch_scan_seconds", "Duration of the watcher's last scan", ["watcher"])
mailman_runner_up = Gauge(P + "mailman_runner_up", "1 when an expected Mailman runner has a process", ["runner"])
filesystem_free_bytes = Gauge(P + "filesystem_free_bytes", "Bytes free to unprivileged writers", ["path"])
filesystem_size_bytes = Gauge(P + "filesystem_size_bytes", "Filesystem size in bytes", ["path"])
filesystem_free_inodes = Gauge(P + "filesystem_free_inodes", "Inodes free to unprivileged writers", ["path"])
filesystem_inodes = Gauge(P + "filesystem_inodes", "Inodes in the filesystem (0: no fixed inode table)", ["path"])
process_up = Gauge(P + "process_up", "1 when at least one process of an expected name runs", ["name"])
downstream_reachable = Gauge(
    P + "downstream_reachable", "1 when the downstream's last banner probe got 220", ["downstream"]
)

# --- burst detection and quarantine ------------------------------------------------
burst_active = Gauge(
    P + "burst_active", "Similar-message count in its window, for the top fingerprints now", ["rule", "fingerprint"]
)
quarantined = Counter(P + "quarantined_total", "Messages stored in the quarantine, by rule", ["rule"])
quarantine_refused = Counter(P + "quarantine_refused_total", "Quarantine writes refused (full) or failed", ["kind"])
quarantine_releases = Counter(
    P + "quarantine_releases_total", "Releases from the quarantine by any process (from its index)", ["result"]
)
quarantine_deletions = Counter(P + "quarantine_deletions_total", "Messages deleted or purged from the quarantine")
# One store every worker writes: each counts its own puts and refreshes the whole summary, so the
# largest value is the freshest.
quarantine_messages = Gauge(P + "quarantine_messages", "Messages held in the quarantine", multiprocess_mode="max")
quarantine_bytes = Gauge(P + "quarantine_bytes", "Bytes of the messages held in the quarantine",
                         multiprocess_mode="max")
quarantine_inodes = Gauge(P + "quarantine_inodes", "Files and directories the quarantine uses")
