"""The transport-neutral pipeline: connect → mail → rcpt → message → deliver → finish.

Front ends (SMTP proxy, milter, policy socket) call these stages and turn the
verdicts into their protocol's replies. The pipeline runs the checks the app
gave it, records every rule hit, turns any exception into 451 4.3.0 (never a
5xx, never a silent accept), stores quarantined mail durably before it says
250, and mirrors the transaction onto a downstream when it has a relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from queueguard import metrics
from queueguard.logging_setup import log_event
from queueguard.mime import ParsedMessage, parse_message
from queueguard.model import Connection, RuleHit, Transaction
from queueguard.policy.schema import Policy
from queueguard.quarantine.protocol import Quarantine, QuarantineFull
from queueguard.relay import DownstreamError, Relay, RelayTransaction, Reply
from queueguard.stage import MessageCheck, MessageContext, RcptCheck, RcptContext, StageResult
from queueguard.verdict import ACCEPT, INTERNAL_ERROR, Action, Verdict, quarantine, tempfail

log = logging.getLogger("queueguard.pipeline")
PARSE_IN_THREAD = 512 * 1024
"""Messages larger than this are MIME-decoded in a worker thread."""
msglog = logging.getLogger("queueguard.message")


RouteFor = Callable[[str], str]


@dataclass
class Pipeline:
    frontend: str
    policy: Callable[[], Policy]
    rcpt_checks: list[RcptCheck] = field(default_factory=list)
    message_checks: list[MessageCheck] = field(default_factory=list)
    quarantine: Quarantine | None = None
    relay: Relay | None = None
    route_for: RouteFor = lambda _rcpt: "default"
    parser: Callable[[bytes], ParsedMessage] = parse_message
    header_prefix: str = "X-Queueguard"
    add_headers: bool = True
    finishers: list[Callable[[Transaction], None]] = field(default_factory=list)
    _relayed: dict[str, RelayTransaction] = field(default_factory=dict)

    # --- stages -------------------------------------------------------------

    async def connect(self, conn: Connection) -> Verdict:
        """Connection-stage checks (none yet). Front ends count their own connections."""
        return ACCEPT

    async def mail(self, conn: Connection, sender: str, options: tuple[str, ...] = (),
                   size: int | None = None) -> tuple[Transaction, Verdict]:
        """Start a transaction; the policy is pinned here for its whole life."""
        metrics.transactions.labels(self.frontend).inc()
        txn = Transaction(conn, sender.strip("<>"), options, size_hint=size, policy=self.policy())
        return txn, ACCEPT

    async def rcpt(self, txn: Transaction, recipient: str, options: tuple[str, ...] = ()) -> Verdict:
        """Checks, then (with a relay) the downstream's own answer for this recipient."""
        recipient = recipient.strip("<>")
        ctx = RcptContext(txn, recipient, self._policy(txn))
        for check in self.rcpt_checks:
            result = await self._guard("rcpt", txn, check.on_rcpt(ctx))
            verdict = self._absorb(txn, result, recipient)
            if verdict.final:
                return self._count("rcpt", verdict)
        if self.relay is not None:
            verdict = await self._relay_rcpt(txn, recipient, options)
            if verdict.final:
                return self._count("rcpt", verdict)
        txn.recipients.append(recipient)
        return ACCEPT

    async def message(self, txn: Transaction, raw: bytes) -> Verdict:
        """Content checks in order (cheap first); a quarantine verdict is stored before we answer."""
        started = time.monotonic()
        metrics.messages_bytes.labels(self.frontend).inc(len(raw))
        policy = self._policy(txn)
        ctx = MessageContext(txn, raw, policy, self.parser)
        if len(raw) > PARSE_IN_THREAD and (self.message_checks or policy.patterns or policy.bursts):
            # A 25 MB message takes ~0.4 s to decode: not on the loop every session shares.
            ctx.__dict__["parsed"] = await asyncio.to_thread(self.parser, raw)
        verdict = self._quarantine_from_rcpt_hits(txn)
        if not verdict.final:
            for check in self.message_checks:
                result = await self._guard("message", txn, check.on_message(ctx))
                verdict = self._absorb(txn, result, None)
                if verdict.final:
                    break
        if verdict.action is Action.QUARANTINE:
            verdict = await self._store(txn, raw, verdict, ctx)
        txn.timings["checks"] = time.monotonic() - started
        if verdict.final:
            self._count("message", verdict)
        return verdict

    async def deliver(self, txn: Transaction, raw: bytes) -> Verdict:
        """DATA to the downstream; our answer is its answer (4xx mapped to 451 4.4.x)."""
        rtx = self._relayed.pop(txn.id, None)
        if rtx is None:
            return self._count("data", tempfail("4.4.2", "Downstream transaction lost, try again later",
                                                reason="downstream_lost"))
        started = time.monotonic()
        try:
            reply = await rtx.data(self.with_headers(txn, raw))
        except DownstreamError as e:
            log.warning("id=%s downstream=%s lost during DATA: %s", txn.id, rtx.downstream.name, e)
            txn.timings["relay"] = time.monotonic() - started
            return self._count("data", tempfail("4.4.2", "Downstream connection lost, try again later",
                                                reason="downstream_lost"))
        txn.timings["relay"] = time.monotonic() - started
        txn.downstream = rtx.downstream.name
        return self._count("data", _from_downstream(reply, "data"))

    async def abort(self, txn: Transaction) -> None:
        """Client vanished, RSET or a refused DATA: no partial transaction is left downstream."""
        rtx = self._relayed.pop(txn.id, None)
        if rtx is not None:
            await rtx.abort()

    async def finish(self, txn: Transaction, verdict: Verdict, downstream_reply: str = "") -> None:
        """Record rate limits for mail that went through, count, and write the message's log line."""
        try:
            await self.abort(txn)
        finally:
            for release in self.finishers:
                release(txn)
        policy = self._policy(txn)
        if verdict.action in (Action.ACCEPT, Action.QUARANTINE, Action.DISCARD) and txn.recipients:
            for check in self.rcpt_checks:
                try:
                    await check.commit(txn, policy)
                except Exception:
                    metrics.internal_errors.labels("commit").inc()
                    log.exception("id=%s commit in %s failed", txn.id, check.name)
        metrics.verdicts.labels(self.frontend, "final", verdict.action.value, verdict.reason or "ok").inc()
        total = time.monotonic() - txn.started
        added = total - txn.timings.get("relay", 0.0)
        metrics.added_latency.labels(self.frontend).observe(max(added, 0.0))
        self._log_line(txn, verdict, downstream_reply, total)

    # --- helpers --------------------------------------------------------------

    def headers(self, txn: Transaction) -> list[tuple[str, str]]:
        """Headers that record the verdict's rule hits, for every front end to add the same way."""
        if not self.add_headers:
            return []
        headers = list(txn.headers_to_add)
        if txn.hits:
            headers.append((f"{self.header_prefix}-Hits", ", ".join(h.label() for h in txn.hits)))
        return headers

    def with_headers(self, txn: Transaction, raw: bytes) -> bytes:
        headers = self.headers(txn)
        if not headers:
            return raw
        return "".join(f"{name}: {value}\r\n" for name, value in headers).encode("utf-8", "replace") + raw

    def _policy(self, txn: Transaction) -> Policy:
        pinned = txn.policy
        return pinned if isinstance(pinned, Policy) else self.policy()

    async def _guard(self, stage: str, txn: Transaction, step: Awaitable[StageResult]) -> StageResult:
        try:
            return await step
        except Exception:
            metrics.internal_errors.labels(stage).inc()
            log.exception("id=%s internal error in %s stage", txn.id, stage)
            return StageResult(INTERNAL_ERROR)

    def _absorb(self, txn: Transaction, result: StageResult, recipient: str | None) -> Verdict:
        for hit in result.hits:
            txn.hits.append(hit if hit.recipient or recipient is None else
                            RuleHit(hit.rule, hit.kind, hit.action, hit.shadow, hit.detail, recipient))
            metrics.rule_hits.labels(hit.rule, hit.kind, hit.action, "shadow" if hit.shadow else "enforce").inc()
        txn.headers_to_add.extend(result.headers)
        return result.verdict or ACCEPT

    @staticmethod
    def _quarantine_from_rcpt_hits(txn: Transaction) -> Verdict:
        hit = txn.quarantine_hit()
        return ACCEPT if hit is None else quarantine("Ok", reason=hit.kind, rule=hit.rule)

    async def _store(self, txn: Transaction, raw: bytes, verdict: Verdict, ctx: MessageContext) -> Verdict:
        if self.quarantine is None:
            return tempfail("4.3.0", "Quarantine not configured, try again later", reason="no_quarantine",
                            rule=verdict.rule)
        try:
            qid = await self.quarantine.put(txn, raw, verdict, txn.hits, dict(ctx.fingerprints))
        except QuarantineFull as e:
            log.warning("id=%s quarantine full: %s", txn.id, e)
            return tempfail("4.3.1", "Insufficient system storage, try again later", reason="quarantine_full",
                            rule=verdict.rule, code=452)
        except Exception:
            metrics.internal_errors.labels("quarantine").inc()
            log.exception("id=%s quarantine write failed", txn.id)
            return tempfail("4.3.0", "Temporary local problem storing the message, try again later",
                            reason="quarantine_error", rule=verdict.rule)
        txn.quarantine_id = qid
        return Verdict(Action.QUARANTINE, 250, "2.0.0", f"Ok: quarantined as {qid}", verdict.rule, verdict.reason)

    async def _relay_rcpt(self, txn: Transaction, recipient: str, options: tuple[str, ...]) -> Verdict:
        """Mirror the RCPT on the route's downstream. The transaction is bound to a route only
        once a recipient is accepted, so a refused first recipient does not pin it."""
        assert self.relay is not None
        route = self.route_for(recipient)
        if txn.route is not None and route != txn.route:
            return tempfail("4.5.3", f"Please send mail for <{recipient}> in a separate transaction",
                            reason="route_split", code=452)
        rtx = self._relayed.get(txn.id)
        if rtx is None and txn.recipients:
            # The downstream transaction holding the earlier recipients broke off: a new one
            # would carry only the later recipients while the sender thinks all are in.
            return tempfail("4.4.2", "Downstream connection lost, try again later", reason="downstream_lost")
        try:
            if rtx is None:
                params = tuple(o for o in txn.mail_options if o.split("=", 1)[0].upper() in
                               ("SIZE", "BODY", "SMTPUTF8"))
                rtx, reply = await self.relay.group(route).begin(txn.connection, txn.sender, params,
                                                                 (recipient, options))
                if rtx is None:
                    return _from_downstream(reply, "mail")
                self._relayed[txn.id] = rtx
            else:
                reply = await rtx.rcpt(recipient, options)
        except DownstreamError as e:
            self._relayed.pop(txn.id, None)
            log.warning("id=%s downstream lost during RCPT: %s", txn.id, e)
            return tempfail("4.4.2", "Downstream connection lost, try again later", reason="downstream_lost")
        if reply.positive:
            txn.route = route
        elif not txn.recipients:
            await self.abort(txn)
        return _from_downstream(reply, "rcpt")

    def _count(self, stage: str, verdict: Verdict) -> Verdict:
        metrics.verdicts.labels(self.frontend, stage, verdict.action.value, verdict.reason or "ok").inc()
        return verdict

    def _log_line(self, txn: Transaction, verdict: Verdict, downstream_reply: str, total: float) -> None:
        conn = txn.connection
        log_event(
            msglog, "message", id=txn.id, client=f"{conn.client_name or 'unknown'}[{conn.client_ip}]",
            helo=conn.helo, sender=f"<{txn.sender}>", rcpts=list(txn.recipients), size=txn.size,
            verdict=verdict.action.value, reason=verdict.reason or "ok", rule=verdict.rule or "",
            hits=[h.label() for h in txn.hits], downstream=txn.downstream,
            reply=downstream_reply or verdict.reply(), t_total=round(total, 4),
            t_scan=round(txn.timings.get("scan", 0.0), 4), t_relay=round(txn.timings.get("relay", 0.0), 4),
        )


def _from_downstream(reply: Reply, stage: str) -> Verdict:
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
