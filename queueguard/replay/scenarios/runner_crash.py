"""runner-crash (2023-03-09): Mailman's out runner dies and is not restarted; the out queue grows.

In the incident the out runner crashed on a database blip during network
maintenance; Mailman kept accepting and processing list mail, so the out queue
grew for two days; the runner check went to IRC unseen and the out queue was
not monitored at all. Here a real Mailman-3-shaped spool (var/queue/<queue>/
with `<time>+<sha1>.pck` files) is fed list mail; stand-in runner processes
(argv `.../bin/runner --runner=NAME:0:1`, what Mailman's master starts) idle,
except `out`, which sends each queued file to an SMTP server and removes it.
The out runner is killed with SIGKILL mid-traffic. The guard watches the spool
and the runners (queue watch every 0.25 s, scraped every 0.5 s; scrape i is
minute i), and promtool evaluates the shipped rules over the recording: the
paging QueueguardMailmanRunnerMissing and QueueguardQueueStuck (out) must fire
within their `for:` windows. Then the runner is started again and drains the
queue: nothing lost. The .pck files hold the raw message, not a pickle (the
stand-in runner is not Mailman; the spool layout and names are).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from queueguard.queuewatch.system import DEFAULT_MAILMAN_RUNNERS
from queueguard.replay.alerts import metric_names
from queueguard.replay.report import Summary, account, missing
from queueguard.replay.scenarios.common import check_alerts, replay_id, simple, subdir
from queueguard.replay.scrape import Recorder
from queueguard.shipped import ALERT_RULES

INCIDENT = "2023-03-09 lists1001 Mailman out runner crashed"
SCRAPE = 0.5
HEALTHY_SCRAPES = 8
STUCK_SCRAPES = 42

RUNNER = '''\
import os, smtplib, sys, time
queue, port = sys.argv[-2], int(sys.argv[-1])
name = [a for a in sys.argv if a.startswith("--runner=")][0].split("=")[1].split(":")[0]
while True:
    if name != "out":
        time.sleep(0.2)
        continue
    files = sorted(f for f in os.listdir(queue) if f.endswith(".pck"))
    if not files:
        time.sleep(0.05)
        continue
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        for f in files[:50]:
            path = os.path.join(queue, f)
            with open(path, "rb") as fh:
                raw = fh.read()
            c.sendmail("list-bounces@lists.example.org", ["member@members.example"], raw)
            os.unlink(path)
'''


def enqueue(queue: Path, raw: bytes) -> None:
    """Mailman's switchboard names: `<time.time()>+<sha1 hex>.pck`, written then renamed into place."""
    name = f"{time.time():.6f}+{hashlib.sha1(raw).hexdigest()}.pck"
    tmp = queue / (name + ".tmp")
    tmp.write_bytes(raw)
    os.rename(tmp, queue / name)


def run(scale: float, workdir: Path) -> Summary:
    rate = 40 * scale  # list deliveries per second into the out queue
    var = subdir(workdir, "mailman/var/queue")
    for q in ("in", "pipeline", "out", "virgin", "archive", "bounces", "command", "bad", "shunt"):
        (var / q).mkdir(exist_ok=True)
    script = subdir(workdir, "mailman/bin") / "runner"
    script.write_text(RUNNER)
    sink = RecordingSink()
    sink.start()
    guard = Guard({"queuewatch": {"interval": SCRAPE / 2, "mailman_queue": str(var)}},
                  workdir=subdir(workdir, "guard"))
    runners: dict[str, subprocess.Popen[bytes]] = {}

    def start_runner(name: str) -> None:
        runners[name] = subprocess.Popen([sys.executable, str(script), "-C", "mailman.cfg", f"--runner={name}:0:1",
                                          str(var / "out"), str(sink.port)])

    sent: list[str] = []
    n = 0
    try:
        for name in DEFAULT_MAILMAN_RUNNERS:
            start_runner(name)
        guard.start()
        rec = Recorder(f"http://127.0.0.1:{guard.metrics_port}/metrics", metric_names(ALERT_RULES), SCRAPE)

        def traffic(scrapes: int) -> None:
            nonlocal n
            deadline = len(rec.scrapes) + scrapes
            while len(rec.scrapes) < deadline:
                for _ in range(max(1, round(rate * SCRAPE))):
                    mid = f"list-{n}"
                    post = simple(mid, f"[wikitech-l] post {n}", "a list post", "wikitech-l@lists.example.org")
                    enqueue(var / "out", post)
                    sent.append(mid)
                    n += 1
                time.sleep(SCRAPE)

        rec.start()
        traffic(HEALTHY_SCRAPES)
        runners["out"].send_signal(signal.SIGKILL)  # the crash; nothing restarts it
        runners["out"].wait()
        crashed_at = rec.mark()
        traffic(STUCK_SCRAPES)
        peak = len(list((var / "out").glob("*.pck")))
        start_runner("out")  # "systemctl restart mailman3"
        deadline = time.monotonic() + 60
        while list((var / "out").glob("*.pck")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(SCRAPE * 4)
        rec.stop()

        delivered = [mid for m in sink.messages if (mid := replay_id(m.data))]
        queued = [replay_id(p.read_bytes()) or p.name for p in (var / "out").glob("*.pck")]
        s = Summary("runner-crash", INCIDENT, scale, account(sent, delivered, [], {}, queued))
        s.figures.update({"list deliveries queued": len(sent), "out queue when the runner came back": peak,
                          "runner crashed at minute": crashed_at, "delivered": len(delivered)})
        check_alerts(s, rec.scrapes, workdir, page=["QueueguardMailmanRunnerMissing", "QueueguardQueueStuck"],
                     report=["QueueguardMailmanOutQueueHigh"],
                     match={"QueueguardMailmanRunnerMissing": {"runner": "out"},
                            "QueueguardQueueStuck": {"mta": "mailman", "queue": "out"}})
        s.check("out queue drained after the restart", not queued, f"{len(queued)} files left in out/")
        lost = missing(sent, delivered, queued)
        s.note_lost(lost)
        return s
    finally:
        guard.stop()
        for p in runners.values():
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        sink.stop()
