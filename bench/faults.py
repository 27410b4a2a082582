"""Fault matrix: under each fault we can produce, every message a real retrying sender offered is
accounted for: delivered once, durably quarantined, rejected 5xx for a stated reason, or still
queued at the sender after a 4xx. Results and the command: docs/reliability.md.

    .venv/bin/python -m bench.faults [--messages 1000] [--only clamd-sigkill,redis-hang] [--json FILE]

Per fault, with real processes on loopback only:

    injector ─SMTP─► sending Exim (own queue, retries) ─SMTP─► queueguard serve ─► downstream Exim (maildirs)
                                                          clamd, Redis, quarantine dir (tmpfs), memory cgroup

Every message carries its own id (`X-Replay-Id`, bench/scenarios/common.py). A tenth have a subject
the policy quarantines; with clamd in the row, one in fifty carries the EICAR test string (5xx).
Timeline: the first third is offered; when a sixth have gone through, the fault is injected, while
the sender is still delivering; the middle third is offered into the fault, which is held (`hold`)
while the sender retries; the fault is removed (the component restarted, the disk freed ...); the
last third is offered; the sender's queue is flushed (`exim -qff`, up to FLUSH_ROUNDS times) and the
downstreams' queues run. Then the accounting reads the components, never the guard: downstream
acceptances (`<=` lines; each must be in a maildir or spool there), the quarantine directory
(entries whose .eml matches the sha256 in their .json), the sender's mainlog (`**` lines: 5xx
with the reason) and its spool (-H files).
Lost: offered and in none of these. Duplicated: delivered twice, quarantined twice, both, or
delivered/quarantined while still queued at the sender (its next retry would deliver it again).

Each fault also has a witness read from the components (an OOM kill counted by the cgroup, the
sender's 4xx lines, a metric of the guard), so a row whose fault never hit the mail says so.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from queueguard.harness.clamd import Clamd, eicar
from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.replay.cgroup import MemoryGroup
from queueguard.replay.scenarios.common import (
    SENDER_DOMAIN,
    SendingExim,
    inject,
    maildir_messages,
    replay_id,
    simple,
    tag,
)
from tests.components.redis import RedisServer

USERS = ("alice", "bob", "carol", "dave")
HOLD_EVERY = 10
VIRUS_EVERY = 50
FLUSH_ROUNDS = 4
BATCH = 10  # Exim queues (does not deliver at once) past 10 messages per connection
BACKOFF = 0.25  # the guard's first back-off from a failed downstream (it doubles up to 8x)
POLICY = """\
# The fault matrix's policy: a pattern that quarantines, and a rate limit and a burst rule that
# never trigger but make every message touch the state store (Redis in the Redis rows).
patterns:
  - name: hold-for-review
    subject: '(?i)^\\[hold\\]'
    action: quarantine
ratelimits:
  - name: recipient-ceiling
    key: recipient
    rate: 1000000/1m
    burst: 100000
    action: tempfail
bursts:
  - name: same-body
    fingerprint: body
    threshold: 100000 in 10m
    action: quarantine
scan:
  clamav: {on_infected: reject, on_error: tempfail}
pressure:
  psi_memory_some_avg10: null
  mem_available_below: null
  cgroup_usage_ratio: {soften: 0.6, shed: 0.8}
  hold: 1s
"""
BROKEN_POLICY = POLICY.replace("^\\[hold\\]", "^[hold")  # an unclosed character class: RE2 refuses it


# --- messages and accounting ------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    mid: str
    sender: str
    rcpt: str
    raw: bytes
    expect: str  # delivered, quarantined or rejected

    def as_tuple(self) -> tuple[str, str, str, bytes]:
        return self.mid, self.sender, self.rcpt, self.raw


def messages(prefix: str, n: int, *, viruses: bool) -> list[Message]:
    """n distinct messages: a tenth held by the policy, one in fifty EICAR when clamd scans."""
    out = []
    for i in range(n):
        mid = f"{prefix}-{i}"
        sender = f"{USERS[i % 4]}@{SENDER_DOMAIN}"  # bounces stay at the sender, in its maildirs
        rcpt = f"{USERS[(i // 4) % 4]}@test.example"
        if viruses and i % VIRUS_EVERY == VIRUS_EVERY // 2:
            out.append(Message(mid, sender, rcpt, tag(b"Subject: invoice\r\n\r\n" + eicar() + b"\r\n", mid),
                               "rejected"))
        elif i % HOLD_EVERY == HOLD_EVERY - 1:
            out.append(Message(mid, sender, rcpt, simple(mid, f"[hold] offer {i}", f"bulk offer number {i}"),
                               "quarantined"))
        else:
            out.append(Message(mid, sender, rcpt, simple(mid, f"report {i}", f"status of task T{i} changed"),
                               "delivered"))
    return out


def spool_ids(exim: Exim) -> list[str]:
    """Message ids in an Exim's queue, from its spool's -H files."""
    ids = []
    for h in (exim.dir / "spool" / "input").rglob("*-H"):
        with contextlib.suppress(FileNotFoundError):  # delivered while we listed
            m = re.search(rb"X-Replay-Id: *(\S+)", h.read_bytes(), re.I)
            if m:
                ids.append(m.group(1).decode())
    return ids


def quarantine_ids(directory: Path) -> tuple[list[str], int]:
    """(ids of whole quarantine entries, entries that do not read back whole), from the files:
    what is durable counts, whether or not the index has caught up."""
    ids, broken = [], 0
    for meta_path in (directory / "msg").glob("*/*.json"):
        try:
            meta = json.loads(meta_path.read_bytes())
            raw = meta_path.with_suffix(".eml").read_bytes()
        except (OSError, ValueError):
            broken += 1
            continue
        mid = replay_id(raw)
        if mid is None or meta.get("sha256") != hashlib.sha256(raw).hexdigest():
            broken += 1
        else:
            ids.append(mid)
    return ids, broken


def rejections(sender: Exim) -> dict[str, str]:
    """id -> the 5xx reason the sender logged (`**` lines), via Exim's id of each message."""
    log = sender.mainlog()
    by_exim = dict(re.findall(r"^\S+ \S+ (\S+) <= .*? id=(\S+)@replay\.test", log, re.M))
    out = {}
    for exim_id, text in re.findall(r"^\S+ \S+ (\S+) \*\* .*?: (5\d\d .*)$", log, re.M):
        if exim_id in by_exim:
            found = re.search(r"\((\w+:[\w.-]+)\)\s*$", text)
            out[by_exim[exim_id]] = found.group(1) if found else text[:60]
    return out


def deferrals(sender: Exim) -> list[str]:
    """The sender's `==` lines: each a 4xx (or a connection failure) it will retry."""
    return re.findall(r"^\S+ \S+ \S+ == (.*)$", sender.mainlog(), re.M)


@dataclass
class Row:
    fault: str
    how: str
    offered: int = 0
    delivered: int = 0
    quarantined: int = 0
    rejected: int = 0
    queued: int = 0
    lost: int = 0
    duplicated: int = 0
    deferrals: int = 0
    misplaced: int = 0
    witness: str = ""
    witnessed: bool = False
    seconds: float = 0.0
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)
    unexplained_ids: list[str] = field(default_factory=list)
    misplaced_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and not self.unexplained_ids and not self.misplaced_ids and self.witnessed
                and self.offered > 0)


def tally(row: Row, offered: Sequence[Message], delivered: Sequence[str], quarantined: Sequence[str],
          rejected: dict[str, str], queued: Sequence[str], cut: set[str]) -> None:
    """Place every offered message once; count the lost, the duplicated and the misplaced.

    `delivered` has one entry per acceptance by a downstream (its `<=` log line), so a downstream
    that re-delivers its own spool is not our duplicate. A duplicate is *explained* when the
    sender's transaction for it was cut after the whole body was sent (`cut`): then the downstream
    may have said 250 and we could not pass it on, the duplicate window SMTP has (RFC 1047)."""
    d, q, s = Counter(delivered), Counter(quarantined), set(queued)
    row.offered = len(offered)
    for m in offered:
        copies = d[m.mid] + q[m.mid]
        if copies > 1 or (copies and m.mid in s):
            row.duplicated_ids.append(m.mid)
            why = "cut after the body" if m.mid in cut else "UNEXPLAINED"
            row.notes.append(f"{m.mid}: accepted downstream {d[m.mid]}x, quarantined {q[m.mid]}x, "
                             f"{'still' if m.mid in s else 'not'} queued ({why})")
            if m.mid not in cut:
                row.unexplained_ids.append(m.mid)
        if d[m.mid]:
            place = "delivered"
        elif q[m.mid]:
            place = "quarantined"
        elif m.mid in rejected:
            place = "rejected"
        elif m.mid in s:
            place = "queued"
        else:
            row.lost_ids.append(m.mid)
            continue
        setattr(row, place, getattr(row, place) + 1)
        if place != m.expect and place != "queued":
            row.misplaced_ids.append(m.mid)
    row.lost, row.duplicated, row.misplaced = len(row.lost_ids), len(row.duplicated_ids), len(row.misplaced_ids)


def receptions(exim: Exim) -> list[str]:
    """One id per message the Exim accepted (its `<=` lines)."""
    return re.findall(r"^\S+ \S+ \S+ <= .*? id=(\S+)@replay\.test", exim.mainlog(), re.M)


CUT = re.compile(r"in response to end of data|4\.4\.2 Downstream connection lost")


def cut_after_body(sender: Exim) -> set[str]:
    """Ids whose delivery attempt ended, after the whole body was sent, without a reply: the guard
    died at end of data, or told us the downstream did (451 4.4.2)."""
    log = sender.mainlog()
    by_exim = dict(re.findall(r"^\S+ \S+ (\S+) <= .*? id=(\S+)@replay\.test", log, re.M))
    return {by_exim[e] for e, text in re.findall(r"^\S+ \S+ (\S+) == (.*)$", log, re.M)
            if e in by_exim and CUT.search(text)}


# --- the rig --------------------------------------------------------------------------------

def settle(exim: Exim, timeout: float = 120.0) -> None:
    """Wait until no process of this Exim but its daemon runs: receptions and deliveries are over."""
    config = str(exim.config_path).encode()
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        busy = False
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == exim.pid:
                continue
            with contextlib.suppress(OSError):
                if config in (proc / "cmdline").read_bytes():
                    busy = True
                    break
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1)


def wait_empty(exim: Exim, timeout: float = 15.0) -> bool:
    """Wait until an Exim's spool is empty (a downstream delivers right after its 250)."""
    deadline = time.monotonic() + timeout
    while spool_ids(exim):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def flush(exim: Exim, runners: int = 4) -> None:
    """Force a delivery attempt for every queued message; parallel queue runners (Exim locks each
    message, so none is attempted twice at once). Returns when the runners are done."""
    with ThreadPoolExecutor(runners) as pool:
        list(pool.map(lambda _: exim.run("-qff", check=False), range(runners)))


@dataclass(frozen=True)
class Needs:
    """What a row starts besides the sender, the guard and one downstream."""

    clamd: bool = False
    redis: bool = False
    downstreams: int = 1
    tmpfs: str = ""  # mount options of a tmpfs under the quarantine
    cgroup: int = 0  # memory limit (bytes) of a group clamd lives in
    downstream_data_acl: str = ""


class Rig:
    """The components of one row, started in order and stopped in reverse."""

    def __init__(self, needs: Needs, workdir: Path, *, keep: bool = False) -> None:
        self.needs = needs
        self.keep = keep  # leave the Exims' dirs (logs, spools) for a post-mortem
        self.workdir = workdir
        self.downstreams = [Exim(data_acl=needs.downstream_data_acl) for _ in range(needs.downstreams)]
        self.clamd = Clamd(workdir / "clamd", max_threads=4) if needs.clamd else None
        self.redis = RedisServer(workdir / "redis") if needs.redis else None
        self.group = MemoryGroup(f"qg-faults-{os.getpid()}-{workdir.name}", needs.cgroup) if needs.cgroup else None
        self.qfs = workdir / "qfs"
        self.qfs.mkdir(parents=True, exist_ok=True)
        self.quarantine = self.qfs / "q"
        settings: dict[str, Any] = {
            "downstreams": [{"address": f"127.0.0.1:{d.port}", "retry_after": BACKOFF} for d in self.downstreams],
            "quarantine": {"directory": str(self.quarantine), "min_free_bytes": 0, "min_free_inodes": 0},
        }
        if self.clamd is not None:
            settings["clamd"] = {"enabled": True, "address": str(self.clamd.socket),
                                 "pid_file": str(self.clamd.pid_file), "ping_interval": "1s", "breaker_reset": "1s"}
            if self.group is not None:
                settings["clamd"]["memory_cgroup"] = str(self.group.path)
        if self.redis is not None:
            settings["state"] = self.redis.url
        (workdir / "guard").mkdir(exist_ok=True)
        self.guard = Guard(settings, {"faults.yaml": POLICY}, workdir=workdir / "guard")
        self.sender = SendingExim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", self.guard.port))
        self.extra: dict[str, Any] = {}
        self._mounted = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Rig:
        try:
            if self.needs.tmpfs:
                subprocess.run(["mount", "-t", "tmpfs", "-o", self.needs.tmpfs, "tmpfs", str(self.qfs)], check=True)
                self._mounted = True
            for d in self.downstreams:
                self._stack.callback(d.close if not self.keep else d.stop)
                d.start()
            if self.group is not None:
                self._stack.enter_context(self.group)
            if self.clamd is not None:
                self._stack.callback(self.clamd.stop)
                self.start_clamd()
            if self.redis is not None:
                self._stack.callback(self.redis.stop)
                self.redis.start()
            self._stack.callback(self.guard.stop)
            self.guard.start()
            self._stack.callback(self.sender.close if not self.keep else self.sender.stop)
            self.sender.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start_clamd(self) -> None:
        """Start clamd (in the memory group when the row has one, the first to go when it is full)."""
        assert self.clamd is not None
        if self.group is None:
            self.clamd.start()
            return
        with self.group.joined():
            self.clamd.start()
        Path(f"/proc/{self.clamd.pid}/oom_score_adj").write_text("1000")

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._stack.close()
        finally:
            if self._mounted:
                subprocess.run(["umount", "-l", str(self.qfs)], check=False)
                self._mounted = False

    def offer(self, msgs: Sequence[Message], parallel: int = 3) -> list[str]:
        """Hand messages to the sender over `parallel` connections at a time, BATCH per connection,
        as fast as it takes them."""
        batches = [[m.as_tuple() for m in msgs[i:i + BATCH]] for i in range(0, len(msgs), BATCH)]
        with ThreadPoolExecutor(parallel) as pool:
            return [mid for got in pool.map(lambda b: inject(self.sender.port, b, per_connection=BATCH), batches)
                    for mid in got]

    def progress(self) -> int:
        """Messages through the guard so far: files in the downstreams' maildirs and the quarantine."""
        files = sum(1 for d in self.downstreams for _ in (d.dir / "maildir").glob("*/*/*"))
        return files + sum(1 for _ in (self.quarantine / "msg").glob("*/*.json"))

    def wait_progress(self, count: int, done: Callable[[], bool], timeout: float = 60.0) -> None:
        """Wait until `count` messages went through (or the offering is over): the fault then strikes
        mid-flow, with the sender still handing mail to the guard."""
        deadline = time.monotonic() + timeout
        while self.progress() < count and not done() and time.monotonic() < deadline:
            time.sleep(0.02)

    def metric(self, name: str, **labels: str) -> float:
        try:
            return self.guard.metric(name, **labels)
        except OSError:
            return 0.0


# --- the faults -----------------------------------------------------------------------------

Witness = tuple[bool, str]


@dataclass(frozen=True)
class Fault:
    name: str
    how: str
    inject: Callable[[Rig], None]
    remove: Callable[[Rig], None]
    witness: Callable[[Rig], Witness]
    needs: Needs = Needs()
    hold: float = 2.0  # seconds the fault lasts at the least; the sender retries meanwhile


def _sender_4xx(rig: Rig, pattern: str = "") -> Witness:
    """Whether the sender logged deferrals matching `pattern`, and the commonest of them (or, when
    none matched, the commonest of the others: what to look at when a witness fails)."""
    every = deferrals(rig.sender)
    lines = [x for x in every if re.search(pattern, x)]
    kinds = Counter(_gist(x) for x in lines)
    sample = "; ".join(f"{n} x `{k}`" for k, n in kinds.most_common(2))
    if not lines and every:
        others = "; ".join(f"{n} x `{k}`" for k, n in Counter(_gist(x) for x in every).most_common(2))
        sample = f"none matching {pattern!r} (others: {others})"
    return bool(lines), f"sender deferrals: {sample or 'none'}"


def _gist(line: str) -> str:
    """A deferral without its addresses and ids: the reply text, or Exim's own error."""
    m = (re.search(r"(\d{3} \d\.\d\.\d+ .*?)(?: \(.*\))?$", line)
         or re.search(r"defer \(-?\d+\)(?: H=\S+ \[[^\]]*\])?:? (.*)$", line))
    text = m.group(1) if m else line
    return re.sub(r"127\.0\.0\.1:\d+|\d+\.\d+s|[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}", "…", text)[:80]


# clamd killed ---------------------------------------------------------------------------------

def _clamd_kill(rig: Rig) -> None:
    assert rig.clamd is not None
    in_flight = _until(lambda: rig.metric("queueguard_scan_in_flight"))
    rig.clamd.kill9()
    rig.extra["in_flight_at_kill"] = in_flight


def _clamd_restart(rig: Rig) -> None:
    rig.start_clamd()


def _clamd_kill_witness(rig: Rig) -> Witness:
    """Scans that failed and senders deferred prove the kill hit the mail. How many scans were in
    flight is reported, not required: on an idle box a scan takes milliseconds and the /metrics
    poll that precedes the kill rarely catches one running."""
    errors = rig.metric("queueguard_scans_total", result="error")
    ok, text = _sender_4xx(rig, r"45\d")
    in_flight = rig.extra.get("in_flight_at_kill", 0)
    return ok and errors > 0, (
        f"{in_flight:.0f} scans in flight at the kill; {errors:.0f} scan errors; {text}")


HOG = """
import sys
hoard = []
for line in sys.stdin:
    hoard.append(bytearray(int(line)))
    for i in range(0, len(hoard[-1]), 4096):
        hoard[-1][i] = 1
    print(len(hoard), flush=True)
"""


def _hog(rig: Rig) -> subprocess.Popen[bytes]:
    """A process in the row's memory group that allocates (and touches) what it is told to."""
    assert rig.group is not None
    with rig.group.joined():
        hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    rig.extra["hog"] = hog
    return hog


def _feed(hog: subprocess.Popen[bytes], size: int) -> bool:
    """Ask the hog for `size` more bytes; False when it could not (it died)."""
    assert hog.stdin is not None and hog.stdout is not None
    try:
        hog.stdin.write(b"%d\n" % size)
        hog.stdin.flush()
        return bool(hog.stdout.readline())
    except OSError:
        return False


def _stop_hog(rig: Rig) -> None:
    hog = rig.extra.pop("hog", None)
    if hog is not None:
        hog.kill()
        hog.wait(10)


def _clamd_oom(rig: Rig) -> None:
    """Fill the group until the kernel's OOM killer acts: it picks clamd (oom_score_adj 1000)."""
    assert rig.clamd is not None and rig.group is not None and rig.clamd.proc is not None
    proc = rig.clamd.proc
    hog = _hog(rig)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and _feed(hog, 8 << 20):
        pass
    proc.wait(30)
    rig.extra.update(clamd_exit=proc.returncode, hog_alive=hog.poll() is None, oom=rig.group.oom_kills())
    rig.clamd.proc = None


def _clamd_oom_remove(rig: Rig) -> None:
    _stop_hog(rig)
    rig.start_clamd()


def _clamd_oom_witness(rig: Rig) -> Witness:
    """The kill, counted by the cgroup, and senders deferred: 451 from a scan that found clamd
    gone, or 421/451 from admission shedding on the memory pressure that came with it (which of
    the two answers first depends on when the governor samples)."""
    exit_, oom = rig.extra.get("clamd_exit"), rig.extra.get("oom", 0)
    ok, text = _sender_4xx(rig, r"4[25]\d")
    return ok and exit_ == -signal.SIGKILL and oom >= 1, (
        f"clamd exit {exit_}, {oom} OOM kill(s) in the group, hog alive: {rig.extra.get('hog_alive')}; {text}")


def _pressure_spike(rig: Rig) -> None:
    """Grow the group's usage past the shed threshold (0.8 of the limit), short of its limit."""
    assert rig.group is not None
    hog = _hog(rig)
    while rig.group.usage() < 0.88 * rig.group.limit and _feed(hog, 4 << 20):
        pass
    deadline = time.monotonic() + 10
    while rig.metric("queueguard_pressure_level") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    rig.extra["level"] = rig.metric("queueguard_pressure_level")


def _pressure_remove(rig: Rig) -> None:
    _stop_hog(rig)
    deadline = time.monotonic() + 15
    while rig.metric("queueguard_pressure_level") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)


def _pressure_witness(rig: Rig) -> Witness:
    assert rig.group is not None
    shed = rig.metric("queueguard_scan_deferrals_total") + rig.metric("queueguard_pressure_deferrals_total")
    ok, text = _sender_4xx(rig, r"4\.3\.2")
    oom = rig.group.oom_kills()
    return ok and oom == 0 and rig.extra.get("level") == 2, (
        f"pressure level {rig.extra.get('level')} during the spike, {shed:.0f} pressure and scan deferrals, "
        f"{oom} OOM kills; {text}")


# downstreams --------------------------------------------------------------------------------

def _kill(d: Exim) -> None:
    """kill -9 an Exim's process group: the daemon and every session, mid-DATA or not."""
    assert d.pid is not None
    os.killpg(d.pid, signal.SIGKILL)
    d.stop()  # reaps it


def _kill_downstream(rig: Rig) -> None:
    _kill(rig.downstreams[0])


def _stop_downstreams(rig: Rig) -> None:
    """Stop every downstream as `systemctl stop` would with a 1 s stop timeout: SIGTERM, then
    SIGKILL for what is left. An Exim session that got its message before the SIGTERM may go on
    taking messages on its open connection; that is not a downstream that is down."""
    pids = [d.pid for d in rig.downstreams]
    for pid in pids:
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
    time.sleep(1.0)
    for pid, d in zip(pids, rig.downstreams, strict=True):
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        d.stop()


def _start_downstreams(rig: Rig) -> None:
    for d in rig.downstreams:
        d.start()


def _mid_data_witness(rig: Rig) -> Witness:
    lost = rig.guard.log().count("lost during DATA")
    ok, text = _sender_4xx(rig, r"45\d")
    return ok and lost > 0, f"guard log: {lost} downstream sessions lost during DATA; {text}"


def _all_down_witness(rig: Rig) -> Witness:
    return _sender_4xx(rig, r"451 4\.4\.")


GARBAGE = (
    b"\x00\xff\xfe garbage \x01\r\n",
    b"250-a reply that never ends\r\n",
    b"25O OK (a letter O)\r\n",
    b"hello world\r\n",
    b"250",  # then the connection closes: no line end
    b"2500 OK\r\n",
    b"\r\n",
)


class GarbageServer:
    """Stands in for a broken MTA on the downstream's port: speaks SMTP until one command of the
    session, then answers it with garbage. Fault injection: no real MTA does this on demand."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sessions = 0
        self.after_data = 0
        self._stop = threading.Event()
        deadline = time.monotonic() + 10
        while True:  # the stopped Exim's last sessions may still hold the port for a moment
            try:
                self._srv = socket.create_server(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._srv.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> GarbageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._srv.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            self.sessions += 1
            threading.Thread(target=self._serve, args=(conn, self.sessions), daemon=True).start()

    def _serve(self, c: socket.socket, n: int) -> None:
        garbage = GARBAGE[n % len(GARBAGE)]
        at = ("end", "banner", "end", "EHLO", "end", "MAIL", "end", "RCPT", "end", "DATA")[n % 10]
        with c, contextlib.suppress(OSError):
            c.settimeout(30)
            f = c.makefile("rb")
            if at == "banner":
                c.sendall(garbage)
                return
            c.sendall(b"220 garbage.test ESMTP\r\n")
            in_data = False
            for line in f:
                if in_data:
                    if line != b".\r\n":
                        continue
                    in_data = False
                    if at == "end":
                        self.after_data += 1
                        c.sendall(garbage)
                        return
                    c.sendall(b"250 ok\r\n")
                    continue
                cmd = line[:4].upper().decode(errors="replace")
                if cmd == at[:4]:
                    c.sendall(garbage)
                    return
                if cmd == "EHLO":
                    c.sendall(b"250-garbage.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif cmd == "DATA":
                    in_data = True
                    c.sendall(b"354 go on\r\n")
                elif cmd == "QUIT":
                    c.sendall(b"221 bye\r\n")
                    return
                else:
                    c.sendall(b"250 ok\r\n")


def _garbage_on(rig: Rig) -> None:
    d = rig.downstreams[0]
    _kill(d)  # no session of it may go on serving the guard's pooled connections
    rig.extra["garbage"] = GarbageServer(d.port).start()


def _garbage_off(rig: Rig) -> None:
    rig.extra["garbage"].stop()
    rig.downstreams[0].start()


def _garbage_witness(rig: Rig) -> Witness:
    g: GarbageServer = rig.extra["garbage"]
    ok, text = _sender_4xx(rig, r"45\d")
    return ok and g.after_data > 0, (f"{g.sessions} sessions got garbage, {g.after_data} of them after the "
                                     f"message body; {text}")


# Redis -----------------------------------------------------------------------------------------

def _redis(action: str) -> Callable[[Rig], None]:
    """The row's Redis: kill (SIGKILL), start (empty, same port), pause (SIGSTOP) or resume."""
    def act(rig: Rig) -> None:
        assert rig.redis is not None
        getattr(rig.redis, action)()
    return act


def _redis_witness(rig: Rig) -> Witness:
    errors = rig.metric("queueguard_state_errors_total")
    fallback = rig.metric("queueguard_state_fallback_active")
    return errors > 0 and fallback == 0, (f"{errors:.0f} failed Redis calls, the in-process fallback served "
                                          f"meanwhile; back on Redis at the end: {fallback == 0}")


# queueguard itself -------------------------------------------------------------------------------

def _until(condition: Callable[[], float], timeout: float = 5.0) -> float:
    """Poll until condition() is non-zero (a transaction in flight) or time is up; its last value."""
    deadline = time.monotonic() + timeout
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(0.005)
        value = condition()
    return value


def _guard_kill(rig: Rig) -> None:
    """Kill the guard the moment a client connection is open, from a thread of its own: the mail
    offered meanwhile keeps coming, so the kill cannot miss it. Killing on a timer instead once
    struck after the first batch had gone through, between sessions (a CI run)."""
    def kill() -> None:
        rig.extra["active"] = _until(lambda: rig.metric("queueguard_connections_active"), timeout=60.0)
        rig.guard.kill()
        assert rig.guard.proc is not None
        rig.extra["exit"] = rig.guard.proc.returncode

    rig.extra["killer"] = killer = threading.Thread(target=kill, name="guard-killer")
    killer.start()


def _guard_start(rig: Rig) -> None:
    rig.extra.pop("killer").join()
    rig.guard.start()


def _guard_witness(rig: Rig) -> Witness:
    ok, text = _sender_4xx(rig)
    return ok and rig.extra.get("exit") == -signal.SIGKILL and rig.extra.get("active", 0) > 0, (
        f"guard exit {rig.extra.get('exit')} with {rig.extra.get('active', 0):.0f} client connections open; {text}")


# quarantine filesystem ---------------------------------------------------------------------------

def _fill_bytes(rig: Rig) -> None:
    """Fill the quarantine's filesystem to the last byte (the floor is 0: the writes meet ENOSPC)."""
    fd = os.open(rig.qfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    rig.extra["free"] = os.statvfs(rig.qfs).f_bavail


def _fill_inodes(rig: Rig) -> None:
    """Take every free inode of the quarantine's filesystem."""
    d = rig.qfs / "fill"
    d.mkdir()
    n = 0
    with contextlib.suppress(OSError):
        while True:
            (d / str(n)).touch()
            n += 1
    rig.extra["free"] = os.statvfs(rig.qfs).f_favail


def _unfill(rig: Rig) -> None:
    (rig.qfs / "filler").unlink(missing_ok=True)
    fill = rig.qfs / "fill"
    if fill.is_dir():
        for p in fill.iterdir():
            p.unlink()
        fill.rmdir()


def _quarantine_witness(rig: Rig) -> Witness:
    ok, text = _sender_4xx(rig, r"45\d 4\.3\.[01]")
    return ok, f"free at the fault: {rig.extra.get('free')}; {text}"


# policy reload --------------------------------------------------------------------------------------

def _reload(text: str, counter: str) -> Callable[[Rig], None]:
    """Write the policy file, SIGHUP, and wait until the guard counted the reload (`counter`)."""
    def reload(rig: Rig) -> None:
        before = rig.metric(counter)
        (rig.guard.policy_dir / "faults.yaml").write_text(text)
        rig.guard.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while rig.metric(counter) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        rig.extra[counter] = rig.metric(counter)
    return reload


def _policy_witness(rig: Rig) -> Witness:
    f = rig.extra.get("queueguard_policy_reload_failures_total", 0)
    return f >= 1, f"{f:.0f} reload(s) refused, the last good policy kept (held mail still quarantined)"


MIB = 1 << 20
REDIS_HOLD = 6.0  # past the guard's 5 s before it tries Redis again, so the last third shows it is back
SLOW_DATA = "  warn condition = ${if match{$h_subject:}{\\N[05]$\\N}}\n       delay = 1s"
FAULTS: tuple[Fault, ...] = (
    Fault("clamd-sigkill", "clamd kill -9 while scans run; restarted after the hold",
          _clamd_kill, _clamd_restart, _clamd_kill_witness, Needs(clamd=True)),
    Fault("clamd-oom", "clamd OOM-killed by the kernel: a hog fills clamd's 192 MiB cgroup (v1 memory "
          "controller); hog killed, clamd restarted", _clamd_oom, _clamd_oom_remove, _clamd_oom_witness,
          Needs(clamd=True, cgroup=192 * MIB)),
    Fault("downstream-killed-mid-data", "the downstream Exim killed (kill -9 of its process group, sessions "
          "too) while its DATA ACL holds one message in five for 1 s; started again",
          _kill_downstream, _start_downstreams, _mid_data_witness, Needs(downstream_data_acl=SLOW_DATA)),
    Fault("all-downstreams-down", "both downstream Exims stopped (SIGTERM, SIGKILL after 1 s); started again",
          _stop_downstreams, _start_downstreams, _all_down_witness, Needs(downstreams=2)),
    Fault("redis-sigkill", "Redis (rate-limit and burst state) kill -9; restarted empty",
          _redis("kill"), _redis("start"), _redis_witness, Needs(redis=True), REDIS_HOLD),
    Fault("redis-hang", "Redis SIGSTOPped (connections open, no answers); SIGCONT",
          _redis("pause"), _redis("resume"), _redis_witness, Needs(redis=True), REDIS_HOLD),
    Fault("queueguard-sigkill", "queueguard serve kill -9 mid-transaction; started again",
          _guard_kill, _guard_start, _guard_witness),
    Fault("quarantine-disk-full", "the quarantine's tmpfs (16 MiB) filled to the last byte (floor 0: "
          "writes meet ENOSPC); file removed", _fill_bytes, _unfill, _quarantine_witness,
          Needs(tmpfs="size=16m,nr_inodes=4096,mode=0700")),
    Fault("quarantine-inodes-exhausted", "every inode of the quarantine's tmpfs taken (floor 0); files "
          "removed", _fill_inodes, _unfill, _quarantine_witness, Needs(tmpfs="size=64m,nr_inodes=2000,mode=0700")),
    Fault("broken-policy-reload", "the policy file replaced by one with a bad regex, SIGHUP; fixed, SIGHUP",
          _reload(BROKEN_POLICY, "queueguard_policy_reload_failures_total"),
          _reload(POLICY, "queueguard_policy_reloads_total"), _policy_witness),
    Fault("memory-pressure-spike", "a hog grows clamd's 256 MiB cgroup to 88 % (shed at 80 %); hog killed",
          _pressure_spike, _pressure_remove, _pressure_witness, Needs(clamd=True, cgroup=256 * MIB)),
    Fault("downstream-garbage", "the downstream killed and replaced by a server answering one command of each "
          "session with garbage (after the body in half of them; scripted: fault injection); Exim back",
          _garbage_on, _garbage_off, _garbage_witness, hold=6.0),
)


# --- running a row ----------------------------------------------------------------------------

def run_fault(fault: Fault, n: int, workdir: Path, parallel: int = 3, *, keep: bool = False) -> Row:
    """One row: offer n messages around the fault, flush, count."""
    started = time.monotonic()
    row = Row(fault.name, fault.how)
    msgs = messages(fault.name, n, viruses=fault.needs.clamd)
    first, middle, last = msgs[: n // 3], msgs[n // 3: 2 * n // 3], msgs[2 * n // 3:]
    with Rig(fault.needs, workdir, keep=keep) as rig:
        with ThreadPoolExecutor(1) as background:  # mail flows while the fault strikes
            flowing = background.submit(rig.offer, first, parallel)
            rig.wait_progress(n // 6, flowing.done)
            fault.inject(rig)
            injected = time.monotonic()
            accepted = flowing.result()
        accepted += rig.offer(middle, parallel)  # into the fault, however long it took to set up
        settle(rig.sender)
        while time.monotonic() < injected + fault.hold:  # the sender retries into the fault
            time.sleep(min(BACKOFF * 4, max(0.0, injected + fault.hold - time.monotonic())))
            flush(rig.sender)
            settle(rig.sender)
        fault.remove(rig)
        accepted += rig.offer(last, parallel)
        settle(rig.sender)
        for round_ in range(FLUSH_ROUNDS):
            if not spool_ids(rig.sender):
                break
            if round_:
                time.sleep(BACKOFF * 8 + 0.5)  # the guard's back-off from the fault may still run
            flush(rig.sender)
            settle(rig.sender)
        row.witnessed, row.witness = fault.witness(rig)
        for d in rig.downstreams:  # a downstream stopped mid-delivery keeps mail in its spool
            if not wait_empty(d, 3.0):
                flush(d, runners=1)
                wait_empty(d)
        delivered = [mid for d in rig.downstreams for mid in receptions(d)]
        stored = Counter(m.mid for d in rig.downstreams for m in maildir_messages(d.dir / "maildir"))
        stored.update(mid for d in rig.downstreams for mid in spool_ids(d))
        gone = set(delivered) - set(stored)
        if gone:
            row.notes.append(f"accepted downstream but in no maildir or spool there: {sorted(gone)[:10]}")
            row.lost_ids += sorted(gone)
        again = sum(n - delivered.count(mid) for mid, n in stored.items() if n > delivered.count(mid))
        if again:
            row.notes.append(f"the downstream itself delivered {again} message(s) twice (its delivery process was "
                             "killed after writing the maildir file, its queue run delivered again)")
        cut = cut_after_body(rig.sender)
        queued = spool_ids(rig.sender)
        rejected = rejections(rig.sender)
        row.deferrals = len(deferrals(rig.sender))
        if keep:
            row.notes.append(f"sender {rig.sender.dir}, downstreams {' '.join(str(d.dir) for d in rig.downstreams)}")
        rig.guard.stop()
        quarantined, broken = quarantine_ids(rig.quarantine)
        if broken:
            row.notes.append(f"{broken} quarantine entries do not read back whole")
        if rig.guard.proc is not None and "Traceback" in rig.guard.log():
            row.notes.append("the guard logged a traceback")
    by_id = {m.mid: m for m in msgs}
    tally(row, [by_id[mid] for mid in accepted], delivered, quarantined, rejected, queued, cut)
    row.seconds = round(time.monotonic() - started, 1)
    return row


def run(faults: Sequence[Fault], n: int, parallel: int = 3, keep: bool = False) -> Iterator[Row]:
    """Each fault in a fresh work dir, removed afterwards unless `keep` (then its path is a note)."""
    for fault in faults:
        tmp = Path(tempfile.mkdtemp(prefix=f"qg-faults-{fault.name}-"))
        tmp.chmod(0o755)
        try:
            row = run_fault(fault, n, tmp, parallel, keep=keep)
        finally:
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
        if keep:
            row.notes.append(f"work dir kept: {tmp}")
        yield row


def render(rows: Sequence[Row]) -> str:
    """The markdown table of docs/reliability.md."""
    head = ("| fault | offered | delivered | quarantined | rejected 5xx | still queued | lost | duplicated "
            "| sender 4xx | witness |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        mark = "" if r.ok else " **FAIL**"
        lines.append(f"| {r.fault}{mark} | {r.offered:,} | {r.delivered:,} | {r.quarantined:,} | {r.rejected:,} "
                     f"| {r.queued:,} | {r.lost:,} | {r.duplicated:,} | {r.deferrals:,} | {r.witness} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000, help="messages offered per fault")
    parser.add_argument("--parallel", type=int, default=3, help="connections handing messages to the sender")
    parser.add_argument("--only", help="comma-separated fault names: " + ", ".join(f.name for f in FAULTS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep each fault's work dir (logs, spools)")
    args = parser.parse_args(argv)
    faults = FAULTS
    if args.only:
        wanted = args.only.split(",")
        faults = tuple(f for f in FAULTS if f.name in wanted)
        unknown = set(wanted) - {f.name for f in faults}
        if unknown:
            parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    rows = []
    for row in run(faults, args.messages, args.parallel, args.keep):
        rows.append(row)
        print(f"{row.fault}: {'ok' if row.ok else 'FAIL'} in {row.seconds} s; lost {row.lost_ids[:10]}, "
              f"duplicated {row.duplicated_ids[:10]}, misplaced {row.misplaced_ids[:10]}; {'; '.join(row.notes)}",
              file=sys.stderr, flush=True)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
