"""ScanCheck against a real clamd (queueguard/harness/clamd.py: local EICAR .ndb, unix socket and TCP).

Checks are called directly with RcptContext/MessageContext; the pipeline-level
test at the end runs the same check inside queueguard.pipeline.Pipeline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import smtplib
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queueguard import metrics
from queueguard.harness.clamd import FOUND, Clamd, eicar
from queueguard.harness.guard import Guard
from queueguard.harness.sink import SmtpSink
from queueguard.mime import parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.pipeline import Pipeline
from queueguard.policy.schema import Policy
from queueguard.pressure.governor import Governor
from queueguard.scan.check import ScanCheck
from queueguard.scan.clamd import ClamdClient, ClamdStats, ScanError, ScanResult
from queueguard.scan.health import BreakerState
from queueguard.settings import ClamdSettings
from queueguard.stage import MessageContext, StageResult
from queueguard.verdict import Action, Verdict
from tests.components.flood import wait_for
from tests.unit.pressure.test_governor import FakeSensor

pytestmark = pytest.mark.integration


def mail(payload: bytes, name: str = "file.bin", subject: str = "test") -> bytes:
    """A multipart message with `payload` as a base64 attachment."""
    b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        f"From: a@sender.example\r\nTo: b@rcpt.example\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=BOUND\r\n\r\n--BOUND\r\nContent-Type: text/plain\r\n\r\n"
        "see attachment\r\n--BOUND\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename={name}\r\n\r\n"
    ).encode() + b64 + b"\r\n--BOUND--\r\n"


def big(n: int) -> bytes:
    """A distinct large message (clamd caches clean results by hash, so repeats would be free)."""
    return mail(os.urandom(n))


def policy(pressure: dict[str, Any] | None = None, **scan: Any) -> Policy:
    return Policy.model_validate({"scan": scan, "pressure": pressure or {}})


def txn() -> Transaction:
    return Transaction(Connection(parse_ip("192.0.2.1")), "a@sender.example", recipients=["b@rcpt.example"])


def ctx(raw: bytes, p: Policy) -> MessageContext:
    return MessageContext(txn(), raw, p, parse_message)


def check_for(address: str, *, sensors: list[FakeSensor] | None = None, **settings: Any) -> ScanCheck:
    cfg = ClamdSettings(enabled=True, address=address, **settings)
    return ScanCheck(cfg, Governor(sensors or [], clock=time.monotonic, interval=0))


@pytest.fixture
def clamd(tmp_path: Path) -> Iterator[Clamd]:
    with Clamd(tmp_path / "clamd", max_threads=8) as c:
        yield c


class StatsSampler(threading.Thread):
    """Polls clamd STATS from a thread while a test runs: the scanner's own view of concurrency."""

    def __init__(self, c: Clamd) -> None:
        super().__init__(daemon=True)
        self.c, self.busy, self.stop = c, [0], threading.Event()

    def run(self) -> None:
        from queueguard.scan.clamd import parse_stats

        while not self.stop.is_set():
            try:
                s = parse_stats(self.c.command(b"zSTATS\0"))
            except (OSError, ScanError):
                continue
            if s.threads_busy is not None and s.queue is not None:
                # scans running (minus the thread answering this STATS) plus scans handed
                # to clamd's pool and not yet picked up by a thread
                self.busy.append(s.threads_busy - 1 + s.queue)
            time.sleep(0.005)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("on_infected", ["reject", "quarantine"])
async def test_eicar_attachment_and_clean_mail(clamd: Clamd, transport: str, on_infected: str) -> None:
    address = str(clamd.socket) if transport == "unix" else clamd.tcp_address
    check = check_for(address)
    p = policy(clamav={"on_infected": on_infected})
    r = await check.on_message(ctx(mail(eicar(), "eicar.com"), p))
    assert r.verdict is not None
    if on_infected == "reject":
        assert r.verdict.reply() == f"550 5.7.1 virus found: {FOUND} (scan:clamav)"
    else:
        assert r.verdict.action is Action.QUARANTINE and r.verdict.text == f"virus found: {FOUND}"
    assert r.hits[0].detail == FOUND
    clean = await check.on_message(ctx(mail(b"just a document\n" * 100, "doc.txt"), p))
    assert clean.verdict is None and clean.hits == []
    assert check.health.up is True and metrics.clamd_up._value.get() == 1


async def test_client_commands(clamd: Clamd) -> None:
    client = ClamdClient(str(clamd.socket))
    await client.ping()
    assert (await client.version()).startswith("ClamAV ")
    stats = await client.stats()
    assert stats.threads_max == 8 and stats.queue == 0
    assert (await client.instream(eicar())).signature == FOUND


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("size", [1_048_577, 20_000_000])
async def test_over_clamds_stream_limit_is_permanent(tmp_path: Path, transport: str, size: int) -> None:
    """Our limit (25 MB) above clamd's StreamMaxLength (1M). clamd 1.x answers `INSTREAM size limit
    exceeded. ERROR`, without `stream: `; a stream well past the limit finds clamd gone while we still
    send (broken pipe), and the answer is read after that. Either way a permanent 552, not a 451 the
    sender retries for days, and no breaker failure."""
    with Clamd(tmp_path / "small", stream_max_length="1M") as c:
        check = check_for(str(c.socket) if transport == "unix" else c.tcp_address, breaker_failures=1)
        p = policy()
        r = await check.on_message(ctx(os.urandom(size), p))
        assert r.verdict is not None and r.verdict.reply().startswith(
            f"552 5.3.4 Message too large to scan ({size} bytes, clamd refused the stream: INSTREAM size limit"
        ), r.verdict
        assert check.breaker.state is BreakerState.CLOSED and check.breaker.failures == 0
        ok = await check.on_message(ctx(mail(b"small"), p))
        assert ok.verdict is None and ok.hits == []


async def test_breaker_opens_when_scans_fail_but_ping_answers(clamd: Clamd) -> None:
    """clamd answers PING but every scan fails: here real scans slower than `clamd.timeout`. The health
    loop's PING after each failure used to reset the breaker's count, so it never opened (every message
    held its sender for the full timeout) and `clamd_up` went back to 1 (the alert never fired)."""
    settings = ClamdSettings(enabled=True, address=str(clamd.socket), timeout=0.2, breaker_failures=3,
                             breaker_reset=0.5, ping_interval=0.05)
    check = ScanCheck(settings, Governor([], clock=time.monotonic))
    health = asyncio.create_task(check.run())
    p = policy(adaptive=False)
    try:
        await asyncio.sleep(0.1)
        assert check.health.up is True
        for _ in range(3):
            r = await check.on_message(ctx(big(10_000_000), p))
            assert r.verdict is not None and r.verdict.reason == "clamd_timeout", r.verdict
            await asyncio.sleep(0.1)  # the PING the failure kicked has answered
        assert check.breaker.state is BreakerState.OPEN
        assert check.health.up is False and metrics.clamd_up._value.get() == 0
        message = ctx(big(10_000_000), p)
        start = time.monotonic()
        r = await check.on_message(message)
        assert r.verdict is not None and r.verdict.reason == "clamd_down" and time.monotonic() - start < 0.05

        await asyncio.sleep(0.6)  # past breaker_reset: the loop's PING, then its scan of a few bytes,
        # which clamd finishes in time: clamd is up (small mail scans), the count starts again
        assert check.breaker.state is BreakerState.CLOSED and check.breaker.failures == 0
        assert check.health.up is True and metrics.clamd_up._value.get() == 1
        ok = await check.on_message(ctx(mail(b"hello"), p))
        assert ok.verdict is None
    finally:
        health.cancel()


async def test_scan_timeout_is_kept(clamd: Clamd) -> None:
    """clamd stopped (SIGSTOP) while we send a stream: the scan gives up at `clamd.timeout`, not a
    second later draining data clamd will never read."""
    client = ClamdClient(str(clamd.socket), timeout=0.3)
    os.kill(clamd.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ScanError) as e:
            await client.instream(os.urandom(5_000_000))
        elapsed = time.monotonic() - start
    finally:
        os.kill(clamd.pid, signal.SIGCONT)
    assert e.value.reason == "timeout" and elapsed < 0.3 + 0.2, elapsed


async def test_long_virus_name_is_capped_in_the_reply(tmp_path: Path) -> None:
    """A signature name is whatever the database says (clamd answers a 5000-character one as is):
    the reply carries at most ~200 characters of it."""
    c = Clamd(tmp_path / "long")
    (c.dir / "db" / "long.ndb").write_text(f"{'Q' * 5000}:0:*:{b'QG-LONG-NAME-MARKER'.hex()}\n")
    with c:
        r = await check_for(str(c.socket)).on_message(ctx(mail(b"x QG-LONG-NAME-MARKER x"), policy()))
    assert r.verdict is not None and r.verdict.reply().startswith("550 5.7.1 virus found: QQQQ")
    assert len(r.verdict.reply()) < 300 and r.verdict.reply().endswith(" (scan:clamav)")


class Recording:
    """Passes every call through to the real client and notes when each clean scan finished,
    so the test can tell a message scanned before the kill from one accepted unscanned."""

    def __init__(self, inner: ClamdClient) -> None:
        self.inner = inner
        self.clean_done: dict[int, float] = {}

    async def instream(self, data: bytes) -> ScanResult:
        result = await self.inner.instream(data)
        self.clean_done[hash(data)] = time.monotonic()
        return result

    async def ping(self) -> None:
        await self.inner.ping()

    async def version(self) -> str:
        return await self.inner.version()

    async def stats(self) -> ClamdStats:
        return await self.inner.stats()


async def test_kill9_mid_scan_then_restart(clamd: Clamd) -> None:
    settings = ClamdSettings(enabled=True, address=str(clamd.socket), breaker_failures=3, breaker_reset=0.3,
                             timeout=20)
    rec = Recording(ClamdClient.from_settings(settings))
    check = ScanCheck(settings, Governor([], clock=time.monotonic), scanner=rec)
    p = policy(max_concurrent=4, max_waiting=50, max_wait="30s", adaptive=False)
    msgs = [big(5_000_000) for _ in range(16)]
    tasks = [asyncio.create_task(check.on_message(ctx(m, p))) for m in msgs]
    async with asyncio.timeout(20):
        while check.gate.in_flight < 4:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    killed_at = time.monotonic()
    clamd.kill9()
    results: list[StageResult] = await asyncio.gather(*tasks)

    mid_scan = 0
    for m, r in zip(msgs, results, strict=True):
        if r.verdict is None:
            assert rec.clean_done[hash(m)] < killed_at, "accepted without a scan that finished before the kill"
            continue
        v: Verdict = r.verdict
        assert v.action is Action.TEMPFAIL and v.reply().startswith("451 4.3.2"), v
        assert v.reason in ("clamd_reset", "clamd_connect", "clamd_down"), v
        mid_scan += v.reason == "clamd_reset"
    assert mid_scan >= 1, "the kill did not hit a scan in flight"
    assert check.breaker.state is BreakerState.OPEN and metrics.clamd_up._value.get() == 0

    down = await check.on_message(ctx(big(1000), p))
    assert down.verdict is not None and down.verdict.reason == "clamd_down"

    clamd.start()
    await asyncio.sleep(0.35)  # past breaker_reset: the next message is the half-open probe
    again = await check.on_message(ctx(big(10_000), p))
    assert again.verdict is None
    assert check.breaker.state is BreakerState.CLOSED and metrics.clamd_up._value.get() == 1
    infected = await check.on_message(ctx(mail(eicar()), p))
    assert infected.verdict is not None and infected.verdict.code == 550


async def test_concurrency_bound_and_waiting_count(clamd: Clamd) -> None:
    check = check_for(str(clamd.socket))
    p = policy(max_concurrent=2, max_waiting=4, max_wait="60s", adaptive=False)
    sampler = StatsSampler(clamd)
    sampler.start()
    try:
        results = await asyncio.gather(*(check.on_message(ctx(big(3_000_000), p)) for _ in range(20)))
    finally:
        sampler.stop.set()
        sampler.join()
    verdicts = [r.verdict for r in results]
    busy = [v for v in verdicts if v is not None]
    assert verdicts.count(None) == 6  # 2 in flight + 4 waiting
    assert len(busy) == 14 and all(v.reason == "busy_waiting_full" and v.code == 451 for v in busy)
    assert all("scanner busy" in v.text for v in busy)
    assert check.gate.peak_in_flight == 2 and check.gate.refused["waiting_full"] == 14
    # clamd's own count of our scans. A thread may still be tidying up a scan whose answer we
    # read (our slot is free, the next scan starts; the client waits up to CLOSE_WAIT for clamd
    # to hang up, which a loaded box can exceed): in a rare sample each slot shows two, so the
    # bound is judged by how often a sample is over it (before the client waited: most were).
    assert 1 <= max(sampler.busy) <= 4, sampler.busy
    over = sum(1 for b in sampler.busy if b > 2)
    assert over <= max(1, len(sampler.busy) // 20), sampler.busy


async def test_wait_bound_in_time(clamd: Clamd) -> None:
    check = check_for(str(clamd.socket))
    p = policy(max_concurrent=1, max_waiting=100, max_wait="50ms", adaptive=False)
    results = await asyncio.gather(*(check.on_message(ctx(big(5_000_000), p)) for _ in range(6)))
    verdicts = [r.verdict for r in results]
    assert verdicts[0] is None  # the first got the slot at once
    timed_out = [v for v in verdicts if v is not None]
    assert timed_out and all(v.reason == "busy_wait_timeout" and v.reply().startswith("451 4.3.2")
                             for v in timed_out)
    assert check.gate.peak_in_flight == 1


async def test_soften_lowers_concurrency(clamd: Clamd) -> None:
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 20.0)  # soften: 10 <= 20 < 40
    check = check_for(str(clamd.socket), sensors=[psi])
    p = policy({"soften": {"scan_concurrency": 1}}, max_concurrent=4, adaptive=False)
    results = await asyncio.gather(*(check.on_message(ctx(big(2_000_000), p)) for _ in range(5)))
    assert [r.verdict for r in results] == [None] * 5
    assert check.gate.peak_in_flight == 1
    psi.value = 0.0
    check.governor.update(p.pressure.model_copy(update={"hold": 0}))
    await asyncio.gather(*(check.on_message(ctx(m, p)) for m in [big(2_000_000) for _ in range(6)]))
    assert check.gate.peak_in_flight > 1  # back to normal: the soften cap is gone


async def test_in_pipeline(clamd: Clamd) -> None:
    check = check_for(str(clamd.socket))
    p = policy()
    session = Pipeline("test", lambda: p, message_checks=[check]).open(Connection(parse_ip("192.0.2.1")))
    for raw, expected in ((mail(eicar()), "550 5.7.1"), (mail(b"hello"), "250 ")):
        await session.mail("a@sender.example")
        assert not (await session.rcpt("b@rcpt.example")).final
        v = (await session.data(raw)).verdict
        assert v.reply().startswith(expected), v
    clamd.kill9()
    await session.mail("a@sender.example")
    await session.rcpt("b@rcpt.example")
    v = (await session.data(mail(b"hello again"))).verdict
    assert v.reply().startswith("451 4.3.2"), v


class Counting(ClamdClient):
    """The real client, counting the streams it sends to clamd."""

    scans = 0

    async def instream(self, data: bytes) -> ScanResult:
        self.scans += 1
        return await super().instream(data)


def copy_of(raw: bytes, n: int) -> bytes:
    """The same message as the n-th copy of a wave: its own trace, recipient, id and date."""
    return (f"Received: from bot{n}.example ([198.51.100.{n}])\r\n\tby mx.test; Mon, 7 Dec 2026 11:00:{n:02} +0000"
            f"\r\nMessage-ID: <{n}@bot.example>\r\nDate: Mon, 7 Dec 2026 11:00:{n:02} +0000\r\n").encode() + \
        raw.replace(b"To: b@rcpt.example", f"To: user{n}@rcpt.example".encode())


def counting_check(clamd: Clamd, *, database: Path | None, **more: Any) -> tuple[ScanCheck, Counting]:
    settings = ClamdSettings(enabled=True, address=str(clamd.socket), database_directory=database, **more)
    client = Counting.from_settings(settings)
    assert isinstance(client, Counting)
    return ScanCheck(settings, Governor([], clock=time.monotonic), scanner=client), client


async def test_a_waves_copies_are_scanned_once(clamd: Clamd) -> None:
    """Copies that differ only in per-copy fields get the first copy's clean answer without
    clamd, counted on /metrics; other content is scanned, and so is every infected copy (a virus
    answer may come from a per-copy field). With clamd gone, cached answers still stand and new
    content gets 451."""
    check, client = counting_check(clamd, database=clamd.dir / "db")
    await check.health.ping()
    assert check.health.version is not None and check.health.version.startswith("ClamAV ")
    p = policy()
    hits = metrics.scan_cache.labels("hit")._value.get()
    virus, clean = mail(eicar(), subject="invoice"), mail(b"quarterly figures attached", subject="figures")
    for n in range(10):
        r = await check.on_message(ctx(copy_of(virus, n), p))
        assert r.verdict is not None and r.verdict.reply().startswith(f"550 5.7.1 virus found: {FOUND}"), n
        assert (await check.on_message(ctx(copy_of(clean, n), p))).verdict is None
    assert client.scans == 11 and metrics.scan_cache.labels("hit")._value.get() - hits == 9
    for other in (mail(eicar(), subject="invoice 2"), mail(b"quarterly figures attached!", subject="figures")):
        await check.on_message(ctx(other, p))
    assert client.scans == 13
    clamd.kill9()
    assert (await check.on_message(ctx(copy_of(clean, 11), p))).verdict is None
    down = await check.on_message(ctx(mail(b"new content"), p))
    assert down.verdict is not None and down.verdict.reply().startswith("451 4.3.2")
    assert client.scans == 14


@pytest.mark.parametrize("database", [True, False])
async def test_new_signatures_are_used_for_content_seen_before(clamd: Clamd, database: bool) -> None:
    """A local signature (which changes no clamd VERSION) loaded after a clean answer was cached:
    the next copy is scanned again and found, because the database files changed. Without the
    database directory to look at, the cached clean answer is reused until its ttl."""
    check, client = counting_check(clamd, database=clamd.dir / "db" if database else None)
    await check.health.ping()
    version = check.health.version
    p = policy()
    raw = mail(b"harmless until today QG-NEW-SIGNATURE-MARKER")
    assert (await check.on_message(ctx(copy_of(raw, 1), p))).verdict is None
    (clamd.dir / "db" / "new.ndb").write_text(f"QG.New:0:*:{b'QG-NEW-SIGNATURE-MARKER'.hex()}\n")
    assert clamd.command(b"zRELOAD\0") == "RELOADING"
    async with asyncio.timeout(30):  # clamd loads the new database in the background
        while not (await client.instream(raw)).infected:
            await asyncio.sleep(0.1)
    await check.health.ping()
    scans = client.scans
    again = await check.on_message(ctx(copy_of(raw, 2), p))
    if database:
        assert check.health.version != version and client.scans == scans + 1
        assert again.verdict is not None and "QG.New.UNOFFICIAL" in again.verdict.reply()
    else:
        assert check.health.version == version and client.scans == scans and again.verdict is None


def status(guard: Guard) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{guard.metrics_port}/status.json", timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def test_a_guard_scans_a_wave_once(tmp_path: Path) -> None:
    """`queueguard serve` with clamd: its health loop learns clamd's version, and a wave of ten
    clean copies through the SMTP proxy costs clamd one scan; every copy gets its answer (250 and
    delivered, or 550 for each copy of the EICAR wave, each scanned). A reload empties the cache."""
    with Clamd(tmp_path / "clamd") as c, SmtpSink() as sink, Guard(
            {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
             "clamd": {"enabled": True, "address": str(c.socket), "pid_file": str(c.pid_file),
                       "database_directory": str(c.dir / "db")}}) as guard:
        wait_for("clamd's version", lambda: "ClamAV" in str(status(guard)["scan"]["clamd_version"]))
        refused = 0
        with guard.smtp() as client:
            for n in range(10):
                client.sendmail("a@sender.example", [f"user{n}@rcpt.example"],
                                copy_of(mail(b"figures", subject="figures"), n))
                try:
                    client.sendmail("a@sender.example", [f"user{n}@rcpt.example"],
                                    copy_of(mail(eicar(), subject="invoice"), n))
                except smtplib.SMTPDataError as e:
                    assert e.smtp_code == 550 and FOUND.encode() in e.smtp_error
                    refused += 1
        assert refused == 10 and sink.wait_count(10) == 10
        assert guard.metric("queueguard_scans_total") == 11  # the first clean copy, and every infected one
        assert guard.metric("queueguard_scan_cache_total", result="hit") == 9
        assert guard.metric("queueguard_scan_cache_total", result="miss") == 11
        loaded = guard.log().count("policy loaded from")
        guard.signal(signal.SIGHUP)  # a reload drops every answer
        wait_for("the reload", lambda: guard.log().count("policy loaded from") > loaded)
        with guard.smtp() as client:
            again = copy_of(mail(b"figures", subject="figures"), 11)
            client.sendmail("a@sender.example", ["user11@rcpt.example"], again)
        assert guard.metric("queueguard_scans_total") == 12 and sink.wait_count(11) == 11


async def test_a_virus_in_a_per_copy_field_is_not_every_copys_answer(clamd: Clamd) -> None:
    """Anyone can send one copy of someone else's mail with a test string in its Cc: that copy is
    refused, and the genuine copies are still scanned and delivered (a virus answer is never
    reused: it may come from a field the key leaves out)."""
    check, client = counting_check(clamd, database=clamd.dir / "db")
    await check.health.ping()
    p = policy()
    genuine = mail(b"newsletter of the month", subject="news")
    poisoned = genuine.replace(b"To: b@rcpt.example", b"To: b@rcpt.example\r\nCc: " + eicar())
    r = await check.on_message(ctx(copy_of(poisoned, 1), p))
    assert r.verdict is not None and r.verdict.reply().startswith("550 5.7.1")
    for n in range(2, 5):
        assert (await check.on_message(ctx(copy_of(genuine, n), p))).verdict is None
    assert client.scans == 2  # the poisoned copy, then one genuine copy; the rest cached


async def test_slow_clean_answers_are_not_reused(clamd: Clamd) -> None:
    """clamd answers OK for a scan that ran past its MaxScanTime: a clean answer that took that
    long (`clamd.max_scan_time`) speaks for its own copy only."""
    raw = big(3_000_000)
    for max_scan_time, scans in ((0.001, 3), (120, 1)):
        check, client = counting_check(clamd, database=clamd.dir / "db", max_scan_time=max_scan_time)
        await check.health.ping()
        for n in range(3):
            assert (await check.on_message(ctx(copy_of(raw, n), policy()))).verdict is None
        assert client.scans == scans, max_scan_time


async def test_changed_signature_files_are_not_cached_until_clamd_loads_them(clamd: Clamd) -> None:
    """Files change first; clamd loads them at its next SelfCheck (or RELOAD). Answers given in
    between come from the old signatures: none of them is kept, so once clamd has loaded the new
    ones the next copy is scanned with them."""
    check, client = counting_check(clamd, database=clamd.dir / "db")
    await check.health.ping()
    p = policy()
    raw = mail(b"harmless until today QG-RACE-MARKER")
    (clamd.dir / "db" / "race.ndb").write_text(f"QG.Race:0:*:{b'QG-RACE-MARKER'.hex()}\n")
    await check.health.ping()  # the files changed; clamd has not reloaded
    assert check.health.settling()
    assert (await check.on_message(ctx(copy_of(raw, 1), p))).verdict is None  # the old signatures
    assert clamd.command(b"zRELOAD\0") == "RELOADING"
    async with asyncio.timeout(30):
        while not (await client.instream(raw)).infected:
            await asyncio.sleep(0.1)
    again = await check.on_message(ctx(copy_of(raw, 2), p))
    assert again.verdict is not None and "QG.Race.UNOFFICIAL" in again.verdict.reply()
