"""One client connection and the transaction it has open: the pipeline owns each transaction.

A front end translates its protocol's events into these calls and renders
the verdicts they return, nothing more:

    open (Pipeline.open) -> connect -> helo -> mail -> rcpt... -> data -> ... -> close
                                       any time: end(why) for RSET, an abort, a refused DATA

`data` runs the whole end of a transaction: hygiene (smuggling, forged verdict
headers), the message checks, the quarantine (stored and fsync'd before the
250), the relay (our 250 is the downstream's), and the end. Every
transaction ends exactly once, in `_finish`: budgets are charged only for
mail that went through, route slots are given back, the downstream side is
reset, one log line and the final-verdict metric are written. Any exception
on the way is a 451 4.3.0, never a 5xx and never a silent accept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from queueguard import metrics
from queueguard.logging_setup import log_event
from queueguard.model import Connection, RuleHit, Transaction
from queueguard.pipeline.hygiene import smuggling_verdict, strip_own_headers
from queueguard.policy.schema import Policy
from queueguard.quarantine.protocol import QuarantineFull
from queueguard.relay import DownstreamError, RelayTransaction, Reply
from queueguard.resolve import refusal, resolve
from queueguard.stage import MessageContext, RcptContext, StageResult, StateUnavailable
from queueguard.verdict import (
    ACCEPT,
    INTERNAL_ERROR,
    STATE_UNAVAILABLE,
    Action,
    Verdict,
    quarantine,
    reject,
    tempfail,
)

if TYPE_CHECKING:
    from queueguard.pipeline.pipeline import Pipeline

log = logging.getLogger("queueguard.pipeline")
msglog = logging.getLogger("queueguard.message")
PARSE_IN_THREAD = 512 * 1024
"""Messages larger than this are MIME-decoded in a worker thread (PARSERS)."""
PARSERS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="qg-parse")
"""Not asyncio's default executor: that one also writes the quarantine (fsync before 250), which
must not queue behind clients' large messages (six at once held it for over 60 s)."""
RELAYED_PARAMS = ("SIZE", "BODY", "SMTPUTF8")


class End(enum.Enum):
    """Why a transaction ended before (or instead of) a data verdict."""

    RSET = "rset"
    ABANDONED = "abandoned"
    """A new MAIL, HELO or EHLO while one was open (RFC 5321 4.1.4: they reset it)."""
    CLIENT_GONE = "client_disconnected"
    MTA_ABORT = "aborted"
    OVERSIZE = "oversize"
    SHUTDOWN = "shutdown"


OVERSIZE = reject("5.3.4", "Message size exceeds fixed maximum message size", reason="oversize", code=552)
DOWNSTREAM_LOST = tempfail("4.4.2", "Downstream connection lost, try again later", reason="downstream_lost")


@dataclass
class Outcome:
    """The data stage's answer: the verdict, and the headers a front end adds when it lets the
    message through itself (the milter; the proxy's relay already carried them)."""

    verdict: Verdict
    headers: list[tuple[str, str]] = field(default_factory=list)


class Session:
    def __init__(self, pipeline: Pipeline, conn: Connection) -> None:
        self.pipeline = pipeline
        self.conn = conn
        self.txn: Transaction | None = None
        self.in_data = False
        self._data: asyncio.Task[Outcome] | None = None
        """The end of the transaction once its message is in: it runs to its end (see `data`)."""
        self._relayed: RelayTransaction | None = None

    # --- connection ----------------------------------------------------------------------------

    async def connect(self) -> Verdict:
        """Admission at the door: the connect checks (memory pressure: shed) may refuse."""
        policy = self.pipeline.policy()
        for check in self.pipeline.connect_checks:
            verdict = await self._check("connect", None, check.on_connect(self.conn, policy), None)
            if refusal(verdict):
                return self._count("connect", verdict)
        return ACCEPT

    async def helo(self, name: str) -> None:
        """HELO/EHLO: a new name, and the open transaction (if any) is reset."""
        await self.end(End.ABANDONED)
        self.conn.helo = name

    async def close(self) -> None:
        """The connection is gone; an open transaction ends with it (nothing was answered 250),
        one whose message was in is settled first (`data`)."""
        try:
            if self._data is not None and not self._data.done():
                await asyncio.wait([self._data])
            await self.end(End.CLIENT_GONE)
        finally:
            for check in self.pipeline.connect_checks:
                check.on_disconnect(self.conn)

    # --- transaction ---------------------------------------------------------------------------

    async def mail(self, sender: str, options: Sequence[str] = ()) -> Verdict:
        """Start a transaction; the policy is pinned here for its whole life."""
        await self.end(End.ABANDONED)
        metrics.transactions.labels(self.pipeline.frontend).inc()
        self.txn = Transaction(self.conn, sender.strip("<>"), tuple(options), policy=self.pipeline.policy())
        return ACCEPT

    async def rcpt(self, recipient: str, options: Sequence[str] = ()) -> Verdict:
        """Checks, then (with a relay) the downstream's own answer for this recipient."""
        txn = self.txn
        if txn is None:
            return INTERNAL_ERROR
        recipient = recipient.strip("<>")
        ctx = RcptContext(txn, recipient, self._policy(txn))
        for check in self.pipeline.rcpt_checks:
            verdict = await self._check("rcpt", txn, check.on_rcpt(ctx), recipient)
            if refusal(verdict):  # a quarantine hit is acted on at DATA (Transaction.quarantine_hit)
                return self._count("rcpt", verdict)
        if self.pipeline.relay is not None:
            verdict = await self._relay_rcpt(txn, recipient, tuple(options))
            if verdict.final:
                return self._count("rcpt", verdict)
        txn.recipients.append(recipient)
        if options:
            txn.rcpt_options[recipient] = tuple(options)
        return ACCEPT

    def data(self, raw: bytes) -> asyncio.Future[Outcome]:
        """The end of DATA: everything from the message bytes to the transaction's end, as a
        future to await (or, for a front end without a Task of its own, to add a callback to).

        When we relay (the proxy), it runs to its end even when the front end's wait is
        cancelled (the client closed the connection right after its final dot, and the front end
        cancels the session): the downstream may have the message already, so the transaction is
        settled as what it became (budgets charged, the real outcome logged), never ended as if
        nothing was sent. (A client that left without our 250 retries, as after any lost reply:
        SMTP's duplicate, not a loss.) Behind a milter the MTA holds the message, and a
        cancelled wait (its timeout answered 451) cancels the work as before."""
        loop = asyncio.get_running_loop()
        txn = self.txn
        if txn is None:
            refused: asyncio.Future[Outcome] = loop.create_future()
            refused.set_result(Outcome(INTERNAL_ERROR))
            return refused
        self._data = loop.create_task(self._settle(txn, raw))
        return self._data if self.pipeline.relay is None else asyncio.shield(self._data)

    async def _settle(self, txn: Transaction, raw: bytes) -> Outcome:
        self.in_data = True
        started = time.monotonic()
        txn.size = len(raw)
        try:
            verdict, raw = await self._judge(txn, raw)
            if verdict.action is Action.ACCEPT and self.pipeline.relay is not None:
                verdict = await self._deliver(txn, raw)
        except Exception:
            metrics.internal_errors.labels("data").inc()
            log.exception("id=%s internal error at DATA", txn.id)
            verdict = INTERNAL_ERROR
        finally:
            self.in_data = False
        added = time.monotonic() - started - txn.timings.get("relay", 0.0)
        with contextlib.suppress(Exception):  # the verdict stands (_finish logs a broken metrics store)
            metrics.added_latency.labels(self.pipeline.frontend).observe(max(added, 0.0))
        headers = self.headers(txn)
        if self.txn is txn:
            self.txn = None
            await self._finish(txn, verdict, verdict.action.value, verdict.reply())
        return Outcome(verdict, headers)

    async def decide_without_data(self) -> Verdict:
        """For a front end that never sees the message (policy delegation): the transaction is
        decided once its recipient is accepted. An enforced quarantine hit is held by the MTA;
        anything else passes, and its budgets are charged now."""
        txn = self.txn
        if txn is None:
            return INTERNAL_ERROR
        hit = txn.quarantine_hit()
        verdict = ACCEPT if hit is None else quarantine(f"Held for review (rule {hit.rule})", reason=hit.kind,
                                                        rule=hit.rule)
        self.txn = None
        await self._finish(txn, verdict, verdict.action.value, "")
        return verdict

    async def end(self, why: End) -> Verdict | None:
        """The open transaction ends without a data verdict (nothing was answered 250); returns
        the reply owed to the client, if any (an oversized message gets 552). One whose message
        is in is settled by `data`, not here."""
        if self._data is not None and not self._data.done():
            return None
        txn, self.txn = self.txn, None
        if txn is None:
            return None
        verdict = OVERSIZE if why is End.OVERSIZE else None
        if verdict is not None:
            metrics.protocol_errors.labels(why.value).inc()
        # Runs to its end even if the caller's wait is cancelled (a client that leaves while the
        # downstream's RSET is pending): cut half-way, its recipients' budgets were never given back.
        await asyncio.shield(self._finish(txn, verdict, why.value, verdict.reply() if verdict else ""))
        return verdict

    def headers(self, txn: Transaction) -> list[tuple[str, str]]:
        """Headers that record the tags and rule hits, the same for every front end."""
        if not self.pipeline.add_headers:
            return []
        prefix = self.pipeline.header_prefix
        headers = resolve(txn.hits, prefix).headers
        if txn.hits:
            headers.append((f"{prefix}-Hits", ", ".join(h.label() for h in txn.hits)))
        return headers

    # --- the data stage's steps ------------------------------------------------------------------

    async def _judge(self, txn: Transaction, raw: bytes) -> tuple[Verdict, bytes]:
        """Hygiene, checks and quarantine; returns the verdict and the bytes to pass on."""
        pipeline = self.pipeline
        if pipeline.relay is not None and (refused := smuggling_verdict(raw)) is not None:
            # We put these bytes on an SMTP wire: they must end DATA exactly where we did.
            metrics.protocol_errors.labels(refused.reason).inc()
            return refused, raw
        raw = strip_own_headers(raw, pipeline.header_prefix)
        metrics.messages_bytes.labels(pipeline.frontend).inc(len(raw))
        policy = self._policy(txn)
        ctx = MessageContext(txn, raw, policy, pipeline.parser)
        if len(raw) > PARSE_IN_THREAD and (pipeline.message_checks or policy.patterns or policy.bursts):
            # A 25 MB message takes ~0.4 s to decode: not on the loop every session shares.
            ctx.__dict__["parsed"] = await asyncio.get_running_loop().run_in_executor(PARSERS, pipeline.parser, raw)
        hit = txn.quarantine_hit()
        verdict = ACCEPT if hit is None else quarantine("Ok", reason=hit.kind, rule=hit.rule)
        if not verdict.final:
            for check in pipeline.message_checks:
                verdict = await self._check("message", txn, check.on_message(ctx), None)
                if verdict.final:
                    break
        if verdict.action is Action.QUARANTINE and not pipeline.hold_in_mta:
            verdict = await self._store(txn, raw, verdict, ctx)
        if verdict.final:
            self._count("message", verdict)
        return verdict, raw

    async def _store(self, txn: Transaction, raw: bytes, verdict: Verdict, ctx: MessageContext) -> Verdict:
        """Durably, before the 250; any failure is a 4xx so the sender keeps the message."""
        store = self.pipeline.quarantine
        if store is None:
            return tempfail("4.3.0", "Quarantine not configured, try again later", reason="no_quarantine",
                            rule=verdict.rule)
        try:
            qid = await store.put(txn, raw, verdict, txn.hits, dict(ctx.fingerprints))
        except QuarantineFull as e:
            log.warning("id=%s quarantine full: %s", txn.id, e)
            return tempfail("4.3.1", "Insufficient system storage, try again later", reason="quarantine_full",
                            rule=verdict.rule, code=452)
        except Exception:
            metrics.internal_errors.labels("quarantine").inc()
            log.exception("id=%s quarantine write failed", txn.id)
            return tempfail("4.3.0", "Temporary local problem storing the message, try again later",
                            reason="quarantine_error", rule=verdict.rule)
        return Verdict(Action.QUARANTINE, 250, "2.0.0", f"Ok: quarantined as {qid}", verdict.rule, verdict.reason)

    async def _relay_rcpt(self, txn: Transaction, recipient: str, options: tuple[str, ...]) -> Verdict:
        """Mirror the RCPT on the route's downstream. The transaction is bound to a route only
        once a recipient is accepted, so a refused first recipient does not pin it."""
        relay = self.pipeline.relay
        assert relay is not None
        route = self.pipeline.route_for(recipient)
        if txn.route is not None and route != txn.route:
            return resolve([RuleHit(route, "route", "tempfail", detail="split", recipient=recipient)]).verdict \
                or INTERNAL_ERROR
        rtx = self._relayed
        if rtx is None and txn.recipients:
            # The downstream transaction holding the earlier recipients broke off: a new one
            # would carry only the later recipients while the sender thinks all are in.
            return DOWNSTREAM_LOST
        try:
            if rtx is None:
                params = tuple(o for o in txn.mail_options if o.split("=", 1)[0].upper() in RELAYED_PARAMS)
                rtx, reply = await relay.group(route).begin(txn.connection, txn.sender, params,
                                                            (recipient, options))
                if rtx is None:
                    return from_downstream(reply, "mail")
                self._relayed = rtx
            else:
                reply = await rtx.rcpt(recipient, options)
        except DownstreamError as e:
            self._relayed = None
            log.warning("id=%s downstream lost during RCPT: %s", txn.id, e)
            return DOWNSTREAM_LOST
        if reply.positive:
            txn.route = route
        elif not txn.recipients:
            await self._reset_downstream()
        return from_downstream(reply, "rcpt")

    async def _deliver(self, txn: Transaction, raw: bytes) -> Verdict:
        """DATA to the downstream with our headers; our answer is its answer."""
        rtx, self._relayed = self._relayed, None
        if rtx is None:
            return self._count("data", DOWNSTREAM_LOST)
        started = time.monotonic()
        try:
            reply = await rtx.data(with_headers(self.headers(txn), raw))
        except DownstreamError as e:
            log.warning("id=%s downstream=%s lost during DATA: %s", txn.id, rtx.downstream.name, e)
            return self._count("data", DOWNSTREAM_LOST)
        finally:
            txn.timings["relay"] = time.monotonic() - started
        txn.downstream = rtx.downstream.name
        return self._count("data", from_downstream(reply, "data"))

    async def _reset_downstream(self) -> None:
        """No partial transaction is left downstream."""
        rtx, self._relayed = self._relayed, None
        if rtx is not None:
            await rtx.abort()

    async def _finish(self, txn: Transaction, verdict: Verdict | None, outcome: str, reply: str) -> None:
        """Where every transaction ends, once: downstream reset, checks told (budgets charged for
        mail that went through), the final-verdict metric and the message's log line."""
        passed = verdict is not None and verdict.action in (Action.ACCEPT, Action.QUARANTINE, Action.DISCARD)
        try:
            await self._reset_downstream()
        except Exception:
            log.exception("id=%s resetting the downstream failed", txn.id)
        for check in self.pipeline.rcpt_checks:
            try:
                await check.on_end(txn, passed and bool(txn.recipients))
            except Exception:
                log.exception("id=%s ending the transaction in %s failed", txn.id, check.name)
                with contextlib.suppress(Exception):
                    metrics.internal_errors.labels("end").inc()
        reason = (verdict.reason if verdict is not None else outcome) or "ok"
        self._tally("final", outcome if verdict is None else verdict.action.value, reason)
        conn = txn.connection
        log_event(
            msglog, "message", id=txn.id, client=f"{conn.client_name or 'unknown'}[{conn.client_ip}]",
            helo=conn.helo, sender=f"<{txn.sender}>", rcpts=list(txn.recipients), size=txn.size,
            verdict="none" if verdict is None else verdict.action.value, reason=reason,
            rule=(verdict.rule if verdict else None) or "", hits=[h.label() for h in txn.hits],
            downstream=txn.downstream, reply=reply or "(none)", t_total=round(time.monotonic() - txn.started, 4),
            t_scan=round(txn.timings.get("scan", 0.0), 4), t_relay=round(txn.timings.get("relay", 0.0), 4),
        )

    # --- helpers -------------------------------------------------------------------------------

    def _policy(self, txn: Transaction) -> Policy:
        pinned = txn.policy
        return pinned if isinstance(pinned, Policy) else self.pipeline.policy()

    async def _check(self, stage: str, txn: Transaction | None, step: Awaitable[StageResult],
                     recipient: str | None) -> Verdict:
        """Run one check, record its hits on the transaction, and resolve them into this stage's
        verdict (ACCEPT when they ask for nothing). A failing check is a 451, never a pass."""
        try:
            result = await step
        except StateUnavailable as e:
            log.warning("id=%s %s", txn.id if txn else "-", e)
            return STATE_UNAVAILABLE
        except Exception:
            metrics.internal_errors.labels(stage).inc()
            log.exception("id=%s internal error in %s stage", txn.id if txn else "-", stage)
            return INTERNAL_ERROR
        if not result.hits:  # most checks of most messages: nothing to record or resolve
            return ACCEPT
        for hit in result.hits:
            if txn is not None:
                txn.hits.append(hit if hit.recipient or recipient is None else
                                RuleHit(hit.rule, hit.kind, hit.action, hit.shadow, hit.detail, recipient,
                                        hit.retry_after))
            metrics.rule_hits.labels(hit.rule, hit.kind, hit.action, "shadow" if hit.shadow else "enforce").inc()
        return resolve(result.hits, self.pipeline.header_prefix).verdict or ACCEPT

    def _count(self, stage: str, verdict: Verdict) -> Verdict:
        self._tally(stage, verdict.action.value, verdict.reason or "ok")
        return verdict

    def _tally(self, stage: str, action: str, reason: str) -> None:
        """Count a verdict. Counting never changes one: after a downstream's 250 or a durable
        quarantine, a metrics store that fails (its files cleaned away) turned the answer into a
        451, and the sender delivered again."""
        try:
            metrics.verdicts.labels(self.pipeline.frontend, stage, action, reason).inc()
        except Exception:
            log.exception("counting a %s verdict failed (the verdict stands)", stage)


def with_headers(headers: list[tuple[str, str]], raw: bytes) -> bytes:
    """Our header fields on top of the message. A message whose first line starts with a space or
    tab has no header section (that line continues nothing; Exim makes it all body): put right
    under ours it would fold into our last field and the sender would write in our verdict, so a
    blank line keeps it in the body, where Exim puts it anyway."""
    if not headers:
        return raw
    ours = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("utf-8", "replace")
    return ours + (b"\r\n" if raw[:1] in (b" ", b"\t") else b"") + raw


def from_downstream(reply: Reply, stage: str) -> Verdict:
    """Downstream 2xx → accept; 5xx passed back as is; 4xx → 451 4.4.x carrying its text."""
    if reply.positive:
        return Verdict(Action.ACCEPT, reply.code, "", reply.text, reason="ok")
    if reply.code == 503:
        # "bad sequence of commands" is our bug or a downstream in a state we did not expect,
        # never a verdict on the message.
        return tempfail("4.4.3", f"Downstream deferred: {reply}", reason=f"downstream_{stage}")
    if reply.permanent:
        status, _, text = reply.text.partition(" ")
        if not (status[:1] == "5" and status.count(".") == 2):
            status, text = "5.0.0", reply.text
        return Verdict(Action.REJECT, reply.code, status, text, reason=f"downstream_{stage}")
    if reply.text.startswith("4.4.1 "):
        return tempfail("4.4.1", reply.text[6:], reason="no_downstream")
    return tempfail("4.4.3", f"Downstream deferred: {reply}", reason=f"downstream_{stage}")
