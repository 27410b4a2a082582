"""ScanCheck decisions that need no running clamd: the gate's cap under pressure (injected
sensor), size limits, and the breaker against a clamd socket that does not exist (a real
connect failure, not a mock). Scanning with real clamd: tests/integration/test_scan_clamd.py.
Pressure deferrals themselves: tests/unit/pressure/test_admission.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from queueguard.mime import parse_message
from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.pressure.governor import Governor
from queueguard.resolve import resolve
from queueguard.scan.check import ScanCheck, gate_config, share_of, threads_cap
from queueguard.scan.clamd import ClamdStats, ScanError, ScanResult
from queueguard.scan.health import BreakerState
from queueguard.settings import ClamdSettings
from queueguard.stage import MessageContext, StageResult
from tests.unit.pressure.test_governor import Clock, FakeSensor

HEADER = "X-Queueguard-Scan"


def policy(pressure: dict[str, Any] | None = None, **scan: Any) -> Policy:
    base: dict[str, Any] = {"psi_memory_some_avg10": {"soften": 10, "shed": 40}, "hold": "10s"}
    base.update(pressure or {})
    return Policy.model_validate({"scan": scan, "pressure": base})


def txn(*hits: RuleHit) -> Transaction:
    t = Transaction(Connection(parse_ip("192.0.2.1")), "a@sender.example")
    t.hits.extend(hits)
    return t


def make(tmp_path: Path, **settings: Any) -> tuple[ScanCheck, FakeSensor, Clock]:
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 0.0)
    clock = Clock()
    cfg = ClamdSettings(enabled=True, address=str(tmp_path / "no-clamd.sock"), **settings)
    return ScanCheck(cfg, Governor([psi], clock=clock, interval=0), clock=clock), psi, clock


def msg(t: Transaction, raw: bytes, p: Policy) -> MessageContext:
    return MessageContext(t, raw, p, parse_message)


RATE_HIT = RuleHit("flood-to-one-address", "ratelimit", "tempfail")


async def test_disabled_does_nothing(tmp_path: Path) -> None:
    check, psi, _ = make(tmp_path)
    psi.value = 99
    off = policy(clamav={"enabled": False})
    assert (await check.on_message(msg(txn(), b"Subject: x\r\n\r\nx\r\n", off))).verdict is None


async def test_soften_lowers_the_gate_and_still_scans(tmp_path: Path) -> None:
    check, psi, _ = make(tmp_path)
    psi.value = 15
    r = await check.on_message(msg(txn(), b"Subject: x\r\n\r\nsmall\r\n", policy()))
    assert r.verdict is not None and r.verdict.reason == "clamd_connect"  # scanned (clamd absent)
    assert check.gate.limit == 1  # pressure.soften.scan_concurrency


async def test_too_large_to_scan(tmp_path: Path) -> None:
    check, _, _ = make(tmp_path, stream_max_length=1000)
    r = await check.on_message(msg(txn(), b"x" * 1001, policy()))
    assert r.verdict is not None and r.verdict.reply().startswith("552 5.3.4 Message too large to scan")
    assert check.breaker.failures == 0
    r = await check.on_message(msg(txn(), b"x" * 1001, policy(clamav={"on_error": "accept"})))
    assert r.verdict is None and resolve(r.hits).headers == [(HEADER, "unscanned (clamd error: too_large)")]


async def test_breaker_answers_fast_after_failures(tmp_path: Path) -> None:
    check, _, clock = make(tmp_path, breaker_failures=2, breaker_reset=5)
    p = policy()
    raw = b"Subject: x\r\n\r\nhello\r\n"
    reasons = [(await check.on_message(msg(txn(), raw, p))).verdict for _ in range(4)]
    assert [v.reason if v else None for v in reasons] == ["clamd_connect", "clamd_connect", "clamd_down",
                                                         "clamd_down"]
    assert all(v is not None and v.reply().startswith("451 4.3.2") for v in reasons)
    assert check.breaker.state is BreakerState.OPEN and check.breaker.failures == 2
    assert check.status()["clamd_up"] is False and check.status()["breaker"] == "open"
    clock.now += 5  # half-open: this message is the probe, and clamd is still gone
    v = (await check.on_message(msg(txn(), raw, p))).verdict
    assert v is not None and v.reason == "clamd_connect" and check.breaker.state is BreakerState.OPEN


async def test_on_error_accept_marks_the_message(tmp_path: Path) -> None:
    check, _, _ = make(tmp_path, breaker_failures=1)
    p = policy(clamav={"on_error": "accept"})
    for _ in range(2):  # connect error, then breaker open: both pass, both marked
        r: StageResult = await check.on_message(msg(txn(), b"Subject: x\r\n\r\nhello\r\n", p))
        headers = resolve(r.hits).headers
        assert r.verdict is None and len(headers) == 1 and headers[0][0] == HEADER
        assert headers[0][1].startswith("unscanned (clamd error: ")
        assert r.hits and r.hits[0].rule == "unscanned"


def test_workers_split_the_hosts_scan_bounds() -> None:
    """clamd is one per host and the policy's scan bounds are the host's: with `workers: N` each
    worker's gate gets its share, so N workers do not put N x max_concurrent streams into clamd."""
    scan = Policy().scan.model_copy(update={"max_concurrent": 4, "min_concurrent": 2, "max_waiting": 32})
    one, two, eight = gate_config(scan, 1), gate_config(scan, 2), gate_config(scan, 8)
    assert (one.max_concurrent, one.min_concurrent, one.max_waiting) == (4, 2, 32)
    assert (two.max_concurrent, two.min_concurrent, two.max_waiting) == (2, 2, 16)
    assert (eight.max_concurrent, eight.min_concurrent, eight.max_waiting) == (1, 1, 4)  # never below one
    assert threads_cap(10) == 9 and threads_cap(10, 3) == 3 and threads_cap(4, 2) == 1 and threads_cap(None, 2) is None
    assert share_of(3, 2) == 1 and share_of(1, 4) == 1


def test_clamd_words_in_replies_are_one_short_printable_line() -> None:
    """A hit's detail may come from clamd (virus name, refusal text): the reply keeps printable
    ASCII only, so no CR/LF can end the SMTP reply early, and at most ~200 characters of it."""
    evil = "Evil\r\n250 2.0.0 Ok\x1b[0m" + "X" * 100_000
    for action in ("reject", "quarantine"):
        v = resolve([RuleHit("clamav", "scan", action, detail=evil)]).verdict
        assert v is not None and v.reply().isprintable() and v.reply().isascii() and len(v.reply()) < 300, action
        assert "Evil??250 2.0.0 Ok?[0mXXX" in v.reply()
    big = resolve([RuleHit("too_large", "scan", "reject", detail="clamd said\r\n" + "Y" * 100_000)]).verdict
    assert big is not None and big.reply().startswith("552 5.3.4 Message too large to scan (clamd said??YYY")
    assert big.reply().isprintable() and len(big.reply()) < 300


class Scripted:
    """A scanner that answers from a script and can act as it does (a fake: the moment clamd's
    signatures change during a scan cannot be timed with a real clamd)."""

    def __init__(self, answers: list[ScanResult | ScanError], during: Any = None) -> None:
        self.answers, self.during, self.calls = answers, during, 0

    async def instream(self, data: bytes) -> ScanResult:
        self.calls += 1
        if self.during is not None:
            self.during()
        answer = self.answers.pop(0)
        if isinstance(answer, ScanError):
            raise answer
        return answer

    async def ping(self) -> None:
        pass

    async def version(self) -> str:
        return "ClamAV 1.4.6/27480"

    async def stats(self) -> ClamdStats:
        return ClamdStats()


def wave_copy(n: int) -> bytes:
    return f"Received: from bot{n}.example\r\nTo: u{n}@rcpt.example\r\nSubject: x\r\n\r\nsame body\r\n".encode()


async def test_an_answer_given_while_the_signatures_changed_is_not_kept(tmp_path: Path) -> None:
    checks: list[ScanCheck] = []
    scanner = Scripted([ScanResult(False)] * 3, during=lambda: setattr(checks[0].health, "version", "other"))
    check = ScanCheck(ClamdSettings(enabled=True, address=str(tmp_path / "x.sock")), Governor([], clock=Clock()),
                      clock=Clock(), scanner=scanner)
    checks.append(check)
    await check.health.read_version()
    assert (await check.on_message(msg(txn(), wave_copy(1), policy()))).verdict is None
    assert len(check.cache) == 0
    scanner.during = None
    await check.health.read_version()
    for n in (2, 3):
        assert (await check.on_message(msg(txn(), wave_copy(n), policy()))).verdict is None
    assert scanner.calls == 2 and len(check.cache) == 1


async def test_virus_answers_are_not_reused(tmp_path: Path) -> None:
    """A virus answer may come from a per-copy field the key leaves out: each copy is scanned."""
    virus = ScanResult(True, "Test.Virus")
    scanner = Scripted([virus, virus, virus])
    check = ScanCheck(ClamdSettings(enabled=True, address=str(tmp_path / "x.sock")), Governor([], clock=Clock()),
                      clock=Clock(), scanner=scanner)
    await check.health.read_version()
    for n in (1, 2, 3):
        r = await check.on_message(msg(txn(), wave_copy(n), policy()))
        assert r.verdict is not None and r.verdict.code == 550
    assert scanner.calls == 3 and len(check.cache) == 0
