"""The shipped alert rules: promtool validates them and runs their unit tests; every alert is complete."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "queueguard-alerts.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "queueguard-alerts.test.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: ./setup.sh --no-run installs Debian's prometheus package"
    return path


def alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    res = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in res.stdout


def test_promtool_rule_unit_tests() -> None:
    res = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                         timeout=120, cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_severity_summary_and_a_runbook() -> None:
    names = []
    for rule in alerts():
        name = str(rule["alert"])
        names.append(name)
        labels = rule.get("labels")
        annotations = rule.get("annotations")
        assert isinstance(labels, dict) and labels.get("severity") in ("page", "ticket"), name
        assert isinstance(annotations, dict) and annotations.get("summary"), name
        assert annotations.get("runbook_url") == f"docs/runbooks/{name}.md", name
        runbook = (REPO / "docs" / "runbooks" / f"{name}.md").read_text()
        for heading in ("## What it means", "## How to confirm", "## What to do", "## What not to do"):
            assert heading in runbook, f"{name}.md lacks {heading!r}"
    assert len(names) == len(set(names))
    required = {
        "QueueguardMtaQueueHigh", "QueueguardQueueStuck", "QueueguardOldestMessageTooOld",
        "QueueguardMailmanOutQueueHigh", "QueueguardMailmanRunnerMissing", "QueueguardClamdDown",
        "QueueguardFilesystemSpaceLow", "QueueguardFilesystemInodesLow", "QueueguardFilesystemFillingUp",
        "QueueguardDownstreamsAllDown", "QueueguardMemoryPressureDeferrals", "QueueguardPolicyReloadFailed",
        "QueueguardAbsent",
    }
    assert required <= set(names)


def test_every_alert_is_tested_firing_and_quiet() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alerts()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"
