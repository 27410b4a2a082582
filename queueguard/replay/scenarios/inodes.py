"""inodes (2014-07-14): the filesystem under the quarantine runs out of inodes during a wave.

In the incident a restore from backup plus queued mail exhausted the root
filesystem's inodes on the lists server; nothing could be written, lists were
down ~16 hours, and there was no inode alert. Here the quarantine lives on a
small tmpfs (4 MiB, 200 inodes) and a wave that a pattern rule quarantines
arrives from a real sending Exim through the guard, with legitimate mail mixed
in. Expected: once the quarantine's inode floor is reached the guard answers
452 4.3.1 (the sender keeps the mail queued), legitimate mail is still
delivered, every quarantine entry reads back whole, and the shipped
QueueguardFilesystemInodesLow (page) fires over the recorded filesystem
metrics (scrape i = minute i, evaluated by promtool). The tmpfs is unmounted
at the end.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.replay.alerts import metric_names
from queueguard.replay.report import Summary, account, missing
from queueguard.replay.scenarios.common import (
    SendingExim,
    check_alerts,
    inject,
    maildir_messages,
    quarantined_ids,
    simple,
    subdir,
)
from queueguard.replay.scrape import Recorder
from queueguard.shipped import ALERT_RULES

INCIDENT = "2014-07-14 lists server out of inodes"
SCRAPE = 0.5
POLICY = """\
patterns:
  - name: restore-wave
    subject: '(?i)^\\[restored\\]'
    action: quarantine
"""


def run(scale: float, workdir: Path) -> Summary:
    wave = max(150, int(300 * scale))  # the filesystem is fixed (200 inodes): the wave must outgrow it
    legit = max(20, int(40 * scale))
    mnt = subdir(workdir, "quarantine-fs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=200,mode=0700", "tmpfs", str(mnt)], check=True)
    downstream = Exim()
    guard = Guard({"downstreams": [{"address": f"127.0.0.1:{downstream.port}"}],
                   "quarantine": {"directory": str(mnt / "q"), "min_free_bytes": 64 * 1024, "min_free_inodes": 10},
                   "queuewatch": {"interval": SCRAPE / 2, "filesystems": [str(mnt)]}},
                  {"wave.yaml": POLICY}, workdir=subdir(workdir, "guard"))
    sender = SendingExim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", guard.port))
    msgs = [(f"wave-{i}", f"restore{i % 9}@lists.example.org", "dave@test.example",
             simple(f"wave-{i}", f"[restored] archive part {i}", f"restored list mail {i}")) for i in range(wave)]
    msgs += [(f"legit-{i}", f"user{i}@example.net", ["alice", "bob", "carol"][i % 3] + "@test.example",
              simple(f"legit-{i}", f"question {i}", "a normal message")) for i in range(legit)]
    msgs.sort(key=lambda m: int(m[0].split("-")[1]) * 1000 // (wave if m[0].startswith("wave") else legit))
    try:
        downstream.start(), guard.start(), sender.start()
        rec = Recorder(f"http://127.0.0.1:{guard.metrics_port}/metrics", metric_names(ALERT_RULES), SCRAPE).start()
        time.sleep(SCRAPE * 4)
        accepted: list[str] = []
        for start in range(0, len(msgs), 10):
            accepted.extend(inject(sender.port, msgs[start:start + 10], per_connection=10))
            time.sleep(0.2)
        time.sleep(SCRAPE * 16)  # the condition holds past the alert's for: 5m
        sender.flush()
        time.sleep(1.0)
        rec.stop()

        delivered = maildir_messages(downstream.dir / "maildir", "downstream")
        quarantined, broken = quarantined_ids(mnt / "q")
        queued = sender.queued_ids()
        rejected = sender.rejections()
        s = Summary("inodes", INCIDENT, scale, account(accepted, [d.mid for d in delivered], quarantined,
                                                         rejected, queued))
        log = sender.mainlog()
        deferred_452 = len(set(re.findall(r"^\S+ \S+ (\S+) == .*452 4\.3\.1", log, re.M)))
        legit_ids = {m for m in accepted if m.startswith("legit-")}
        legit_delivered = {d.mid for d in delivered} & legit_ids
        st = _statvfs(mnt)
        s.check("guard answered 452 4.3.1 when the quarantine hit its inode floor", deferred_452 > 0,
                f"{deferred_452} messages deferred with 452 4.3.1, kept in the sender's queue")
        s.check("quarantine readable, nothing corrupted", not broken and len(quarantined) > 0,
                f"{len(quarantined)} entries read back whole, {len(broken)} broken")
        s.check("legitimate mail still delivered", legit_delivered == legit_ids,
                f"{len(legit_delivered)} of {len(legit_ids)}")
        s.check("no wave message delivered", not any(d.mid.startswith("wave-") for d in delivered),
                "pattern rule quarantines or defers, never relays")
        s.figures.update({"sent": len(accepted), "inodes free at the end": f"{st[0]} of {st[1]}",
                          "wave quarantined": len(quarantined), "wave queued at sender (452)": len(queued)})
        check_alerts(s, rec.scrapes, workdir, page=["QueueguardFilesystemInodesLow"])
        lost = missing(accepted, [d.mid for d in delivered], quarantined, queued, list(rejected))
        s.note_lost(lost)
        return s
    finally:
        sender.close()
        guard.stop()
        downstream.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _statvfs(path: Path) -> tuple[int, int]:
    import os

    st = os.statvfs(path)
    return st.f_favail, st.f_files
