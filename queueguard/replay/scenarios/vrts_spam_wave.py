"""vrts-spam-wave (2022-10-17): a spam wave to info@ takes down clamd on the ticket host.

In the incident a wave of near-identical spam to an info@ address reached the VRT (ticket)
host; its intake spawned Perl workers per message, they ate the VM's RAM, the OOM killer took
clamd, delivery stopped, and 7,353 messages queued on the MX before anyone was paged. The
replay runs the same wave twice against the same ticket host, so the difference is the guard:

- the ticket host is a memory cgroup (root; v1 or v2) holding clamd, the ticket host's
  `queueguard serve` (clamd scan, its governor on this cgroup via `clamd.memory_cgroup`,
  `publish_pressure` on its status page) and a stand-in for the ticket intake that forks one
  worker per message delivered to info@ (WORKER_MB held for WORKER_S seconds, plus a few idle
  ones). clamd's oom_score_adj is raised to stand in for its real size (~1.2 GiB with the
  official database, ~20 MiB with the test one), so when the group runs out the kernel picks
  clamd, as it did; a supervisor restarts it like systemd's Restart= and counts restarts.
- the MX is a real sending Exim (queue, retries) → the MX's `queueguard serve` → route
  `tickets` (info@) toward the ticket host's guard, other mail straight to the downstream
  Exim (maildirs; outside the group, where the intake watches info@'s maildir).
- control arm: both guards pass-through (no rules, no pressure sensors, the route without
  caps or `pressure:`): nothing but clamd's scan stands between the wave and the intake.
- protected arm: the MX runs the shipped default policy (burst threshold 10, since the replay
  sends hundreds, not thousands) and its route (4 at once, 1 while softened) reads the ticket
  host's published pressure;
  the ticket host's governor reads its cgroup's usage (this machine has 24 GiB, so
  MemAvailable/PSI would not move).

After each wave the sender's queue is run every 2 s (`exim -qff`, the retries compressed) for up
to DRAIN_S, until it is empty or three rounds deliver nothing; what is still deferred stays
queued at the sender, and each arm's
accounting must balance: sent = delivered + quarantined + rejected + queued + lost (0).
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
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from queueguard.harness.clamd import Clamd, eicar
from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.replay.cgroup import MemoryGroup
from queueguard.replay.corpus import campaign, distinct
from queueguard.replay.report import Accounting, Summary, account, missing
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
LIMIT = 384 * 1024 * 1024
WORKER_MB = int(os.environ.get("QUEUEGUARD_REPLAY_WORKER_MB", "16"))
"""Memory one intake worker holds; with WORKER_S, chosen so the control arm runs the group out."""
WORKER_S = float(os.environ.get("QUEUEGUARD_REPLAY_WORKER_S", "6"))
IDLE_WORKERS = 2
CLAMD_OOM_SCORE_ADJ = 500
WORKER_OOM_SCORE_ADJ = 300
"""Workers after clamd, before the ticket host's queueguard (the MTA side, which survived on
otrs1001): lowering a score needs CAP_SYS_RESOURCE, which the replay may not have, so the
others are raised."""
INFO = "info@test.example"
LEGIT_INFO_DEADLINE_S = 120.0
"""Legitimate mail to info@ counts as getting through when delivered within this of being sent."""
SAMPLE_S = 0.5
DRAIN_S = 30.0
"""After the wave, how long the sender's compressed retries may run (keeps a full run under 2 minutes)."""

TICKETS = '''\
import os, sys, time
inbox, mb, life, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
seen, children = set(), []
def worker(forever):
    try:
        pid = os.fork()
    except OSError:
        return
    if pid == 0:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(sys.argv[5])
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

PASS_THROUGH = "# pass-through: no rules\nlists: {}\npressure: {psi_memory_some_avg10: null}\n"


def mx_policy() -> str:
    """The shipped default, burst threshold compressed to the replay's size; info@ in the route's list."""
    doc = yaml.safe_load(DEFAULT_POLICY.read_text())
    for rule in doc["bursts"]:
        if rule["name"] == "same-body-wave":
            rule["threshold"] = "10 in 10m"
    doc["lists"]["ticket_addresses"] = [INFO]
    doc["pressure"] = {"psi_memory_some_avg10": None}  # the MX's own memory is not the point here
    return str(yaml.safe_dump(doc, sort_keys=False))


def ticket_policy() -> str:
    """The ticket host: clamd scan, and pressure from its own cgroup's usage."""
    return str(yaml.safe_dump({
        "lists": {},
        "pressure": {"psi_memory_some_avg10": None, "mem_available_below": None,
                     "cgroup_usage_ratio": {"soften": 0.5, "shed": 0.65}, "hold": "2s"},
    }, sort_keys=False))


class Supervisor:
    """Restart clamd when it dies (systemd's Restart=), count restarts, track its peak RSS."""

    def __init__(self, clamd: Clamd, group: MemoryGroup) -> None:
        self.clamd, self.group = clamd, group
        self.restarts = 0
        self.peak_rss = 0
        self.usage: list[float] = []
        """The group's usage / limit every SAMPLE_S: read by the replay, the same in both arms
        (the control arm's guards have no sensors, so their pressure level says nothing)."""
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]

    def place(self) -> None:
        Path(f"/proc/{self.clamd.pid}/oom_score_adj").write_text(str(CLAMD_OOM_SCORE_ADJ))

    def _sample(self) -> None:
        """Its own thread: a clamd restart blocks _run for seconds."""
        while not self._stop.wait(SAMPLE_S):
            with contextlib.suppress(OSError):
                self.usage.append(self.group.usage() / self.group.limit)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            proc = self.clamd.proc
            if proc is not None and proc.poll() is not None:
                self.restarts += 1
                self._restart()
            with contextlib.suppress(RuntimeError, OSError):
                self.peak_rss = max(self.peak_rss, self.clamd.rss())

    def _restart(self) -> None:
        """Start clamd again and move it into the group as soon as it exists. Not with `joined()`:
        the replay itself would sit in a group at its limit for the seconds clamd takes to load,
        and the kernel may pick it. The few pages clamd touches before the move stay charged
        outside (cgroup v1 does not move charges); its database is loaded after."""
        self.clamd.proc = None
        starter = threading.Thread(target=self._start_quietly, daemon=True)
        starter.start()
        deadline = time.monotonic() + 10
        while self.clamd.proc is None and starter.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        proc = self.clamd.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                self.group.add(proc.pid)
                self.place()
        starter.join(30)

    def _start_quietly(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):  # killed again while loading: counted next round
            self.clamd.start()

    def __enter__(self) -> Supervisor:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def messages(scale: float, arm: str) -> list[tuple[str, str, str, bytes]]:
    """Legitimate mail (distinct bodies, many senders; a fifth to info@), a campaign to info@, EICARs
    to info@ (the ticket host scans). The same messages in both arms; ids carry the arm."""
    rng = random.Random(2022)
    n_legit, n_spam, n_virus = max(30, int(150 * scale)), max(120, int(600 * scale)), max(1, int(3 * scale))
    users = ["alice", "bob", "carol", "dave"]
    legit = [(f"{arm}-legit-{i}", s.sender, INFO if i % 5 == 0 else f"{users[i % 4]}@test.example",
              tag(s.raw, f"{arm}-legit-{i}")) for i, s in enumerate(distinct(rng, n_legit))]
    spam = [(f"{arm}-spam-{i}", s.sender, INFO, tag(s.raw, f"{arm}-spam-{i}"))
            for i, s in enumerate(campaign(rng, "mini-cooper", n_spam))]
    virus = [(f"{arm}-virus-{i}", f"v{i}@infected.example", INFO,
              tag(b"Subject: invoice\r\n\r\n" + eicar() + b"\r\n", f"{arm}-virus-{i}")) for i in range(n_virus)]
    out = spam[:]
    for i, m in enumerate(legit + virus):  # spread the others evenly through the wave
        out.insert(min(len(out), (i * len(spam)) // (len(legit) + len(virus)) + i), m)
    return out


@dataclass
class Arm:
    """One run of the wave: what the components say happened (the accounting) and the host's memory."""

    name: str
    accounting: Accounting
    lost: list[str]
    figures: dict[str, Any] = field(default_factory=dict)
    oom_kills: int = 0
    restarts: int = 0
    peak_mib: float | None = None
    levels: list[float] = field(default_factory=list)
    legit_info_in_time: tuple[int, int] = (0, 0)
    legit_other: tuple[int, int] = (0, 0)
    spam_delivered: int = 0
    scan_deferrals: float = 0.0
    route_deferrals: float = 0.0
    broken: list[str] = field(default_factory=list)
    rejected_reasons: set[str] = field(default_factory=set)
    usage: list[float] = field(default_factory=list)

    def measured(self) -> dict[str, Any]:
        """The arm's numbers for --json (the table's figures are for reading)."""
        return {"accounting": self.accounting.as_dict(), "oom_kills": self.oom_kills, "clamd_restarts": self.restarts,
                "peak_mib": self.peak_mib, "limit_mib": LIMIT // 2**20, "max_usage_ratio": max(self.usage, default=0.0),
                "pressure_levels": self.levels, "max_pressure_level": max(self.levels, default=0.0),
                "route_deferrals": self.route_deferrals, "scan_deferrals": self.scan_deferrals,
                "route_pressure_max": self.figures.get("route pressure max", 0.0),
                "legit_info_delivered_in_time": self.legit_info_in_time[0],
                "legit_info_sent": self.legit_info_in_time[1],
                "legit_other_delivered": self.legit_other[0], "legit_other_sent": self.legit_other[1],
                "spam_delivered": self.spam_delivered, "rejected_reasons": sorted(self.rejected_reasons)}


def run(scale: float, workdir: Path) -> Summary:
    control = run_arm("control", scale, subdir(workdir, "control"), protected=False)
    protected = run_arm("protected", scale, subdir(workdir, "protected"), protected=True)
    acc = Accounting()
    for a in (control.accounting, protected.accounting):
        acc.sent += a.sent
        acc.delivered += a.delivered
        acc.quarantined += a.quarantined
        acc.queued_at_sender += a.queued_at_sender
        acc.duplicates += a.duplicates
        for k, v in a.rejected.items():
            acc.rejected[k] = acc.rejected.get(k, 0) + v
    s = Summary("vrts-spam-wave", INCIDENT, scale, acc)
    s.figures["arms"] = {"control": control.figures, "protected": protected.figures}
    s.figures["measured"] = {a.name: a.measured() for a in (control, protected)}
    s.check("control: the host group ran out (OOM kills or clamd restarts)",
            control.oom_kills > 0 or control.restarts > 0,
            f"{control.oom_kills} OOM kills, {control.restarts} clamd restarts, peak {control.peak_mib} MiB")
    s.check("control: mail stalled", control.accounting.queued_at_sender > 0,
            f"{control.accounting.queued_at_sender} still queued at the sender, "
            f"{int(control.scan_deferrals)} scan deferrals")
    s.check("protected: 0 OOM kills, clamd never restarted", protected.oom_kills == 0 and protected.restarts == 0,
            f"{protected.oom_kills} OOM kills, {protected.restarts} restarts, peak {protected.peak_mib} of "
            f"{LIMIT // 2**20} MiB")
    s.check("protected: governor reached soften or shed", max(protected.levels, default=0) >= 1,
            f"timeline {timeline(protected.levels)}")
    s.check("protected: the route slowed from the ticket host's published pressure",
            protected.route_deferrals > 0 or protected.figures.get("route pressure max", 0) >= 1,
            f"route level max {protected.figures.get('route pressure max')}, "
            f"{int(protected.route_deferrals)} route deferrals")
    got, of = protected.legit_info_in_time
    s.check("protected: legitimate mail to info@ delivered within 2 min", of > 0 and got >= 0.9 * of,
            f"{got} of {of} ({100 * got / max(of, 1):.0f} %, target 90 %); control: "
            f"{control.legit_info_in_time[0]} of {control.legit_info_in_time[1]}")
    got, of = protected.legit_other
    s.check("protected: legitimate mail not to info@ delivered", got == of, f"{got} of {of}")
    s.check("protected: the wave held or deferred", protected.spam_delivered <= 20,
            f"{protected.spam_delivered} copies delivered (threshold 10 + those in flight)")
    s.check("protected: EICAR rejected with a reason", "scan:clamav" in protected.rejected_reasons,
            ", ".join(sorted(protected.rejected_reasons)) or "none rejected")
    s.check("quarantine readable", not (control.broken or protected.broken),
            f"{len(control.broken) + len(protected.broken)} broken entries")
    for arm in (control, protected):
        s.note_lost(arm.lost)
    return s


def timeline(levels: list[float]) -> str:
    """Run-length pressure levels, each with the second it began: '0@0s → 1@6.5s → 2@8s → 0@21s'."""
    runs: list[list[int]] = []
    for v in levels:
        lvl = int(v)
        if runs and runs[-1][0] == lvl:
            runs[-1][1] += 1
        else:
            runs.append([lvl, 1])
    return " → ".join(f"{lvl}@{sum(n for _, n in runs[:i]) * SAMPLE_S:g}s" for i, (lvl, _) in enumerate(runs)) or "-"


def usage_timeline(ratios: list[float], every_s: float = 2.0) -> str:
    """The host group's highest usage in each `every_s` window, in percent of its limit."""
    n = max(1, int(every_s / SAMPLE_S))
    return " ".join(f"{round(100 * max(ratios[i:i + n]))}" for i in range(0, len(ratios), n)) or "-"


def run_arm(arm: str, scale: float, workdir: Path, *, protected: bool) -> Arm:
    msgs = messages(scale, arm)
    with MemoryGroup(f"qg-replay-vrts-{arm}-{os.getpid()}", LIMIT) as group:
        downstream = Exim()
        clamd = Clamd(subdir(workdir, "clamd"), max_threads=4)
        tickets: subprocess.Popen[bytes] | None = None
        ticket = Guard({
            "downstreams": [{"address": f"127.0.0.1:{downstream.port}"}],
            "clamd": {"enabled": True, "address": str(clamd.socket), "pid_file": str(clamd.pid_file),
                      "ping_interval": "1s", "memory_cgroup": str(group.path)},
            "node": "ticket1001", "publish_pressure": {"name": "ticket1001", "interval": "1s"},
        }, {"default.yaml": ticket_policy() if protected else PASS_THROUGH}, workdir=subdir(workdir, "ticket"))
        route: dict[str, Any] = {"recipients": ["ticket_addresses"],
                                 "downstreams": [{"address": f"127.0.0.1:{ticket.port}"}]}
        if protected:  # docs/routes.md's concurrency caps, and the ticket host's own report. Not its
            # max_per_minute: a route is chosen at RCPT, so the wave's copies (quarantined at DATA)
            # would use up that budget for info@'s real mail too
            route.update(max_concurrent=4, soften_concurrent=1)
            route["pressure"] = {"source": "http", "url": f"http://127.0.0.1:{ticket.metrics_port}/status.json",
                                 "interval": "1s"}
        mx = Guard({"downstreams": [{"address": f"127.0.0.1:{downstream.port}"}],
                    "routes": {"tickets": route}},
                   {"default.yaml": mx_policy() if protected else PASS_THROUGH.replace(
                       "lists: {}", f"lists: {{ticket_addresses: ['{INFO}']}}")},
                   workdir=subdir(workdir, "mx"))
        sender = SendingExim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", mx.port))
        try:
            downstream.start()
            inbox = downstream.dir / "maildir" / "info"
            with group.joined():  # the ticket host: clamd, the ticket intake, its queueguard
                clamd.start()
                tickets = subprocess.Popen(
                    [sys.executable, "-c", TICKETS, str(inbox), str(WORKER_MB), str(WORKER_S), str(IDLE_WORKERS),
                     str(WORKER_OOM_SCORE_ADJ)])
                ticket.start()
            mx.start()
            supervisor = Supervisor(clamd, group)
            supervisor.place()
            sender.start()
            host = Recorder(f"http://127.0.0.1:{ticket.metrics_port}/metrics",
                            {"queueguard_pressure_level", "queueguard_scan_deferrals_total",
                             "queueguard_pressure_deferrals_total"}, SAMPLE_S).start()
            edge = Recorder(f"http://127.0.0.1:{mx.metrics_port}/metrics",
                            {"queueguard_route_pressure_level", "queueguard_pressure_deferrals_total",
                             "queueguard_route_deferrals_total"}, SAMPLE_S).start()
            with supervisor:
                started = time.monotonic()
                accepted: list[str] = []
                for i in range(0, len(msgs), 20):
                    accepted.extend(inject(sender.port, msgs[i:i + 20], per_connection=20))
                    time.sleep(0.1)
                wave_s = time.monotonic() - started
                _settle(sender)
                _drain(sender, downstream, deadline=time.monotonic() + DRAIN_S)
                time.sleep(1)
            host.stop()
            edge.stop()
            return _measure(arm, accepted, downstream, mx, ticket, sender, group, supervisor, host, edge, wave_s)
        finally:
            sender.close()
            mx.stop()
            ticket.stop()
            if tickets is not None:
                _kill_tree(group, spare={clamd.proc.pid} if clamd.proc is not None else set())
                tickets.wait(10)
            clamd.stop()
            downstream.close()


def _settle(sender: SendingExim, timeout: float = 60.0) -> None:
    """Wait until the sender's delivery attempts are over (no exim delivery processes left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", f"-C {sender.config_path} .*-Mc"], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(0.2)


def _drain(sender: SendingExim, downstream: Exim, *, deadline: float, idle_rounds: int = 3) -> None:
    """The sender's retries, compressed: run its queue every 2 s until it is empty, `idle_rounds`
    rounds in a row delivered nothing, or the deadline passes; what is left stays queued there."""
    before, idle = len(maildir_messages(downstream.dir / "maildir")), 0
    while time.monotonic() < deadline and idle < idle_rounds and sender.queued_ids():
        time.sleep(2)
        sender.flush()
        _settle(sender, timeout=max(0.0, deadline - time.monotonic()))
        count = len(maildir_messages(downstream.dir / "maildir"))
        idle = idle + 1 if count == before else 0
        before = count


def _kill_tree(group: MemoryGroup, spare: set[int]) -> None:
    """The ticket intake and its workers: every process left in the group but `spare` (clamd, which its
    own handle stops after; the guard is stopped before, so killing it again is harmless)."""
    for pid in group.pids():
        if pid not in spare:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _last(rec: Recorder, name: str) -> float:
    values = [v for v in rec.values(name) if v is not None]
    return max(values) if values else 0.0


def _measure(arm: str, accepted: list[str], downstream: Exim, mx: Guard, ticket: Guard, sender: SendingExim,
             group: MemoryGroup, supervisor: Supervisor, host: Recorder, edge: Recorder, wave_s: float) -> Arm:
    delivered: list[Delivered] = maildir_messages(downstream.dir / "maildir", "downstream")
    quarantined, broken = [], []
    for g in (mx, ticket):
        q, b = quarantined_ids(g.dir / "quarantine")
        quarantined += q
        broken += b
    queued = sender.queued_ids()
    rejected = sender.rejections()
    acc = account(accepted, [d.mid for d in delivered], quarantined, rejected, queued)
    got = {d.mid for d in delivered}
    legit = {m for m in accepted if "-legit-" in m}
    legit_info = {m for m in legit if int(m.rsplit("-", 1)[1]) % 5 == 0}
    in_time = {d.mid for d in delivered if d.mid in legit_info
               and d.delivered_at - d.sent_at <= LEGIT_INFO_DEADLINE_S}
    spam = {m for m in accepted if "-spam-" in m}
    peak = group.peak()
    a = Arm(arm, acc, missing(accepted, list(got), quarantined, queued, list(rejected)))
    a.oom_kills, a.restarts = group.oom_kills(), supervisor.restarts
    a.peak_mib = None if peak is None else round(peak / 2**20, 1)
    a.levels = [v or 0.0 for v in host.values("queueguard_pressure_level")]
    a.legit_info_in_time = (len(in_time), len(legit_info))
    a.legit_other = (len((legit - legit_info) & got), len(legit - legit_info))
    a.spam_delivered = len(spam & got)
    a.scan_deferrals = _last(host, "queueguard_scan_deferrals_total")
    a.route_deferrals = _last(edge, "queueguard_route_deferrals_total")
    a.broken = broken
    a.usage = supervisor.usage
    a.rejected_reasons = {rejected[m] for m in accepted if m in rejected and "-virus-" in m}
    lat = latency(d for d in delivered if d.mid in legit_info)
    a.figures = {
        "accounting": acc.equation(),
        "OOM kills": a.oom_kills, "clamd restarts": a.restarts,
        "host group peak MiB": a.peak_mib, "host group limit MiB": LIMIT // 2**20,
        "host memory % of limit, max per 2 s": usage_timeline(supervisor.usage),
        "pressure level timeline (ticket host)": timeline(a.levels),
        "route pressure max": _last(edge, "queueguard_route_pressure_level"),
        "scan deferrals": int(a.scan_deferrals),
        "pressure deferrals (ticket host door)": int(_last(host, "queueguard_pressure_deferrals_total")),
        "route deferrals (MX)": int(a.route_deferrals),
        "legit to info@ delivered ≤ 2 min": f"{len(in_time)} of {len(legit_info)}",
        "legit to info@ latency p50/p99 s": f"{lat['p50_s']}/{lat['p99_s']}",
        "legit not to info@ delivered": f"{a.legit_other[0]} of {a.legit_other[1]}",
        "spam delivered": a.spam_delivered, "spam quarantined": len(spam & set(quarantined)),
        "spam queued at sender": len(spam & set(queued)),
        "still queued at sender": acc.queued_at_sender,
        "wave seconds": round(wave_s, 1),
        "sender deferrals (4xx, retried)": sender.mainlog().count(" == "),
    }
    return a
