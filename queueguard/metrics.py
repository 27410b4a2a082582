"""Every metric queueguard exports, in one place (prefix `queueguard_`).

Module-level objects on the default registry: the daemon is one process, and
tests read deltas. Sections follow the package layout; add new metrics to the
section of the part that owns them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

P = "queueguard_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- core: front ends and pipeline -------------------------------------------
connections = Counter(P + "connections_total", "Client connections accepted", ["frontend"])
connections_active = Gauge(P + "connections_active", "Client connections open now", ["frontend"])
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

# --- relay: downstream MTAs ----------------------------------------------------
downstream_up = Gauge(P + "downstream_up", "1 when the downstream answered its last attempt", ["downstream"])
downstream_latency = Histogram(
    P + "downstream_latency_seconds", "Time for a downstream to take one message", ["downstream"],
    buckets=LATENCY_BUCKETS,
)
downstream_replies = Counter(P + "downstream_replies_total", "Downstream answers by class", ["downstream", "class"])
downstream_connections = Gauge(P + "downstream_connections", "Open pooled connections", ["downstream"])
downstreams_available = Gauge(P + "downstreams_available", "Downstreams currently marked healthy", ["route"])

# --- policy --------------------------------------------------------------------
policy_reloads = Counter(P + "policy_reloads_total", "Successful policy loads")
policy_reload_failures = Counter(P + "policy_reload_failures_total", "Policy reloads refused for errors")
policy_last_success = Gauge(P + "policy_last_success_timestamp_seconds", "When the running policy was loaded")
policy_rules = Gauge(P + "policy_rules", "Rules in the running policy", ["kind"])

# --- scan: clamd client, admission gate, pressure governor, clamd health -------
scan_seconds = Histogram(
    P + "scan_seconds", "Time clamd took for one INSTREAM scan", ["result"], buckets=LATENCY_BUCKETS
)
scans = Counter(P + "scans_total", "Scans by result (clean, infected, error)", ["result"])
scan_in_flight = Gauge(P + "scan_in_flight", "Scans running in clamd now")
scan_waiting = Gauge(P + "scan_waiting", "Messages waiting for a scan slot")
scan_limit = Gauge(P + "scan_concurrency_limit", "Current (adaptive, pressure-capped) scan concurrency limit")
scan_gate_refused = Counter(P + "scan_gate_refused_total", "Scan slots refused by the gate", ["reason"])
scan_deferrals = Counter(P + "scan_deferrals_total", "Mail deferred by the scan stage, by reason", ["reason"])
pressure_level = Gauge(P + "pressure_level", "Memory pressure level: 0 normal, 1 soften, 2 shed")
pressure_sensor = Gauge(P + "pressure_sensor", "Last value read from each pressure sensor", ["sensor"])
pressure_level_changes = Counter(P + "pressure_level_changes_total", "Pressure level changes", ["level"])
clamd_up = Gauge(P + "clamd_up", "1 when clamd answered its last PING or scan")
clamd_breaker_open = Gauge(P + "clamd_breaker_open", "1 while the clamd breaker answers 451 unconnected")
clamd_threads = Gauge(P + "clamd_threads", "clamd threads from STATS", ["state"])
clamd_queue = Gauge(P + "clamd_queue_items", "Items queued inside clamd, from STATS")
clamd_memory = Gauge(P + "clamd_memory_bytes", "clamd memory from STATS (MEMSTATS) or its RSS", ["kind"])
