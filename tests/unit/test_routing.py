"""Router: recipient → route, route split, per-route caps, pressure from the host behind a route.

The clock is injected (a list the test moves). Pressure sources here are small
in-test objects standing in for Redis / HTTP (the real ones are exercised in
tests/integration/test_routes_pressure.py); the report parsing they share is
tested on its own below.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from queueguard import metrics
from queueguard.model import Connection, Transaction
from queueguard.policy.schema import Policy
from queueguard.pressure.governor import Governor
from queueguard.pressure.publish import (
    LevelFile,
    PressurePublisher,
    parse_level,
    parse_report,
    publisher_from_settings,
    queue_total,
    report_from_status,
    worst,
)
from queueguard.routing import PressureReport, Router, next_level, route_cap
from queueguard.settings import Route, RoutePressure, Settings, SettingsError, load_settings
from queueguard.stage import RcptContext
from queueguard.verdict import Action
from tests.unit.pressure.test_governor import Clock as GovClock
from tests.unit.pressure.test_governor import FakeSensor

DS = [{"address": "127.0.0.1:2600"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Stands in for a Redis key / HTTP status: returns `report`, or raises `error`."""

    def __init__(self) -> None:
        self.report: PressureReport | None = None
        self.error: Exception | None = None

    async def read(self) -> PressureReport | None:
        if self.error is not None:
            raise self.error
        return self.report


def policy(**lists: list[str]) -> Policy:
    return Policy.model_validate({"lists": lists})


def make_router(routes: dict[str, Any], pol: Policy | None = None, clock: Clock | None = None,
                state: str = "redis://127.0.0.1:1/0") -> tuple[Router, Clock]:
    clock = clock or Clock()
    current = pol or policy(ticket_addresses=["info@example.org", "*@tickets.example.org"])
    settings = Settings.model_validate({"routes": routes, "state": state})
    return Router(settings, lambda: current, clock=clock), clock


def txn() -> Transaction:
    return Transaction(Connection(None), "sender@example.net")


async def rcpt(router: Router, t: Transaction, recipient: str) -> tuple[Action, int, str, str]:
    """Run the check, and on acceptance pin the route as the pipeline's relay step does."""
    result = await router.on_rcpt(RcptContext(t, recipient, router.policy()))
    v = result.verdict
    if v is None:
        if t.route is None:
            t.route = router.route_for(recipient)
        t.recipients.append(recipient)
        return Action.ACCEPT, 250, "", ""
    return v.action, v.code, v.status, v.text


def deferrals(route: str, reason: str) -> float:
    return float(metrics.route_deferrals.labels(route, reason)._value.get())


# --- matching ------------------------------------------------------------------------


def test_recipients_match_lists_addresses_globs_and_domains() -> None:
    router, _ = make_router({
        "tickets": {"downstreams": DS, "recipients": ["ticket_addresses", "help@example.org"]},
        "lists": {"downstreams": DS, "recipients": ["lists.example.org"]},
        "exact_domain": {"downstreams": DS, "recipients": ["@only.example.com"]},
    })
    assert router.route_for("info@example.org") == "tickets"  # from the policy list
    assert router.route_for("<Info@EXAMPLE.org>") == "tickets"  # case and brackets
    assert router.route_for("anyone@tickets.example.org") == "tickets"  # glob in the list
    assert router.route_for("help@example.org") == "tickets"  # inline address
    assert router.route_for("x@lists.example.org") == "lists"  # bare domain ...
    assert router.route_for("x@sub.lists.example.org") == "lists"  # ... and its subdomains
    assert router.route_for("x@only.example.com") == "exact_domain"
    assert router.route_for("x@sub.only.example.com") == "default"  # @domain is that domain only
    assert router.route_for("bob@example.org") == "default"
    assert router.route_for("info@example.org.evil.test") == "default"


def test_first_route_in_settings_order_wins() -> None:
    router, _ = make_router({
        "a": {"downstreams": DS, "recipients": ["info@example.org"]},
        "b": {"downstreams": DS, "recipients": ["example.org"]},
    })
    assert router.route_for("info@example.org") == "a"
    assert router.route_for("other@example.org") == "b"


def test_a_reloaded_policy_list_moves_recipients() -> None:
    current = [policy(ticket_addresses=["info@example.org"])]
    settings = Settings.model_validate({"routes": {"tickets": {"downstreams": DS, "recipients": ["ticket_addresses"]}}})
    router = Router(settings, lambda: current[0], clock=Clock())
    assert router.route_for("help@example.org") == "default"
    current[0] = policy(ticket_addresses=["help@example.org"])
    assert router.route_for("help@example.org") == "tickets"
    assert router.route_for("info@example.org") == "default"


def test_an_entry_that_is_neither_list_nor_address_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    router, _ = make_router({"tickets": {"downstreams": DS, "recipients": ["ticket_adresses"]}},
                            pol=policy(ticket_addresses=["info@example.org"]))
    with caplog.at_level(logging.WARNING, "queueguard.routing"):
        assert router.route_for("info@example.org") == "default"
    assert "'ticket_adresses' is neither a list in the policy" in caplog.text


# --- one route per transaction --------------------------------------------------------


async def test_a_recipient_for_another_route_gets_452_4_5_3() -> None:
    router, _ = make_router({"tickets": {"downstreams": DS, "recipients": ["ticket_addresses"]}})
    before = deferrals("tickets", "split")
    t = txn()
    assert (await rcpt(router, t, "alice@example.org"))[0] is Action.ACCEPT
    action, code, status, text = await rcpt(router, t, "info@example.org")
    assert (action, code, status) == (Action.TEMPFAIL, 452, "4.5.3")
    assert "separate transaction" in text and "route:tickets" in text
    assert (await rcpt(router, t, "bob@example.org"))[0] is Action.ACCEPT  # same route goes on
    assert deferrals("tickets", "split") == before + 1
    # and the other way round: a transaction started on tickets refuses default recipients
    t2 = txn()
    assert (await rcpt(router, t2, "info@example.org"))[0] is Action.ACCEPT
    assert (await rcpt(router, t2, "alice@example.org"))[1:3] == (452, "4.5.3")


# --- caps ---------------------------------------------------------------------------


async def test_concurrency_cap_defers_new_transactions_until_one_ends() -> None:
    router, _ = make_router({"tickets": {"downstreams": DS, "recipients": ["ticket_addresses"], "max_concurrent": 2}})
    before = deferrals("tickets", "concurrency")
    a, b, c = txn(), txn(), txn()
    assert (await rcpt(router, a, "info@example.org"))[0] is Action.ACCEPT
    assert (await rcpt(router, b, "info@example.org"))[0] is Action.ACCEPT
    action, code, status, text = await rcpt(router, c, "info@example.org")
    assert (action, code, status) == (Action.TEMPFAIL, 451, "4.3.2")
    assert "limit of 2 concurrent transactions" in text
    assert deferrals("tickets", "concurrency") == before + 1
    # a transaction already on the route adds recipients at the cap
    assert (await rcpt(router, a, "x@tickets.example.org"))[0] is Action.ACCEPT
    assert metrics.route_active.labels("tickets")._value.get() == 2
    # other routes are not capped by it
    assert (await rcpt(router, txn(), "alice@example.org"))[0] is Action.ACCEPT
    await router.on_end(a, False)
    assert metrics.route_active.labels("tickets")._value.get() == 1
    assert (await rcpt(router, c, "info@example.org"))[0] is Action.ACCEPT


async def test_per_minute_cap_with_a_moving_clock_and_refunds_for_undelivered() -> None:
    router, clock = make_router({"tickets": {"downstreams": DS, "recipients": ["ticket_addresses"],
                                             "max_per_minute": 3}})
    delivered = []
    for _ in range(2):
        t = txn()
        assert (await rcpt(router, t, "info@example.org"))[0] is Action.ACCEPT
        t.downstream = "127.0.0.1:2600"  # reached DATA downstream
        await router.on_end(t, True)
        delivered.append(t)
        clock.now += 10
    refused = txn()
    assert (await rcpt(router, refused, "info@example.org"))[0] is Action.ACCEPT
    await router.on_end(refused, False)  # never reached DATA downstream: its place is given back
    third = txn()
    assert (await rcpt(router, third, "info@example.org"))[0] is Action.ACCEPT
    third.downstream = "x"
    await router.on_end(third, False)
    action, code, status, text = await rcpt(router, txn(), "info@example.org")
    assert (action, code, status) == (Action.TEMPFAIL, 451, "4.7.1")
    assert "limit of 3 messages per minute" in text
    clock.now = 1000.0 + 60.0  # the first admission leaves the window
    assert (await rcpt(router, txn(), "info@example.org"))[0] is Action.ACCEPT
    assert next(s for s in router.status() if s["route"] == "tickets")["last_minute"] == 3


async def test_an_admission_that_never_pinned_the_route_moves_with_the_next_rcpt() -> None:
    router, _ = make_router({"tickets": {"downstreams": DS, "recipients": ["ticket_addresses"], "max_concurrent": 1}})
    t = txn()
    # admitted, but a later check (say, the scan stage) deferred it, so the relay never pinned a route
    assert (await router.on_rcpt(RcptContext(t, "info@example.org", router.policy()))).verdict is None
    assert metrics.route_active.labels("tickets")._value.get() == 1
    assert (await rcpt(router, t, "alice@example.org"))[0] is Action.ACCEPT
    assert metrics.route_active.labels("tickets")._value.get() == 0
    assert (await rcpt(router, txn(), "info@example.org"))[0] is Action.ACCEPT


# --- pressure ---------------------------------------------------------------------------


def pressure_router(on_missing: str = "keep", **route: Any) -> tuple[Router, Clock, Source]:
    spec = {"downstreams": DS, "recipients": ["ticket_addresses"], "max_concurrent": 4,
            "pressure": {"source": "redis", "name": "ticket1", "stale_after": "30s", "on_missing": on_missing},
            **route}
    router, clock = make_router({"tickets": spec})
    source = Source()
    router.readers["tickets"] = source
    return router, clock, source


async def test_shed_defers_new_transactions_only_and_clears() -> None:
    router, _, source = pressure_router()
    open_txn = txn()
    assert (await rcpt(router, open_txn, "info@example.org"))[0] is Action.ACCEPT
    source.report = PressureReport("shed", queue=812, node="ticket1")
    assert await router.poll_once("tickets") == "shed"
    assert metrics.route_pressure.labels("tickets")._value.get() == 2
    assert metrics.route_reported_queue.labels("tickets")._value.get() == 812
    action, code, status, text = await rcpt(router, txn(), "info@example.org")
    assert (action, code, status) == (Action.TEMPFAIL, 451, "4.3.2")
    assert "under memory pressure" in text and "route:tickets" in text
    assert (await rcpt(router, open_txn, "x@tickets.example.org"))[0] is Action.ACCEPT  # already admitted
    assert (await rcpt(router, txn(), "alice@example.org"))[0] is Action.ACCEPT  # other routes unaffected
    source.report = PressureReport("normal")
    assert await router.poll_once("tickets") == "normal"
    assert (await rcpt(router, txn(), "info@example.org"))[0] is Action.ACCEPT


async def test_soften_lowers_the_cap() -> None:
    router, _, source = pressure_router(soften_concurrent=1)
    source.report = PressureReport("soften")
    await router.poll_once("tickets")
    assert (await rcpt(router, txn(), "info@example.org"))[0] is Action.ACCEPT
    _, code, status, text = await rcpt(router, txn(), "info@example.org")
    assert (code, status) == (451, "4.3.2") and "limit of 1 concurrent" in text and "memory pressure" in text


def test_route_cap_by_level() -> None:
    spec = Route.model_validate({"downstreams": DS, "max_concurrent": 5})
    assert route_cap(spec, "normal") == 5 and route_cap(spec, "soften") == 2
    assert route_cap(Route.model_validate({"downstreams": DS, "max_concurrent": 1}), "soften") == 1
    assert route_cap(Route.model_validate({"downstreams": DS, "max_concurrent": 5, "soften_concurrent": 3}),
                     "soften") == 3
    assert route_cap(Route.model_validate({"downstreams": DS}), "soften") is None


def test_next_level_holds_a_report_until_stale_then_applies_on_missing() -> None:
    p = RoutePressure(name="t", stale_after=30, on_missing="keep")
    assert next_level("normal", "shed", 100, 100, p) == "shed"
    assert next_level("shed", None, 120, 100, p) == "shed"  # a missed read does not flap
    assert next_level("shed", None, 131, 100, p) == "normal"  # keep: the configured caps
    assert next_level("normal", None, 0, None, p) == "normal"  # never seen
    shed = RoutePressure(name="t", stale_after=30, on_missing="shed")
    assert next_level("normal", None, 131, 100, shed) == "shed"
    assert next_level("normal", None, 0, None, shed) == "shed"


async def test_missing_report_applies_on_missing_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    router, clock, source = pressure_router(on_missing="keep")
    source.report = PressureReport("shed")
    await router.poll_once("tickets")
    source.report = None  # the publisher's key expired
    clock.now += 10
    assert await router.poll_once("tickets") == "shed"  # within stale_after: the last report holds
    with caplog.at_level(logging.INFO, "queueguard.routing"):
        for _ in range(5):
            clock.now += 25
            assert await router.poll_once("tickets") == "normal"
    assert caplog.text.count("missing or stale") == 1
    source.report = PressureReport("soften")
    with caplog.at_level(logging.INFO, "queueguard.routing"):
        assert await router.poll_once("tickets") == "soften"
    assert "pressure report back: soften" in caplog.text


async def test_failing_source_logs_once_and_on_missing_shed_defers(caplog: pytest.LogCaptureFixture) -> None:
    router, clock, source = pressure_router(on_missing="shed")
    source.error = ConnectionError("Connection refused")
    with caplog.at_level(logging.INFO, "queueguard.routing"):
        for _ in range(4):
            assert await router.poll_once("tickets") == "shed"
            clock.now += 1
    assert caplog.text.count("pressure source failed") == 1
    assert (await rcpt(router, txn(), "info@example.org"))[1:3] == (451, "4.3.2")
    source.error, source.report = None, PressureReport("normal")
    with caplog.at_level(logging.INFO, "queueguard.routing"):
        assert await router.poll_once("tickets") == "normal"
    assert "answers again" in caplog.text


# --- settings: bad input gets a clear answer ---------------------------------------------


@pytest.mark.parametrize(("doc", "message"), [
    ({"routes": {"default": {"downstreams": DS}}}, "'default' is the route of the top-level downstreams"),
    ({"routes": {"t": {"downstreams": []}}}, "routes.t.downstreams"),
    ({"routes": {"t": {"downstreams": DS, "pressure": {"name": "x"}}}}, "set state to a redis:// URL"),
    ({"routes": {"t": {"downstreams": DS, "pressure": {"source": "redis"}}}}, "needs pressure.name"),
    ({"routes": {"t": {"downstreams": DS, "pressure": {"source": "http"}}}}, "needs pressure.url"),
    ({"routes": {"t": {"downstreams": DS, "pressure": {"source": "http", "url": "ftp://x"}}}}, "needs pressure.url"),
    ({"routes": {"t": {"downstreams": DS, "max_concurrent": 2, "soften_concurrent": 3}}},
     "soften_concurrent must not exceed"),
    ({"routes": {"t": {"downstreams": DS, "max_concurrent": 0}}}, "greater than or equal to 1"),
    ({"routes": {"t": {"downstreams": DS, "pressure": {"source": "http", "url": "http://x/", "interval": 0}}}},
     "greater than 0"),
    ({"routes": {"t": {"downstreams": DS, "pressure": {"source": "http", "url": "http://x/",
                                                        "on_missing": "panic"}}}}, "on_missing"),
    ({"publish_pressure": {"interval": "soon"}}, "bad duration"),
    ({"publish_pressure": {"nmae": "x"}}, "publish_pressure.nmae"),
])
def test_bad_route_settings_are_refused_with_a_reason(tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    path = tmp_path / "qg.yaml"
    path.write_text(json.dumps(doc))
    with pytest.raises(SettingsError) as e:
        load_settings(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_shipped_route_settings_files_load() -> None:
    repo = Path(__file__).resolve().parents[2]
    mx = load_settings(repo / "contrib" / "routes" / "mx.yaml")
    ticket = load_settings(repo / "contrib" / "routes" / "ticket.yaml")
    assert mx.routes["tickets"].pressure is not None and ticket.publish_pressure is not None
    assert mx.routes["tickets"].pressure.name == (ticket.publish_pressure.name or ticket.node)


# --- the report format ----------------------------------------------------------------------


def test_parse_report_and_its_errors() -> None:
    assert parse_report({"level": "shed", "queue": 3, "node": "t1"}, "x") == PressureReport("shed", 3, "t1")
    assert parse_report({"level": "normal", "queue": None}, "x") == PressureReport("normal")
    for bad, why in [([], "not a JSON object"), ({"level": "panic"}, "is not one of"),
                     ({"level": "shed", "queue": -1}, "non-negative"), ({"level": "shed", "queue": True}, "queue")]:
        with pytest.raises(ValueError, match=why):
            parse_report(bad, "redis qg:pressure:t1")


def test_report_from_status_prefers_the_published_report_then_the_governor() -> None:
    assert report_from_status({"published_pressure": {"level": "soften", "queue": 7},
                               "pressure": {"level": "normal"}}, "u") == \
        PressureReport("soften", 7)
    assert report_from_status({"published_pressure": None, "pressure": {"level": "shed", "reason": "psi"}},
                              "u") == PressureReport("shed")
    with pytest.raises(ValueError, match="no 'published_pressure' or 'pressure'"):
        report_from_status({"pressure": None, "scan": {"level": "shed"}}, "u")


def test_levels_and_queue_totals() -> None:
    assert worst("normal", None) == "normal" and worst("soften", "shed") == "shed" and worst(None) == "normal"
    assert parse_level(" Shed\n") == "shed" and parse_level("") is None
    with pytest.raises(ValueError, match="not one of normal, soften, shed"):
        parse_level("drain")
    assert queue_total({"time": None, "queues": []}) is None
    assert queue_total({"time": 1.0, "queues": [{"messages": 3}, {"messages": 4}]}) == 7


def test_level_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = LevelFile(tmp_path / "force")
    assert f.read() is None  # no file: no say
    f.path.write_text("shed\n")
    assert f.read() == "shed"
    f.path.write_text("shedd\n")
    with caplog.at_level(logging.WARNING, "queueguard.pressure"):
        assert f.read() is None and f.read() is None
    assert caplog.text.count("ignored") == 1 and "'shedd' is not one of" in caplog.text


def test_publisher_report_takes_the_worse_of_governor_and_file(tmp_path: Path) -> None:
    level = ["normal"]
    pub = PressurePublisher("ticket1", level=lambda: level[0], reason=lambda: "psi_memory",
                            queue=lambda: 5, level_file=LevelFile(tmp_path / "force"), interval=2, clock=lambda: 7.0)
    assert pub.ttl == 6
    r = pub.report()
    assert (r["level"], r["forced"], r["queue"], r["node"], r["time"]) == ("normal", None, 5, "ticket1", 7.0)
    (tmp_path / "force").write_text("shed")
    r = pub.report()
    assert (r["level"], r["governor"], r["reason"]) == ("shed", "normal", f"forced by {tmp_path / 'force'}")
    level[0] = "shed"
    assert pub.report()["reason"] == "psi_memory"
    assert parse_report(json.loads(json.dumps(pub.report())), "roundtrip").level == "shed"


def test_publisher_reports_the_hosts_governor(tmp_path: Path) -> None:
    settings = Settings.model_validate({"publish_pressure": {"name": "t1", "interval": 1}})
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 50.0)
    governor = Governor([psi], clock=GovClock(), interval=0)
    quiet = Policy.model_validate({"pressure": {"psi_memory_some_avg10": None}})
    pub = publisher_from_settings(settings, lambda: quiet, governor)
    assert pub is not None and pub.redis is None  # state: memory → HTTP status only
    assert pub.report()["level"] == "normal"
    loud = Policy.model_validate({"pressure": {"psi_memory_some_avg10": {"soften": 10, "shed": 40}}})
    assert publisher_from_settings(settings, lambda: loud, governor).report()["level"] == "shed"  # type: ignore[union-attr]
    assert publisher_from_settings(Settings(), lambda: quiet, governor) is None
