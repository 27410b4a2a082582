"""/metrics carries no addresses: real mail through a real `queueguard serve`, then a real scrape.

The traffic touches every labelled path that mail can reach: a recipient rate limit that defers,
a burst that quarantines, a route chosen by recipient, an address the proxy refuses, a downstream
that answers. Every label value of every sample is then checked for an `@` and for the local parts
used. The same guard's /status.json does show those recipients, but only with its token.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from tests.integration.test_status_page import POLICY_FOR_LIVE_PAGE, flood_and_wave

pytestmark = pytest.mark.integration

SENDER_LIMIT = """
ratelimits:
  - name: per-sender
    key: sender
    rate: 100/1h
    burst: 100
    action: tempfail
"""
LOCAL_PARTS = ("flooded-recipient", "wave-target", "ticket-user", "bulk-sender", "broken")


def test_no_address_in_any_metric_label(tmp_path: Path) -> None:
    token = secrets.token_hex(32)
    token_file = tmp_path / "status-token"
    token_file.write_text(token)
    with RecordingSink() as sink, RecordingSink() as tickets:
        settings = {
            "downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
            "routes": {"tickets": {"recipients": ["*@tickets.example.org"],
                                   "downstreams": [{"address": f"127.0.0.1:{tickets.port}"}]}},
            "status": {"token_file": str(token_file)},
        }
        with Guard(settings, {"policy.yaml": POLICY_FOR_LIVE_PAGE, "sender.yaml": SENDER_LIMIT}) as g:
            with g.smtp() as c:
                deferred = flood_and_wave(c, "flooded-recipient@example.org", "wave-target")
                c.sendmail("bulk-sender@client.example", ["ticket-user@tickets.example.org"],
                           b"Subject: my printer\r\n\r\nit is broken\r\n")
                c.mail("bulk-sender@client.example")
                assert c.docmd("RCPT TO:<broken>")[0] == 501  # no domain: our syntax check, not aiosmtpd's
                c.rset()
            scrape = g.metrics_text()
            status_json = urllib.request.Request(f"http://127.0.0.1:{g.metrics_port}/status.json",
                                                 headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(status_json, timeout=5) as r:
                status = json.loads(r.read())
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{g.metrics_port}/status.json", timeout=5)
    assert refused.value.code == 401

    # the traffic really went down the labelled paths ...
    assert deferred == 3
    assert g_metric(scrape, "queueguard_ratelimit_hits_total", rule="flood-to-one-address") >= 3
    assert g_metric(scrape, "queueguard_quarantined_total", rule="same-message-wave") >= 3
    assert g_metric(scrape, "queueguard_protocol_errors_total", kind="bad_address") >= 1
    assert g_metric(scrape, "queueguard_downstream_replies_total", downstream=f"127.0.0.1:{tickets.port}") >= 1
    assert any(r["route"] == "tickets" for r in status["routes"])
    # ... the status page has the recipients (behind the token) ...
    assert "flooded-recipient@example.org" in json.dumps(status)
    # ... and no label value of any sample has an address or a local part of one
    values = {v for family in text_string_to_metric_families(scrape) for s in family.samples for v in s.labels.values()}
    assert len(values) > 20
    leaks = sorted(v for v in values if "@" in v or any(p in v for p in LOCAL_PARTS))
    assert leaks == []


def g_metric(scrape: str, name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels`."""
    return sum(s.value for family in text_string_to_metric_families(scrape) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
