"""Evaluate the shipped alert rules over a recorded series with promtool.

Time is compressed: scrape i is written as minute i of a `promtool test rules`
input series (interval 1m), so a replay that scrapes every half second shows in
half a minute what 30 minutes of an incident show to Prometheus. Prometheus
itself (promtool's engine) evaluates the rules; nothing here re-implements PromQL.

Two promtool runs per question:
- a *probe*: one expectation per minute that can never match, so promtool's
  failure report lists, minute by minute, which alerts actually fired (and with
  which labels and annotations);
- a *witness*: a small test file that expects the alert quiet one minute before
  it fired and firing (exact labels and annotations) at that minute; it passes,
  and it is kept next to the replay's JSON so a person can rerun it.
Running the probe also over a copy of the rules with `for:` removed gives the
minute the alert's condition first held, so "fired within its for: window" is
measured: fired_at - condition_from == for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from queueguard.policy.units import parse_duration
from queueguard.replay.scrape import Scrape, SeriesKey

SENTINEL = "replay_probe"
Fired = list[tuple[dict[str, str], dict[str, str]]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise RuntimeError("promtool missing: install Debian's prometheus package (./setup.sh --no-run does)")
    return path


def rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def metric_names(path: Path) -> set[str]:
    """Every queueguard metric the rules read: what a recorder must keep."""
    return {m for r in rules(path) for m in re.findall(r"\bqueueguard_[a-z_]+", str(r["expr"]))}


def for_minutes(path: Path, alert: str) -> float:
    for r in rules(path):
        if r["alert"] == alert:
            return parse_duration(str(r.get("for", "0s"))) / 60
    raise KeyError(alert)


def _series_text(name: str, labels: Iterable[tuple[str, str]]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels)
    return f"{name}{{{inner}}}"


def input_series(scrapes: Sequence[Scrape], *, instance: str = "replay",
                 job: str = "queueguard") -> list[dict[str, str]]:
    """promtool input_series: one entry per recorded series, `_` where a scrape had no sample;
    plus `up`, 1 for each successful scrape and 0 for a failed one."""
    keys: dict[SeriesKey, None] = {}
    for s in scrapes:
        for key in s.samples or {}:
            keys.setdefault(key)
    extra = (("instance", instance), ("job", job))
    out = []
    for name, labels in keys:
        values = []
        for s in scrapes:
            v = None if s.samples is None else s.samples.get((name, labels))
            values.append("_" if v is None else f"{v:g}")
        out.append({"series": _series_text(name, sorted(dict(labels + extra).items())), "values": " ".join(values)})
    up = " ".join("0" if s.samples is None else "1" for s in scrapes)
    out.append({"series": _series_text("up", extra), "values": up})
    return out


def _minutes(text: str) -> int:
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)([hms])", text):
        total += float(n) * {"h": 60, "m": 1, "s": 1 / 60}[unit]
    return round(total)


def _labels(text: str) -> dict[str, str]:
    return {k: v.encode().decode("unicode_escape") for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text)}


def parse_failures(output: str) -> dict[tuple[str, int], Fired]:
    """(alert, minute) -> alerts promtool got, from a failed `promtool test rules` report."""
    out: dict[tuple[str, int], Fired] = {}
    blocks = re.split(r"\n\s*alertname: ", "\n" + output)
    for block in blocks[1:]:
        head = re.match(r"(\w+), time: ([0-9hms.]+)", block)
        if head is None:
            continue
        got = block.split("got:", 1)[1] if "got:" in block else ""
        fired = [(_labels(lab), _labels(ann)) for lab, ann in
                 re.findall(r"Labels:(\{.*?\})\s*Annotations:(\{.*?\})", got, re.S)]
        out[(head.group(1), _minutes(head.group(2)))] = fired
    return out


def _run(test_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), "test", "rules", test_file.name], cwd=test_file.parent,
                          capture_output=True, text=True, timeout=300, check=False)


def _write_test(path: Path, rules_name: str, series: list[dict[str, str]], checks: list[dict[str, Any]]) -> None:
    doc = {"rule_files": [rules_name], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=100_000))


def _without_for(src: Path, dst: Path) -> None:
    doc = yaml.safe_load(src.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))


def probe(rules_file: Path, series: list[dict[str, str]], alerts: Sequence[str], minutes: int,
          workdir: Path) -> dict[str, dict[int, Fired]]:
    """alert -> minute -> what fired at that minute (every minute 0..minutes-1)."""
    test = workdir / f"probe-{rules_file.stem}.test.yml"
    checks = [{"eval_time": f"{m}m", "alertname": a, "exp_alerts": [{"exp_labels": {SENTINEL: "1"}}]}
              for a in alerts for m in range(minutes)]
    _write_test(test, rules_file.name, series, checks)
    res = _run(test)
    failures = parse_failures(res.stdout + res.stderr)
    if res.returncode == 0 or not failures:
        raise RuntimeError(f"promtool probe gave no report:\n{res.stdout}{res.stderr}")
    return {a: {m: failures.get((a, m), []) for m in range(minutes)} for a in alerts}


@dataclass
class AlertOutcome:
    alert: str
    for_minutes: float
    condition_from: int | None
    """First minute the rule's expression held (pending began)."""
    fired_at: int | None
    labels: dict[str, str]
    witness: Path | None = None
    witness_ok: bool = False

    @property
    def within_for(self) -> bool:
        """Fired, and no later than `for:` (plus one evaluation) after its condition began."""
        return (self.fired_at is not None and self.condition_from is not None
                and self.fired_at - self.condition_from <= self.for_minutes + 1)

    def describe(self) -> str:
        if self.fired_at is None:
            return f"{self.alert}: did not fire (condition from minute {self.condition_from})"
        return (f"{self.alert} ({_severity(self.labels)}): condition from minute {self.condition_from}, "
                f"fired at minute {self.fired_at} (for: {self.for_minutes:g}m); promtool witness "
                f"{'passes' if self.witness_ok else 'FAILS'}")

    def as_dict(self) -> dict[str, Any]:
        return {"alert": self.alert, "for_minutes": self.for_minutes, "condition_from": self.condition_from,
                "fired_at": self.fired_at, "labels": self.labels, "within_for": self.within_for,
                "witness": str(self.witness) if self.witness else None, "witness_ok": self.witness_ok}


def _severity(labels: dict[str, str]) -> str:
    return labels.get("severity", "?")


def _first(fired: dict[int, Fired], match: dict[str, str]) -> int | None:
    for minute in sorted(fired):
        if any(all(lab.get(k) == v for k, v in match.items()) for lab, _ in fired[minute]):
            return minute
    return None


def evaluate(rules_file: Path, scrapes: Sequence[Scrape], alerts: Sequence[str], workdir: Path,
             match: Mapping[str, dict[str, str]] | None = None, *, instance: str = "replay") -> list[AlertOutcome]:
    """For each alert: when its condition began, when it fired, and a passing witness test file.

    `match` narrows, per alert, which firing counts (e.g. {"QueueguardQueueStuck": {"mta": "exim"}}).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    rules_copy = workdir / "queueguard-alerts.yml"
    shutil.copyfile(rules_file, rules_copy)
    no_for = workdir / "queueguard-alerts-nofor.yml"
    _without_for(rules_file, no_for)
    series = input_series(scrapes, instance=instance)
    minutes = len(scrapes)
    fired = probe(rules_copy, series, alerts, minutes, workdir)
    pending = probe(no_for, series, alerts, minutes, workdir)
    out = []
    for alert in alerts:
        want = (match or {}).get(alert, {})
        fired_at = _first(fired[alert], want)
        outcome = AlertOutcome(alert, for_minutes(rules_file, alert), _first(pending[alert], want), fired_at, {})
        if fired_at is not None:
            outcome.labels = next(lab for lab, _ in fired[alert][fired_at]
                                  if all(lab.get(k) == v for k, v in want.items()))
            witness = workdir / f"witness-{alert}.test.yml"
            everything = [{"exp_labels": {k: v for k, v in lab.items() if k != "alertname"},
                           "exp_annotations": ann} for lab, ann in fired[alert][fired_at]]
            checks: list[dict[str, Any]] = [{"eval_time": f"{fired_at}m", "alertname": alert, "exp_alerts": everything}]
            before = fired[alert].get(fired_at - 1)
            if before is not None and not before:
                checks.insert(0, {"eval_time": f"{fired_at - 1}m", "alertname": alert, "exp_alerts": []})
            _write_test(witness, rules_copy.name, series, checks)
            res = _run(witness)
            outcome.witness, outcome.witness_ok = witness, res.returncode == 0
        out.append(outcome)
    return out
