"""Every metric the dashboard and alert rules use is one queueguard exports, with labels it has.

Names come from the default registry after importing the modules that define metrics, and from the
collector of the supervisor's worker restarts (counters are
exposed as <name>_total, histograms as <name>_bucket/_sum/_count). `up` is Prometheus's own.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "queueguard-alerts.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "queueguard.json"
METRIC_MODULES = ("queueguard.metrics",)
PROMETHEUS_OWN = {"up"}
TARGET_LABELS = {"instance", "job"}
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
QG_NAME = re.compile(r"\bqueueguard_[a-zA-Z0-9_]+")
LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


def exported() -> dict[str, set[str]]:
    """Exposed sample name -> label names."""
    modules = [importlib.import_module(m) for m in METRIC_MODULES]
    labels: dict[str, set[str]] = {}
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                labels[obj._name] = set(obj._labelnames)
    names: dict[str, set[str]] = {}
    supervisor = importlib.import_module("queueguard.metrics").WorkerRestarts(Path("/nonexistent"))
    for family in [*REGISTRY.collect(), *supervisor.collect()]:
        if not family.name.startswith("queueguard_"):
            continue
        base = family.name
        for suffix in SUFFIXES.get(family.type, ("",)):
            own = {label for sample in family.samples for label in sample.labels}
            names[base + suffix] = labels.get(base, own) | ({"le"} if suffix == "_bucket" else set())
    return names


def rule_expressions() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [str(r["expr"]) for g in doc["groups"] for r in g["rules"]]


def dashboard_expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


def used(exprs: list[str]) -> dict[str, set[str]]:
    """Metric name -> label names used in its selectors."""
    found: dict[str, set[str]] = {}
    for expr in exprs:
        for name in QG_NAME.findall(expr):
            found.setdefault(name, set())
        for name, body in SELECTOR.findall(expr):
            found.setdefault(name, set()).update(LABEL.findall(body))
    return found


def check(exprs: list[str]) -> list[str]:
    names = exported()
    problems = []
    for name, labels in sorted(used(exprs).items()):
        if name in PROMETHEUS_OWN:
            continue
        if name not in names:
            problems.append(f"{name}: not exported by queueguard")
            continue
        unknown = labels - names[name] - TARGET_LABELS
        if unknown:
            problems.append(f"{name}: no label(s) {sorted(unknown)}; it has {sorted(names[name])}")
    return problems


def test_registry_has_queueguard_metrics() -> None:
    names = exported()
    assert "queueguard_verdicts_total" in names and "queueguard_added_latency_seconds_bucket" in names
    assert "queueguard_queue_messages" in names


def test_alert_rules_use_exported_metrics() -> None:
    exprs = rule_expressions()
    assert len(used(exprs)) > 10
    assert check(exprs) == []


def test_dashboard_uses_exported_metrics() -> None:
    exprs = dashboard_expressions()
    assert len(used(exprs)) > 20
    assert check(exprs) == []


def test_checker_catches_a_typo_and_a_wrong_label() -> None:
    assert check(["rate(queueguard_verdict_total[5m])"]) == ["queueguard_verdict_total: not exported by queueguard"]
    assert check(['queueguard_queue_messages{mta="exim", qeue="main"}'])[0].startswith(
        "queueguard_queue_messages: no label(s) ['qeue']")


def test_dashboard_datasource_is_a_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in dash["templating"]["list"])
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# Where every label's values come from. /metrics is open to anyone who can reach the listener
# (docs/settings.md#status), so no label may carry mail data: an address, a local part, a subject.
# A new label name fails the test below until it is added here with its source.
LABEL_SOURCES = {
    "frontend": "fixed: smtp, milter, policy",
    "stage": "fixed pipeline and front-end stage names",
    "action": "fixed verdict and rule actions",
    "reason": "fixed reason strings (test_docs lists every one)",
    "rule": "policy rule names or route names (both [A-Za-z0-9_.-]), or fixed scan names",
    "kind": "fixed: rule kinds, protocol error kinds, quarantine refusals, clamd memory kinds",
    "mode": "enforce or shadow",
    "downstream": "a downstream's host:port from the settings",
    "class": "reply class: 2xx to 5xx",
    "route": "route names from the settings ([A-Za-z0-9_.-])",
    "result": "fixed results",
    "store": "fixed state store names",
    "backend": "fixed state backend names",
    "component": "fixed: the checks that keep shared state (ratelimit, burst)",
    "sensor": "fixed pressure sensor names",
    "level": "normal, soften or shed",
    "state": "clamd thread states from STATS",
    "mta": "exim, postfix or mailman",
    "queue": "the MTA's queue directory names",
    "watcher": "fixed watcher names",
    "runner": "Mailman runner names from the settings",
    "path": "filesystem paths from the settings",
    "name": "process names from the settings",
    "fingerprint": "hashes: s:/u:/a: or bNN: and hex digits, never the text they were made from",
}


def test_every_label_has_a_known_source_that_is_not_mail() -> None:
    import queueguard.metrics as m

    labelled = {obj._name: set(obj._labelnames) for obj in vars(m).values() if isinstance(obj, MetricWrapperBase)}
    assert len(labelled) > 50
    unknown = {name: sorted(extra) for name, labels in labelled.items() if (extra := labels - set(LABEL_SOURCES))}
    assert unknown == {}, "new metric labels: say in LABEL_SOURCES where their values come from"


def test_burst_fingerprint_labels_are_hashes() -> None:
    """The one label fed from message content: the subject, URL hosts and body only as hashes."""
    from queueguard.burst.fingerprint import fingerprints
    from queueguard.mime import parse_message

    raw = (b"From: bulk@client.example\r\nTo: info@example.org\r\nSubject: Win a MINI Cooper, info@example.org\r\n"
           b"\r\nDear info@example.org, click http://win.example.net/x now to claim the car you won today.\r\n")
    fps = fingerprints(parse_message(raw))
    keys = [k for kind in ("body", "subject", "url_hosts", "attachment") for k in fps.keys(kind)]
    assert len(keys) > 2
    assert all(re.fullmatch(r"(s|u|a|b\d\d):[0-9a-f]+", k) for k in keys), keys
