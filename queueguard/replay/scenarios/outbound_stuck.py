"""outbound-stuck (2021-12-03): the outbound MX's next hop stops taking mail; its queue grows.

In the incident a kernel bug dropped packets toward Gmail ("SMTP timeout after
end of data"); the queue alert at 2,000 went to IRC only and nobody was paged
for a day. Here mail flows client -> guard -> MX Exim -> remote (a recording
SMTP server). Midway the remote starts dropping the connection after the end
of DATA, so the MX keeps every message queued. The guard's queue watch reads
the MX's spool every 0.25 s; its /metrics is scraped every 0.5 s and scrape i is
written as minute i of a promtool test, over which the shipped rules are
evaluated by promtool: the paging QueueguardQueueStuck must fire within its
`for:` window. Then the remote recovers, the MX's queue is run, and the
accounting must balance with nothing lost.
"""

from __future__ import annotations

import time
from pathlib import Path

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from queueguard.replay.alerts import metric_names
from queueguard.replay.report import Summary, account, missing
from queueguard.replay.scenarios.common import SendingExim, check_alerts, inject, replay_id, simple, subdir
from queueguard.replay.scrape import Recorder
from queueguard.shipped import ALERT_RULES

INCIDENT = "2021-12-03 mx2001 outbound queue stuck"
SCRAPE = 0.5
HEALTHY_SCRAPES = 8
STUCK_SCRAPES = 42  # 30-minute window + 5-minute for: + margin, in compressed minutes


def run(scale: float, workdir: Path) -> Summary:
    rate = 20 * scale  # messages per second offered to the guard
    remote = RecordingSink()
    remote.start()
    mx = SendingExim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", remote.port))
    guard = Guard({"downstreams": [{"address": f"127.0.0.1:{mx.port}"}],
                   "queuewatch": {"interval": SCRAPE / 2, "exim_spool": str(mx.dir / "spool")}},
                  workdir=subdir(workdir, "guard"))
    accepted: list[str] = []
    n = 0
    try:
        mx.start(), guard.start()
        rec = Recorder(f"http://127.0.0.1:{guard.metrics_port}/metrics", metric_names(ALERT_RULES), SCRAPE)

        def traffic(scrapes: int) -> None:
            nonlocal n
            deadline = len(rec.scrapes) + scrapes
            while len(rec.scrapes) < deadline:
                batch = max(1, round(rate * SCRAPE))
                msgs = [(f"out-{n + i}", f"user{(n + i) % 50}@wikimedia.example", f"staff{(n + i) % 20}@gmail.example",
                         simple(f"out-{n + i}", f"mail {n + i}", "hello from staff")) for i in range(batch)]
                n += batch
                accepted.extend(inject(guard.port, msgs, per_connection=batch))
                time.sleep(SCRAPE)

        rec.start()
        traffic(HEALTHY_SCRAPES)
        with remote.lock:
            remote.behaviour.drop_at = "DATA"  # "SMTP timeout after end of data"
        stuck_from = rec.mark()
        traffic(STUCK_SCRAPES)
        peak_queue = mx.queue_count()
        with remote.lock:
            remote.behaviour.drop_at = None
        mx.run_queue()  # the fix: the path works again and the queue is run
        time.sleep(SCRAPE * 4)
        rec.stop()

        delivered = [mid for m in remote.messages if (mid := replay_id(m.data))]
        queued = mx.queued_ids()
        s = Summary("outbound-stuck", INCIDENT, scale, account(accepted, delivered, [], {}, queued))
        s.figures.update({"sent": len(accepted), "MX queue at the end of the stall": peak_queue,
                          "stall began at minute": stuck_from, "delivered": len(delivered)})
        check_alerts(s, rec.scrapes, workdir, page=["QueueguardQueueStuck"], report=["QueueguardMtaQueueHigh"],
                     match={"QueueguardQueueStuck": {"mta": "exim"}})
        s.check("queue drained after recovery", not queued, f"{len(queued)} left in the MX queue")
        lost = missing(accepted, delivered, queued)
        s.note_lost(lost)
        return s
    finally:
        guard.stop()
        mx.close()
        remote.stop()

