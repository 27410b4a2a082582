"""vrts-spam-wave (2022-10-17): a spam wave to info@ takes down clamd on the ticket host.

In the incident a wave of near-identical spam to an info@ address reached the
VRT (ticket) host; each message spawned Perl workers, they ate the VM's RAM,
the OOM killer took clamd, delivery stopped, and 7,353 messages queued on the
MX before anyone was paged. Here:

- the "ticket host" is a memory-limited cgroup (v1 or v2; root) holding clamd,
  queueguard (`serve` with rate limits, burst quarantine and the clamd scan on)
  and a "ticket system": a process that forks one worker (WORKER_MB, WORKER_S
  seconds) per message delivered to info@, plus a few idle ones. clamd's
  oom_score_adj is raised to stand in for its real size (the official database
  needs ~1.2 GiB; this test database ~20 MB), so if the host runs out of
  memory the kernel picks clamd, as it did; a supervisor restarts clamd and
  counts restarts (target 0).
- a real sending Exim (the MX: queue, retries) relays legitimate mail from many
  senders, a hash-busted spam campaign to info@ (queueguard/replay/corpus.py: random
  tokens, varied subjects) and a few EICAR test messages through the guard to a
  downstream Exim with maildirs (outside the cgroup).
- the policy is the shipped default with two changes for a compressed replay:
  the burst threshold is 10 (the replay sends hundreds, not thousands) and the
  pressure thresholds read the cgroup's usage (this machine has 24 GiB).

After the wave the sender's queue is run once (`exim -qff`); what the guard
still defers stays queued at the sender (its retries continue), and the
accounting must balance: sent = delivered + quarantined + rejected + queued.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import yaml

from queueguard.harness.clamd import Clamd, eicar
from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.replay.cgroup import MemoryGroup
from queueguard.replay.corpus import campaign, distinct
from queueguard.replay.report import Summary, account, missing
from queueguard.replay.scenarios.common import (
    Delivered,
    SendingExim,
    inject,
    latency,
    maildir_messages,
    quarantined_ids,
    subdir,
    tag,
)
from queueguard.replay.scrape import Recorder
from queueguard.shipped import DEFAULT_POLICY

INCIDENT = "2022-10-17 mx1001/otrs1001 spam wave to info@, clamd OOM-killed"
LIMIT = 512 * 1024 * 1024
WORKER_MB = 12
WORKER_S = 4.0
IDLE_WORKERS = 4
CLAMD_OOM_SCORE_ADJ = 500

TICKETS = '''\
import os, sys, time
inbox, mb, life, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
seen, children = set(), []
def worker(forever):
    pid = os.fork()
    if pid == 0:
        buf = bytearray(mb * 1024 * 1024)
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        time.sleep(10 ** 6 if forever else life)
        os._exit(0)
    children.append(pid)
for _ in range(idle):
    worker(True)
while True:
    for sub in ("new", "cur"):
        d = os.path.join(inbox, sub)
        for f in (os.listdir(d) if os.path.isdir(d) else []):
            if f not in seen:
                seen.add(f)
                worker(False)
    for pid in list(children):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                children.remove(pid)
        except ChildProcessError:
            children.remove(pid)
    time.sleep(0.05)
'''


def policy() -> str:
    doc = yaml.safe_load(DEFAULT_POLICY.read_text())
    for rule in doc["bursts"]:
        if rule["name"] == "same-body-wave":
            rule["threshold"] = "10 in 10m"
    doc["pressure"] = {"psi_memory_some_avg10": None, "mem_available_below": None,
                       "cgroup_usage_ratio": {"soften": 0.7, "shed": 0.85}, "hold": "2s"}
    return str(yaml.safe_dump(doc, sort_keys=False))


class Supervisor:
    """Restart clamd when it dies (systemd's Restart=), count restarts, track its peak RSS."""

    def __init__(self, clamd: Clamd, group: MemoryGroup) -> None:
        self.clamd, self.group = clamd, group
        self.restarts = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def place(self) -> None:
        Path(f"/proc/{self.clamd.pid}/oom_score_adj").write_text(str(CLAMD_OOM_SCORE_ADJ))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            proc = self.clamd.proc
            if proc is not None and proc.poll() is not None:
                self.restarts += 1
                self.clamd.proc = None
                with self.group.joined():
                    self.clamd.start()
                self.place()
            with contextlib.suppress(RuntimeError, OSError):
                self.peak_rss = max(self.peak_rss, self.clamd.rss())

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(10)


def messages(scale: float) -> list[tuple[str, str, str, bytes]]:
    """Legitimate mail (distinct bodies, many senders; a fifth to info@), a campaign to info@, EICARs."""
    rng = random.Random(2022)
    n_legit, n_spam, n_virus = max(20, int(150 * scale)), max(60, int(600 * scale)), max(1, int(3 * scale))
    users = ["alice", "bob", "carol", "dave"]
    legit = [(f"legit-{i}", s.sender, "info@test.example" if i % 5 == 0 else f"{users[i % 4]}@test.example",
              tag(s.raw, f"legit-{i}")) for i, s in enumerate(distinct(rng, n_legit))]
    spam = [(f"spam-{i}", s.sender, "info@test.example", tag(s.raw, f"spam-{i}"))
            for i, s in enumerate(campaign(rng, "mini-cooper", n_spam))]
    virus = [(f"virus-{i}", f"v{i}@infected.example", "bob@test.example",
              tag(b"Subject: invoice\r\n\r\n" + eicar() + b"\r\n", f"virus-{i}")) for i in range(n_virus)]
    out = spam[:]
    for i, m in enumerate(legit + virus):  # spread the others evenly through the wave
        out.insert(min(len(out), (i * len(spam)) // (len(legit) + len(virus)) + i), m)
    return out


def run(scale: float, workdir: Path) -> Summary:
    msgs = messages(scale)
    with MemoryGroup(f"qg-replay-vrts-{os.getpid()}", LIMIT) as group:
        downstream = Exim()
        clamd = Clamd(subdir(workdir, "clamd"), max_threads=4)
        tickets: subprocess.Popen[bytes] | None = None
        guard = Guard({
            "downstreams": [{"address": f"127.0.0.1:{downstream.port}"}],
            "clamd": {"enabled": True, "address": str(clamd.socket), "pid_file": str(clamd.pid_file),
                      "ping_interval": "1s"},
        }, {"default.yaml": policy()}, workdir=subdir(workdir, "guard"))
        sender = SendingExim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", guard.port))
        try:
            downstream.start()
            inbox = downstream.dir / "maildir" / "info"
            with group.joined():  # the ticket host: clamd, the ticket system, queueguard
                clamd.start()
                tickets = subprocess.Popen(
                    [sys.executable, "-c", TICKETS, str(inbox), str(WORKER_MB), str(WORKER_S), str(IDLE_WORKERS)])
                guard.start()
            supervisor = Supervisor(clamd, group)
            supervisor.place()
            sender.start()
            rec = Recorder(f"http://127.0.0.1:{guard.metrics_port}/metrics",
                           {"queueguard_pressure_level", "queueguard_scan_deferrals_total",
                            "queueguard_pressure_deferrals_total", "queueguard_quarantined_total",
                            "queueguard_ratelimit_hits_total"}, 0.5).start()
            with supervisor:
                started = time.monotonic()
                accepted: list[str] = []
                for i in range(0, len(msgs), 20):
                    accepted.extend(inject(sender.port, msgs[i:i + 20], per_connection=20))
                    time.sleep(0.1)
                wave_s = time.monotonic() - started
                _settle(sender)
                sender.flush()
                time.sleep(WORKER_S)
            rec.stop()
            delivered = maildir_messages(downstream.dir / "maildir", "downstream")
            quarantined, broken = quarantined_ids(guard.dir / "quarantine")
            queued = sender.queued_ids()
            rejected = sender.rejections()
            acc = account(accepted, [d.mid for d in delivered], quarantined, rejected, queued)
            s = Summary("vrts-spam-wave", INCIDENT, scale, acc)
            _report(s, accepted, delivered, quarantined, broken, queued, rejected, rec, group, supervisor, wave_s)
            s.figures["sender deferrals (451/452, retried)"] = sender.mainlog().count(" == ")
            return s
        finally:
            sender.close()
            guard.stop()
            if tickets is not None:
                _kill_tree(group, spare={clamd.proc.pid} if clamd.proc is not None else set())
                tickets.wait(10)
            clamd.stop()
            downstream.close()


def _settle(sender: SendingExim, timeout: float = 60.0) -> None:
    """Wait until the sender's immediate delivery attempts are over (no exim delivery processes left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", f"-C {sender.config_path} .*-Mc"], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(0.2)


def _kill_tree(group: MemoryGroup, spare: set[int]) -> None:
    """The ticket system and its workers: every process left in the group but `spare` (clamd, which its
    own handle stops after; the guard is stopped before, so killing it again is harmless)."""
    for pid in group.pids():
        if pid not in spare:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _report(s: Summary, accepted: list[str], delivered: list[Delivered], quarantined: list[str], broken: list[str],
            queued: list[str], rejected: dict[str, str], rec: Recorder, group: MemoryGroup,
            supervisor: Supervisor, wave_s: float) -> None:
    legit = {m for m in accepted if m.startswith("legit-")}
    legit_info = {m for m in legit if int(m.split("-")[1]) % 5 == 0}
    got = {d.mid for d in delivered}
    spam = {m for m in accepted if m.startswith("spam-")}
    virus = {m for m in accepted if m.startswith("virus-")}
    lat = latency(d for d in delivered if d.mid in legit)
    oom = group.oom_kills()
    peak = group.peak()
    s.check("clamd survived (restarts)", supervisor.restarts == 0, f"{supervisor.restarts} restarts, "
            f"{oom} OOM kills in the host group")
    s.check("legitimate mail not to info@ delivered", (legit - legit_info) <= got,
            f"{len((legit - legit_info) & got)} of {len(legit - legit_info)}")
    s.check("legitimate mail to info@ delivered or queued at the sender", legit_info <= got | set(queued),
            f"{len(legit_info & got)} delivered, {len(legit_info & set(queued))} deferred by the flood limit "
            f"(still queued, retried), of {len(legit_info)}")
    s.check("viruses rejected with a reason", virus <= set(rejected),
            ", ".join(sorted({rejected[v] for v in virus & set(rejected)})) or "none rejected")
    s.check("quarantine readable", not broken, f"{len(quarantined)} entries read back whole, {len(broken)} broken")
    pressure = [v for v in rec.values("queueguard_pressure_level") if v is not None]
    shed = [v for v in rec.values("queueguard_scan_deferrals_total") if v is not None]
    door = [v for v in rec.values("queueguard_pressure_deferrals_total") if v is not None]
    s.figures.update({
        "wave seconds": round(wave_s, 1), "sent": len(accepted),
        "legit delivered": f"{len(legit & got)} of {len(legit)}",
        "legit latency p50 s": lat["p50_s"], "legit latency p99 s": lat["p99_s"],
        "spam delivered": len(spam & got), "spam quarantined": len(spam & set(quarantined)),
        "spam deferred (queued at sender)": len(spam & set(queued)),
        "clamd restarts": supervisor.restarts, "clamd peak RSS MiB": round(supervisor.peak_rss / 2**20, 1),
        "host group peak MiB": None if peak is None else round(peak / 2**20, 1),
        "host group limit MiB": LIMIT // 2**20, "OOM kills": oom,
        "max pressure level (0/1/2)": max(pressure) if pressure else None,
        "scan deferrals": max(shed) if shed else 0,
        "pressure deferrals": max(door) if door else 0,
    })
    lost = missing(accepted, list(got), quarantined, queued, list(rejected))
    s.note_lost(lost)
