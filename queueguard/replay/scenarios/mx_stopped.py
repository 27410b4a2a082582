"""mx-stopped (2018-06-06): the primary downstream MTA is stopped mid-traffic.

In the incident, Exim on mx1001 was stopped; services pointed at it alone (no
queue, no failover) lost mail, and Phabricator's configured backup was never
tried. Here a real sending Exim (queue and retries) relays through the guard,
which has two downstream Exims in order (primary, backup). The primary is
stopped while mail flows, later started again on the same port. Expected:
mail goes to the backup while the primary is down, back to the primary once it
answers again, and whatever was in flight at the stop gets a 4xx and is
retried by the sender: nothing lost.
"""

from __future__ import annotations

import time
from pathlib import Path

from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.replay.report import Summary, account, missing
from queueguard.replay.scenarios.common import SendingExim, inject, latency, maildir_messages, simple, subdir

INCIDENT = "2018-06-06 mx1001 stopped, no failover"


def run(scale: float, workdir: Path) -> Summary:
    total = max(30, int(300 * scale))
    primary, backup = Exim(), Exim()
    guard = Guard({"downstreams": [{"address": f"127.0.0.1:{primary.port}", "retry_after": "1s"},
                                   {"address": f"127.0.0.1:{backup.port}", "retry_after": "1s"}]},
                  workdir=subdir(workdir, "guard"))
    sender = SendingExim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", guard.port))
    users = ["alice", "bob", "carol", "dave"]
    messages = [(f"mx-{i}", f"svc{i % 7}@services.example", f"{users[i % 4]}@test.example",
                 simple(f"mx-{i}", f"notification {i}", f"task T{1000 + i} changed"))
                for i in range(total)]
    accepted: list[str] = []
    times: dict[str, float] = {}
    try:
        primary.start(), backup.start(), guard.start(), sender.start()

        phases = [("both up", 4.0), ("primary stopped", 5.0), ("primary restored", 10.0)]
        per_phase = total // len(phases)
        for n, (phase, seconds) in enumerate(phases):
            if phase == "primary stopped":
                primary.stop()
            elif phase == "primary restored":
                primary.start()
            times[phase] = time.time()
            batch = messages[n * per_phase:(n + 1) * per_phase if n < len(phases) - 1 else total]
            step = max(1, len(batch) // 12)  # a dozen batches per phase, spread over its seconds
            for start in range(0, len(batch), step):
                accepted.extend(inject(sender.port, batch[start:start + step], per_connection=step))
                time.sleep(seconds * step / len(batch))
        sender.flush(rounds=2)
        time.sleep(1.0)
        on_primary = maildir_messages(primary.dir / "maildir", "primary")
        on_backup = maildir_messages(backup.dir / "maildir", "backup")
        delivered = on_primary + on_backup
        queued = sender.queued_ids()
        rejected = sender.rejections()
        acc = account(accepted, [d.mid for d in delivered], [], rejected, queued)
        deferrals = sender.mainlog().count(" == ")
        s = Summary("mx-stopped", INCIDENT, scale, acc)
        during = [d for d in on_backup if times["primary stopped"] <= d.delivered_at]
        after = [d for d in on_primary if d.delivered_at >= times["primary restored"]]
        s.check("failover to the backup", len(during) > 0,
                f"{len(during)} delivered by the backup after the primary stopped")
        s.check("primary back in use", len(after) > 0, f"{len(after)} delivered by the primary after its restart")
        s.check("nothing left at the sender", not queued, f"{len(queued)} still queued after two queue runs")
        s.check("guard answered 4xx, never 5xx, while a downstream was down", not rejected,
                f"{deferrals} deferrals retried by the sender, {len(rejected)} 5xx")
        lost = missing(accepted, [d.mid for d in delivered], queued, list(rejected))
        s.figures.update({
            "sent": len(accepted), "delivered by primary": len(on_primary), "delivered by backup": len(on_backup),
            "sender deferrals (retried)": deferrals, "latency p50 s": latency(delivered)["p50_s"],
            "latency p99 s": latency(delivered)["p99_s"],
        })
        s.note_lost(lost)
        return s
    finally:
        sender.close()
        guard.stop()
        primary.close()
        backup.close()
