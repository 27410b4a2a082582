"""Postfix + queueguard milter against Postfix + clamav-milter and Postfix + rspamd, in one run.

Not a `*_bench.py` (bench/run_all.py leaves it out): it needs rspamd installed and takes
~25 minutes at its defaults.

    .venv/bin/python -m bench.milter_peers [--messages 4000] [--sessions 20] [--rounds 3]
        [--baseline DIR] [--only NAME,...] [--trace] [--latency] [--profile NAME] [--json FILE]

One smtp-sink, one clamd (MaxThreads 4, unix socket, the local EICAR database
of queueguard/harness/clamd.py) and one private Postfix per configuration
(tests/components/postfix.py with contrib/postfix/main.cf.milter, only the
milter address differing), all started first. Then `--rounds` rounds: in
each, every configuration gets the same load (smtp-source, `--sessions`
sessions, `--messages` 4 KB messages, one recipient, a new connection per
message), in an order rotated per round. Reported per configuration: the
median msg/s accepted by Postfix's smtpd and delivered to the sink (end to
end), and CPU seconds per process name per message; ratios only within the run.

Configurations (peers as in /work/shared/peers/, see its README.md):
- qg-unix, qg-tcp: queueguard milter with a clamd scan of every message,
  shipped policy with every rule in shadow mode, over a unix socket (with the
  socket settings' defaults: group postfix, 0660) and over loopback TCP;
- qg-unix-gate4, qg-tcp-gate4: the same with the scan gate fixed at 4
  (`scan: {adaptive: false, max_concurrent: 4}`, clamd's MaxThreads);
- qg-unix-nocache: qg-unix without the cache of scan answers (`scan.cache.ttl: 0`).
  smtp-source's messages differ only in Date and Message-Id, so with the shipped
  cache clamd scans the first of them and the cache answers the rest; this row
  sends every message to clamd, as the peers do;
- clamav-milter: clamav-milter 1.4 on a unix socket, the same clamd;
- rspamd: rspamd 3.4's proxy worker as a milter on TCP with the antivirus
  module on the same clamd (given 25 s to compile its regexps first);
- before-unix, before-tcp (with --baseline DIR, a checkout of the code before
  this change, pymilter installed in this venv): the libmilter-based milter;
- postfix: Postfix without a milter (reference).
Debian packages: postfix (smtp-source, smtp-sink), clamav-daemon,
clamav-milter, rspamd (`apt-get install rspamd`; ./setup.sh does not install it).

--trace: first, 200 messages per milter through bench/milter_trace.py (a
counting relay) for packets, bytes and round trips per message.
--latency: after the rounds, queueguard without scanning at a paced 200 msg/s
(one connection per message) against Postfix alone, alternated: the added
latency of the milter, p50/p99, from connect to the 250 after DATA; and, through
the counting relay, the time Postfix waited on the milter per message
(wait_p50_ms/wait_p99_ms: what the milter adds, without Postfix's own jitter).
--profile NAME: py-spy samples that queueguard during its first round; the
top functions are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.milter_trace import Relay
from bench.proxy_bench import shadow_default_policy
from queueguard.harness.clamd import Clamd
from queueguard.harness.guard import Guard
from queueguard.harness.ports import free_port, wait_port
from queueguard.harness.sink import SmtpSink
from tests.components.postfix import Postfix

PEERS = Path(os.environ.get("QG_PEERS", "/work/shared/peers"))
HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class Config:
    name: str
    milter: str | None
    """smtpd_milters value as Postfix writes it; None: Postfix alone."""
    guard: Guard | None = None
    postfix: Postfix | None = None
    runs: list[dict[str, float]] = field(default_factory=list)


def tree_cpu() -> dict[int, tuple[str, int]]:
    """CPU ticks (user+system, with reaped children) of every process, by pid."""
    out: dict[int, tuple[str, int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        rest = text[text.rindex(")") + 2:].split()
        out[int(pid)] = (comm, sum(int(x) for x in rest[11:15]))
    return out


def system_ticks() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def cpu_by_name(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> Counter[str]:
    used: Counter[str] = Counter()
    for pid, (comm, ticks) in after.items():
        old = before.get(pid)
        used[comm] += ticks - old[1] if old and old[0] == comm else ticks
    return used


def load(port: int, sink: SmtpSink, messages: int, sessions: int) -> dict[str, float]:
    """smtp-source into Postfix; msg/s accepted and delivered, CPU per message by process."""
    exe = shutil.which("smtp-source")
    assert exe, "smtp-source missing (postfix package)"
    start_count = sink.count()
    cpu0 = tree_cpu()
    stat0 = system_ticks()
    started = time.monotonic()
    subprocess.run([exe, "-s", str(sessions), "-m", str(messages), "-l", "4096", "-f", "a@test.example",
                    "-t", "bob@test.example", f"127.0.0.1:{port}"], check=True, timeout=1800, capture_output=True)
    accepted = time.monotonic() - started
    delivered = sink.wait_count(start_count + messages, timeout=600) - start_count
    e2e = time.monotonic() - started
    used = cpu_by_name(cpu0, tree_cpu())
    total, idle = (b - a for a, b in zip(stat0, system_ticks(), strict=True))
    row: dict[str, float] = {"accepted": messages / accepted, "e2e": delivered / e2e, "delivered": delivered,
                             "busy_pct": round(100 * os.cpu_count() * (1 - idle / max(1, total)))}  # type: ignore[operator]
    for name, ticks in used.most_common(12):
        if ticks > 0:
            row[f"cpu_ms:{name}"] = 1000 * ticks / HZ / messages
    return row


# --- the milters ----------------------------------------------------------------------------------


def sub_peers(text: str, workdir: Path, clamd: Clamd) -> str:
    text = text.replace("@PEERS@/clamav/clamd.sock", str(clamd.socket))
    return text.replace("@PEERS@", str(workdir))


@contextmanager
def clamav_milter(workdir: Path, clamd: Clamd) -> Iterator[str]:
    d = workdir / "clamav"
    d.mkdir(parents=True)
    conf = sub_peers((PEERS / "clamav" / "clamav-milter-unix.conf").read_text(), workdir, clamd)
    (d / "clamav-milter.conf").write_text(conf)
    clam = pwd.getpwnam("clamav")
    os.chown(d, clam.pw_uid, clam.pw_gid)
    sock = d / "clamav-milter.sock"
    proc = subprocess.Popen(["clamav-milter", "-c", str(d / "clamav-milter.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_path(sock, proc)
        yield f"unix:{sock}"
    finally:
        stop(proc)


@contextmanager
def rspamd(workdir: Path, clamd: Clamd) -> Iterator[str]:
    d = workdir / "rspamd"
    shutil.copytree(PEERS / "rspamd", d)
    port = free_port()
    for f in d.rglob("*"):
        if f.is_file():
            text = sub_peers(f.read_text(), workdir, clamd)
            text = text.replace("127.0.0.1:11332", f"127.0.0.1:{port}")
            text = text.replace("127.0.0.1:11333", f"127.0.0.1:{free_port()}")
            text = text.replace("127.0.0.1:11334", f"127.0.0.1:{free_port()}")
            f.write_text(text)
    user = pwd.getpwnam("_rspamd")
    for sub in ("db", "run", "log"):
        (d / sub).mkdir(exist_ok=True)
        os.chown(d / sub, user.pw_uid, user.pw_gid)
    for p in (workdir, d):
        p.chmod(0o755)
    with open(d / "log" / "stdout.log", "ab") as out:
        proc = subprocess.Popen(
            ["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf",
             f"--var=LOCAL_CONFDIR={d}", f"--var=DBDIR={d / 'db'}", f"--var=RUNDIR={d / 'run'}",
             f"--var=LOGDIR={d / 'log'}"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port("127.0.0.1", port, timeout=60)
        time.sleep(25)  # rspamd compiles its regexps after it listens (peers/README.md)
        yield f"inet:127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def queueguard(workdir: Path, name: str, clamd: Clamd | None, unix: bool,
               baseline: Path | None = None, policy: str | None = None) -> Iterator[tuple[Guard, str]]:
    """A guard with the milter (and a clamd scan); yields it and the address as Postfix writes it."""
    d = workdir / name
    d.mkdir(parents=True)
    d.chmod(0o755)
    if unix:
        listen = postfix_side = f"unix:{d / 'milter.sock'}"
    else:
        port = free_port()
        listen, postfix_side = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
    settings: dict[str, object] = {"milter": {"enabled": True, "listen": listen}, "log_level": "warning"}
    if clamd is not None:
        settings["clamd"] = {"enabled": True, "address": str(clamd.socket), "pid_file": str(clamd.pid_file),
                             "database_directory": str(clamd.dir / "db")}
    g = Guard(settings, {"policy.yaml": policy or shadow_default_policy()})
    env = {"PYTHONPATH": str(baseline)} if baseline else None
    with ExitStack() as stack:
        g.start(env_extra=env)
        stack.callback(g.stop)
        if unix:
            wait_path(d / "milter.sock")
            if baseline:
                (d / "milter.sock").chmod(0o666)  # libmilter made it root's, 0755
        yield g, postfix_side


def fixed_gate_policy() -> str:
    """The shadow policy with the scan gate fixed at clamd's MaxThreads (4), as the peers have it:
    they send every message to clamd at once and clamd's threads are the only limit. The shipped
    gate is adaptive and, on a shared box, backs off to 1-2 scans when scans slow down."""
    import yaml

    doc = yaml.safe_load(shadow_default_policy())
    doc["scan"].update(adaptive=False, max_concurrent=4)
    return str(yaml.safe_dump(doc))


def no_cache_policy() -> str:
    """The shadow policy without the cache of scan answers: every message goes to clamd."""
    import yaml

    doc = yaml.safe_load(shadow_default_policy())
    doc["scan"]["cache"] = {"ttl": 0}
    return str(yaml.safe_dump(doc))


def wait_path(path: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- extras: round trips, latency, profile --------------------------------------------------------


def trace(configs: list[Config], sink: SmtpSink, workdir: Path, messages: int = 200) -> dict[str, object]:
    out: dict[str, object] = {}
    for c in configs:
        if c.milter is None:
            continue
        sock = workdir / f"trace-{c.name}.sock"
        with Relay(sock, c.milter) as relay, Postfix(relay_port=sink.port, milter=f"unix:{sock}") as pf:
            load(pf.port, sink, messages, 4)
            out[c.name] = relay.counts.per_message()
        print(f"trace {c.name}: {json.dumps(out[c.name])}", flush=True)
    return out


async def paced(port: int, rate: float, n: int) -> list[float]:
    """n SMTP transactions started `rate` per second, one connection each: seconds from connect
    to the 250 after the message."""
    body = b"From: <a@test.example>\r\nTo: <bob@test.example>\r\nSubject: paced\r\n\r\n" + b"x" * 4000 + b"\r\n.\r\n"

    async def one() -> float:
        t0 = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", port)

        async def say(line: bytes | None) -> bytes:
            if line is not None:
                w.write(line)
            while True:
                reply = await r.readline()
                if reply[3:4] != b"-":
                    if not reply.startswith((b"2", b"3")):
                        raise RuntimeError(reply.decode(errors="replace"))
                    return reply

        await say(None)
        await say(b"EHLO bench.example\r\n")
        await say(b"MAIL FROM:<a@test.example>\r\n")
        await say(b"RCPT TO:<bob@test.example>\r\n")
        await say(b"DATA\r\n")
        await say(body)
        took = time.perf_counter() - t0
        w.write(b"QUIT\r\n")
        w.close()
        return took

    return await at_rate(rate, n, one)


async def at_rate(rate: float, n: int, one: Callable[[], Awaitable[float]]) -> list[float]:
    """`n` calls of `one`, started `rate` a second whether or not the earlier ones are done."""
    tasks = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    return list(await asyncio.gather(*tasks))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency(alone: int, with_milter: int, rounds: int, rate: float, n: int = 1000) -> dict[str, float]:
    got: dict[str, list[float]] = {"alone": [], "milter": []}
    for r in range(rounds):
        order = [("alone", alone), ("milter", with_milter)]
        for name, port in order if r % 2 == 0 else order[::-1]:
            got[name] += asyncio.run(paced(port, rate, n))
    res = {f"{k}_{q}": round(1000 * pct(v, p), 2) for k, v in got.items() for q, p in (("p50", .5), ("p99", .99))}
    res["added_p50_ms"] = round(res["milter_p50"] - res["alone_p50"], 2)
    res["added_p99_ms"] = round(res["milter_p99"] - res["alone_p99"], 2)
    return res


@contextmanager
def profiled(pid: int, out: Path) -> Iterator[None]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = subprocess.Popen([spy, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    try:
        yield
    finally:
        proc.send_signal(2)
        proc.wait(60)


def summarize_profile(raw: Path, top: int = 25) -> list[tuple[str, float]]:
    """Share of samples in which each function appears (inclusive), the busiest first."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")}
        for f in frames:
            inclusive[f] += n
    return [(f, round(100 * n / max(1, total), 1)) for f, n in inclusive.most_common(top)]


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="checkout of the libmilter-based code to compare")
    ap.add_argument("--only", help="comma-separated configuration names")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--latency-rate", type=float, default=200.0)
    ap.add_argument("--profile", help="configuration whose queueguard py-spy samples in round 1")
    ap.add_argument("--profile-out", type=Path, help="keep py-spy's raw samples here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    workdir = Path(tempfile.mkdtemp(prefix="qg-peers-"))
    workdir.chmod(0o755)
    result: dict[str, object] = {"command": " ".join(["python -m bench.milter_peers", *(argv or sys.argv[1:])])}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        sink = stack.enter_context(SmtpSink())
        clamd = stack.enter_context(Clamd(workdir / "clamd", max_threads=4))
        configs: list[Config] = []

        def add(name: str, start: Callable[[], tuple[Guard | None, str | None]]) -> None:
            if only and name not in only:
                return
            guard, spec = start()
            pf = stack.enter_context(Postfix(relay_port=sink.port, milter=spec))
            configs.append(Config(name, spec, guard, pf))
            print(f"started {name}: {spec}", flush=True)

        def qg(name: str, unix: bool, baseline: Path | None = None,
               policy: str | None = None) -> Callable[[], tuple[Guard, str]]:
            return lambda: stack.enter_context(queueguard(workdir, name, clamd, unix, baseline, policy))

        add("postfix", lambda: (None, None))
        add("qg-unix", qg("qg-unix", True))
        add("qg-tcp", qg("qg-tcp", False))
        add("qg-unix-gate4", qg("qg-unix-gate4", True, policy=fixed_gate_policy()))
        add("qg-tcp-gate4", qg("qg-tcp-gate4", False, policy=fixed_gate_policy()))
        add("qg-unix-nocache", qg("qg-unix-nocache", True, policy=no_cache_policy()))
        if args.baseline:
            add("before-unix", qg("before-unix", True, args.baseline.resolve()))
            add("before-tcp", qg("before-tcp", False, args.baseline.resolve()))
        add("clamav-milter", lambda: (None, stack.enter_context(clamav_milter(workdir, clamd))))
        add("rspamd", lambda: (None, stack.enter_context(rspamd(workdir, clamd))))
        if args.trace:
            result["trace"] = trace(configs, sink, workdir)
        for c in configs:  # warm-up: first connections, clamd's first scans, rspamd's maps
            assert c.postfix is not None
            load(c.postfix.port, sink, 200, args.sessions)
        for r in range(args.rounds if configs else 0):
            shift = r % len(configs)
            for c in configs[shift:] + configs[:shift]:
                assert c.postfix is not None
                with ExitStack() as spy:
                    if r == 0 and args.profile == c.name and c.guard is not None and c.guard.proc is not None:
                        spy.enter_context(profiled(c.guard.proc.pid, args.profile_out or workdir / "profile.txt"))
                    row = load(c.postfix.port, sink, args.messages, args.sessions)
                c.runs.append(row)
                print(f"round {r + 1} {c.name}: {row['accepted']:.0f} msg/s accepted, {row['e2e']:.0f} end to end, "
                      f"machine busy {row['busy_pct']:.0f}% of {100 * (os.cpu_count() or 1)}, "
                      + ", ".join(f"{k[7:]} {v:.2f}" for k, v in row.items() if k.startswith("cpu_ms:")), flush=True)
        samples = args.profile_out or workdir / "profile.txt"
        if args.profile and samples.exists():
            result["profile"] = summarize_profile(samples)
            for frame, share in result["profile"]:  # type: ignore[union-attr]
                print(f"{share:5.1f}%  {frame}")
        table = {}
        for c in configs:
            cpu: dict[str, float] = {}
            for key in {k for run in c.runs for k in run if k.startswith("cpu_ms:")}:
                cpu[key[7:]] = round(statistics.median(run.get(key, 0.0) for run in c.runs), 2)
            table[c.name] = {"accepted": round(statistics.median(x["accepted"] for x in c.runs)),
                             "e2e": round(statistics.median(x["e2e"] for x in c.runs)),
                             "runs_e2e": [round(x["e2e"]) for x in c.runs],
                             "cpu_ms_per_msg": dict(sorted(cpu.items(), key=lambda kv: -kv[1])[:6])}
        result["table"] = table
        if args.latency:
            sock = workdir / "latency-relay.sock"
            with queueguard(workdir, "qg-latency", None, True) as (_, spec), Relay(sock, spec) as relay, \
                    Postfix(relay_port=sink.port, milter=f"unix:{sock}") as pf, \
                    Postfix(relay_port=sink.port) as alone:
                result["latency"] = latency(alone.port, pf.port, args.rounds, args.latency_rate)
                waits = relay.counts.per_message()
                result["latency"].update({k: v for k, v in waits.items() if k.startswith("wait_")})
            print(f"latency at {args.latency_rate:g} msg/s: {result['latency']}", flush=True)
    print(f"\n{'configuration':<15} {'accepted':>8} {'e2e':>6}  runs (e2e)          CPU ms/msg")
    for name, row in table.items():
        print(f"{name:<15} {row['accepted']:>8} {row['e2e']:>6}  {row['runs_e2e']!s:<18}  {row['cpu_ms_per_msg']}")
    base = {k: v["e2e"] for k, v in table.items()}
    for a in ("qg-unix", "qg-tcp", "qg-unix-gate4", "qg-tcp-gate4", "qg-unix-nocache"):
        for b in ("rspamd", "clamav-milter", "before-unix", "before-tcp", "qg-unix", "qg-unix-gate4"):
            if a in base and b in base and a != b and base[b]:
                print(f"{a} / {b}: {base[a] / base[b]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
