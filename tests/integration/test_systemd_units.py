"""The shipped systemd files, checked by systemd's own tools, and sd_notify from a real process.

`systemd-analyze verify` needs the ExecStart binary to exist, so it runs on a
copy whose /opt/queueguard path points at a stub; the directives themselves
are asserted on the shipped file. systemd is not PID 1 here, so the watchdog
is exercised the way systemd sees it: datagrams (with the sender's
credentials, which NotifyAccess=main checks) on a socket we bind.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from queueguard.settings import QuarantineSettings, SmtpSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
SERVICE = SYSTEMD / "queueguard.service"
INSTALLED_BINARY = "/opt/queueguard/.venv/bin/queueguard"
ARTIFACTS = ROOT / "tests" / "artifacts"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: setup.sh installs the 'systemd' package"
    return path


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Unit file -> {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), raw
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment before any section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "ms": 0.001}
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    return float(number) * units[value[len(number):]]


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(SERVICE.read_text())


def one(unit: dict[str, dict[str, list[str]]], key: str, section: str = "Service") -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"{section}.{key}: {values}"
    return values[0]


def test_service_is_notify_with_watchdog_and_always_restarts(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert seconds(one(unit, "WatchdogSec")) == 30
    assert one(unit, "Restart") == "always"
    assert seconds(one(unit, "RestartSec")) > 0
    assert one(unit, "StartLimitIntervalSec", "Unit") == "0", "systemd must never give up restarting"
    assert one(unit, "ExecStart") == f"{INSTALLED_BINARY} serve --settings /etc/queueguard/queueguard.yaml"
    assert unit["Service"]["ExecReload"][-1] == '/bin/sh -c "kill -HUP $MAINPID"'
    assert seconds(one(unit, "TimeoutStopSec")) > SmtpSettings().shutdown_grace
    assert int(one(unit, "LimitNOFILE")) >= 65536
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_service_runs_as_a_dedicated_user_with_only_bind_capability(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    assert one(unit, "User") == "queueguard"
    assert one(unit, "Group") == "queueguard"
    assert "DynamicUser" not in unit["Service"]
    assert one(unit, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(unit, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one(unit, "NoNewPrivileges") == "yes"


def test_service_hardening(unit: dict[str, dict[str, list[str]]]) -> None:
    svc = unit["Service"]
    assert one(unit, "ProtectSystem") == "strict"
    for key in ("PrivateTmp", "ProtectHome", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality"):
        assert one(unit, key) == "yes", key
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert svc["SystemCallFilter"][0] == "@system-service"
    assert one(unit, "StateDirectory") == "queueguard"
    assert one(unit, "RuntimeDirectory") == "queueguard"
    # The quarantine the settings default to must be writable under ProtectSystem=strict.
    writable = [Path(p.lstrip("-")) for p in one(unit, "ReadWritePaths").split()]
    quarantine = QuarantineSettings().directory
    assert any(quarantine.is_relative_to(p) for p in writable), (quarantine, writable)
    assert "ProtectProc" not in svc, "the queue watch reads other users' /proc entries (clamd, runners)"


@pytest.fixture
def unit_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qg-systemd-"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def verify(unit_dir: Path, text: str) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze verify on `text` with the install path pointing at a stub."""
    stub = unit_dir / "queueguard-stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    path = unit_dir / "queueguard.service"
    path.write_text(text.replace(INSTALLED_BINARY, str(stub)))
    return subprocess.run(
        [tool("systemd-analyze"), "verify", str(path)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "queueguard" in line]


def test_systemd_analyze_verify_passes(unit_root: Path) -> None:
    result = verify(unit_root, SERVICE.read_text())
    assert result.returncode == 0, result.stderr
    assert problems(result) == []


def test_systemd_analyze_verify_catches_a_broken_unit(unit_root: Path) -> None:
    """The check above can fail: a typo'd key (the 2014 broken-init-file incident) is reported."""
    broken = SERVICE.read_text().replace("WatchdogSec=30", "WatchdogSecs=30")
    assert any("WatchdogSecs" in line for line in problems(verify(unit_root, broken)))
    missing = SERVICE.read_text().replace(f"ExecStart={INSTALLED_BINARY}", "ExecStart=/opt/no/such/binary")
    assert verify(unit_root, missing).returncode != 0


def test_systemd_analyze_security_report(unit_root: Path) -> None:
    path = unit_root / "queueguard.service"
    path.write_text(SERVICE.read_text())
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert overall, result.stdout + result.stderr
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "systemd-security.txt").write_text(result.stdout)
    print(overall[0])  # the score, for the reader of the test output; no threshold asserted


def test_sysusers_and_tmpfiles_create_the_user_and_directories(unit_root: Path) -> None:
    """Apply both files to an empty root with systemd's own tools; the quarantine comes out 0700."""
    (unit_root / "etc" / "sysusers.d").mkdir(parents=True)
    (unit_root / "etc" / "tmpfiles.d").mkdir(parents=True)
    shutil.copy(SYSTEMD / "queueguard.sysusers", unit_root / "etc" / "sysusers.d" / "queueguard.conf")
    shutil.copy(SYSTEMD / "queueguard.tmpfiles", unit_root / "etc" / "tmpfiles.d" / "queueguard.conf")
    subprocess.run([tool("systemd-sysusers"), f"--root={unit_root}"], check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (unit_root / "etc/passwd").read_text().splitlines()}
    assert "queueguard" in passwd
    uid, gid = int(passwd["queueguard"][2]), int(passwd["queueguard"][3])
    assert passwd["queueguard"][6] == "/usr/sbin/nologin"
    subprocess.run([tool("systemd-tmpfiles"), f"--root={unit_root}", "--create"], check=True,
                   capture_output=True, timeout=60)
    quarantine = QuarantineSettings().directory
    expected = {Path("/run/queueguard"): 0o750, Path("/var/lib/queueguard"): 0o750, quarantine: 0o700}
    for path, mode in expected.items():
        st = (unit_root / path.relative_to("/")).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, uid, gid), path


CHILD = textwrap.dedent("""
    import asyncio, signal, time
    from queueguard import sdnotify

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # SIGUSR1 blocks the event loop for a second, as a hung call would.
        loop.add_signal_handler(signal.SIGUSR1, time.sleep, 1.0)
        ticks = 0

        def status() -> str:
            nonlocal ticks
            ticks += 1
            return f"ticks={ticks}"

        tasks = [asyncio.create_task(sdnotify.Watchdog().run()),
                 asyncio.create_task(sdnotify.status_loop(status, 0.05))]
        sdnotify.ready("listening")
        await stop.wait()
        sdnotify.stopping("bye")
        for t in tasks:
            t.cancel()

    asyncio.run(main())
""")


class NotifySocket:
    """systemd's side of the notify protocol, with sender credentials."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(10)

    def recv(self) -> tuple[int, dict[str, str], float]:
        """(sender pid, fields, arrival time)."""
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = next(struct.unpack("3i", d)[0] for lvl, typ, d in anc
                   if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        return pid, fields, time.monotonic()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def child_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qg-nc-", dir="/tmp"))  # short: AF_UNIX paths max 107 bytes
    (d / "qg_notify_child.py").write_text(CHILD)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def start_child(directory: Path, sock: NotifySocket, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "qg_notify_child"], cwd=directory,
        env={**os.environ, "PYTHONPATH": f"{directory}:{ROOT}", "NOTIFY_SOCKET": sock.path, **env},
    )


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_real_process_notifies_ready_status_watchdog_stopping(child_dir: Path) -> None:
    usec = 200_000
    sock = NotifySocket(child_dir)
    proc = start_child(child_dir, sock, WATCHDOG_USEC=str(usec))
    try:
        received = [sock.recv()]
        while not any(f.get("READY") == "1" for _, f, _ in received):
            received.append(sock.recv())
        watchdog: list[float] = []
        statuses: list[str] = []
        while len(watchdog) < 3 or len(statuses) < 2:
            pid, fields, at = sock.recv()
            received.append((pid, fields, at))
            if "WATCHDOG" in fields:
                watchdog.append(at)
            if "STATUS" in fields:
                statuses.append(fields["STATUS"])
        assert statuses[0].startswith("ticks=")
        before_block = len(watchdog)
        proc.send_signal(signal.SIGUSR1)
        while len(watchdog) < before_block + 3:
            pid, fields, at = sock.recv()
            received.append((pid, fields, at))
            if "WATCHDOG" in fields:
                watchdog.append(at)
        gaps = [b - a for a, b in itertools.pairwise(watchdog[before_block - 1:])]
        # While the loop was stuck (1 s) no ping left the process: systemd would
        # have seen silence longer than WATCHDOG_USEC and restarted the service.
        assert max(gaps) * 1_000_000 > usec, gaps
        proc.send_signal(signal.SIGTERM)
        while True:
            pid, fields, at = sock.recv()
            received.append((pid, fields, at))
            if "STOPPING" in fields:
                assert fields == {"STOPPING": "1", "STATUS": "bye"}
                break
        assert proc.wait(10) == 0
        # Every datagram came from the main process itself, as NotifyAccess=main requires.
        assert {pid for pid, _, _ in received} == {proc.pid}
    finally:
        stop_child(proc)
        sock.close()


def test_real_process_does_not_ping_someone_elses_watchdog(child_dir: Path) -> None:
    sock = NotifySocket(child_dir)
    proc = start_child(child_dir, sock, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    try:
        seen: list[dict[str, str]] = []
        while sum("STATUS" in f and f["STATUS"].startswith("ticks=") for f in seen) < 5:
            seen.append(sock.recv()[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert any(f.get("READY") == "1" for f in seen)
        assert not any("WATCHDOG" in f for f in seen)
    finally:
        stop_child(proc)
        sock.close()


# --- the shipped unit under a real systemd (PID 1 of a systemd-nspawn container) ---------------

# A minimal bookworm with systemd, python3 and redis, cached under a name that changes with the list.
# Debian's python3 is 3.11.2: redis-py wants async-timeout below 3.11.3, so it comes from Debian.
CONTAINER_PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-async-timeout,redis-server"
SYSTEMD_ROOT = ROOT / ".deps" / f"systemd-root-{hashlib.sha256(CONTAINER_PACKAGES.encode()).hexdigest()[:8]}"

LAUNCHER = textwrap.dedent('''\
    #!/usr/bin/python3
    """The real `queueguard serve` (and `check`), from the checkout's package and the test venv's
    dependencies bound read-only into the container, run by the container's own python3."""
    import sys
    sys.path[:0] = ["/opt/queueguard", "/opt/queueguard/site-packages"]
    sys.path.append("/usr/lib/python3/dist-packages")  # Debian's async-timeout, after ours
    from queueguard.cli import main
    sys.exit(main())
''')

SETTINGS = textwrap.dedent("""\
    smtp: {listen: "0.0.0.0:25", hostname: guard.test, shutdown_grace: 5}
    downstreams: [{address: "127.0.0.1:2526"}]
    metrics: "127.0.0.1:9925"
    policies: /etc/queueguard/policies
    state: redis://127.0.0.1:6379/0
    workers: 2
""")

SINK = textwrap.dedent('''\
    import sys, time
    sys.path[:0] = ["/opt/queueguard/site-packages"]
    from aiosmtpd.controller import Controller
    class Keep:
        n = 0
        async def handle_DATA(self, server, session, envelope):
            Keep.n += 1
            with open(f"/var/tmp/sink-{Keep.n}.eml", "wb") as f:
                f.write(envelope.original_content)
            return "250 2.0.0 kept"
    Controller(Keep(), hostname="127.0.0.1", port=2526).start()
    time.sleep(600)
''')

SEND = textwrap.dedent('''\
    import smtplib
    with smtplib.SMTP("127.0.0.1", 25, timeout=30) as c:
        c.sendmail("a@client.example", ["bob@test.example"], b"Subject: through systemd\\r\\n\\r\\nhello\\r\\n")
''')


def systemd_root() -> Path:
    """Build the container root once (mmdebstrap from the Debian mirror, ~30 s), then reuse it."""
    if (SYSTEMD_ROOT / "usr" / "lib" / "systemd" / "systemd").exists():
        return SYSTEMD_ROOT
    building = SYSTEMD_ROOT.with_name(SYSTEMD_ROOT.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [tool("mmdebstrap"), "--variant=apt", f"--include={CONTAINER_PACKAGES}", "bookworm",
         str(building), "/etc/apt/sources.list.d/debian.sources"],
        check=True, capture_output=True, timeout=600,
    )
    building.rename(SYSTEMD_ROOT)
    return SYSTEMD_ROOT


class Container:
    """systemd-nspawn booting `root` with a throw-away overlay; stopped by PID."""

    def __init__(self, root: Path, binds: dict[Path, str], args: list[str], log: Path) -> None:
        cmd = [tool("systemd-nspawn"), "-q", "-D", str(root), "--volatile=overlay", "--register=no",
               "--keep-unit", "--console=passive", "--private-network"]
        cmd += [f"--bind-ro={src}:{dst}" for src, dst in binds.items()]
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([*cmd, "-b", *args], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.leader = 0

    def wait_leader(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.leader:
            assert self.proc.poll() is None, f"systemd-nspawn exited early:\n{self.log.read_text()}"
            # nspawn forks a short-lived helper before the container's PID 1: wait for systemd itself.
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.leader = int(child)
            time.sleep(0.1)
        assert self.leader, "container did not start"

    def run(self, *argv: str) -> str:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv], capture_output=True,
                                text=True, timeout=30)
        return result.stdout

    def show(self, unit: str) -> dict[str, str]:
        text = self.run("systemctl", "show", unit, "-p", "ActiveState,MainPID,NRestarts,StatusText,Result")
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def wait_for(self, unit: str, done: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self.show(unit)
            if done(state):
                return state
            time.sleep(0.3)
        raise AssertionError(f"{unit} never reached the state asked for; last: {state}\n"
                             + self.run("journalctl", "-u", unit, "--no-pager"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_real_systemd_runs_the_real_daemon_with_two_workers(unit_root: Path) -> None:
    """Boot systemd in a container with the shipped service, sysusers and tmpfiles files, and the
    real `queueguard serve` with 2 workers on a Redis inside the container.

    Checks what only a real systemd can: Type=notify start-up of the supervisor, the sandbox
    letting Python and its workers run (MemoryDenyWriteExecute, the system-call filter,
    ProtectSystem=strict), port 25 bound by the unprivileged user through AmbientCapabilities,
    a message relayed, `systemctl reload` reloading both workers, a hung main process killed by
    the watchdog and restarted, and a clean stop. WatchdogSec (3 s) and TimeoutAbortSec are
    lowered by a drop-in to keep the test short; everything else is the shipped file.
    """
    root = systemd_root()
    opt = unit_root / "opt"
    (opt / ".venv" / "bin").mkdir(parents=True)
    (opt / "queueguard").mkdir()  # mount points inside a read-only bind
    (opt / "site-packages").mkdir()
    launcher = opt / ".venv" / "bin" / "queueguard"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    etc = unit_root / "etc-queueguard"
    (etc / "policies").mkdir(parents=True)
    (etc / "queueguard.yaml").write_text(SETTINGS)
    (etc / "policies" / "default.yaml").write_text("lists: {}\n")
    dropin = unit_root / "watchdog.conf"
    dropin.write_text("[Service]\nWatchdogSec=3\nTimeoutAbortSec=5\n")
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    binds = {
        SERVICE: "/etc/systemd/system/queueguard.service",
        dropin: "/etc/systemd/system/queueguard.service.d/watchdog.conf",
        SYSTEMD / "queueguard.sysusers": "/etc/sysusers.d/queueguard.conf",
        SYSTEMD / "queueguard.tmpfiles": "/etc/tmpfiles.d/queueguard.conf",
        opt: "/opt/queueguard",
        ROOT / "queueguard": "/opt/queueguard/queueguard",
        site: "/opt/queueguard/site-packages",
        etc: "/etc/queueguard",
    }
    container = Container(root, binds, ["systemd.wants=queueguard.service"], unit_root / "nspawn.log")
    sink: subprocess.Popen[bytes] | None = None
    try:
        container.wait_leader()
        first = container.wait_for("queueguard", lambda s: s.get("StatusText", "").startswith("2 workers"), 90)
        assert first["ActiveState"] == "active", first
        main = int(first["MainPID"])

        def children(pid: int | str) -> list[str]:  # no procps in the container
            return container.run("cat", f"/proc/{pid}/task/{pid}/children").split()

        workers = children(main)
        assert len(workers) == 2, workers
        uid = int(container.run("stat", "-c", "%u", f"/proc/{workers[0]}").strip())
        assert uid != 0
        listening = container.run("cat", "/proc/net/tcp")
        assert any(f.split()[1].endswith(":0019") and int(f.split()[7]) == uid
                   for f in listening.splitlines()[1:]), listening

        sink = subprocess.Popen(["nsenter", "-t", str(container.leader), "-a", "python3", "-c", SINK],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while f":{2526:04X} " not in container.run("cat", "/proc/net/tcp"):  # the sink listening
            assert time.monotonic() < deadline, "the sink in the container did not start"
            time.sleep(0.2)
        sent = subprocess.run(["nsenter", "-t", str(container.leader), "-a", "python3", "-c", SEND],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert "Subject: through systemd" in container.run("cat", "/var/tmp/sink-1.eml")

        def journal() -> str:
            return container.run("journalctl", "-u", "queueguard", "--no-pager", "-o", "cat")

        loaded = journal().count("policy loaded from")
        container.run("systemctl", "reload", "queueguard")
        deadline = time.monotonic() + 30
        while journal().count("policy loaded from") < loaded + 2:
            assert time.monotonic() < deadline, journal()
            time.sleep(0.3)

        container.run("sh", "-c", f"kill -STOP {main}")  # the supervisor hangs: no more WATCHDOG=1
        restarted = container.wait_for(
            "queueguard",
            lambda s: s.get("NRestarts") == "1" and s.get("ActiveState") == "active"
            and s.get("MainPID") not in ("0", str(main)) and s.get("StatusText", "").startswith("2 workers"),
            90,
        )
        assert "Watchdog timeout" in journal(), journal()
        assert len(children(restarted["MainPID"])) == 2

        container.run("systemctl", "stop", "queueguard")
        stopped = container.wait_for("queueguard", lambda s: s.get("ActiveState") == "inactive", 60)
        assert stopped["Result"] == "success", stopped
        assert "workers draining" in journal()
    finally:
        if sink is not None:
            sink.kill()
            sink.wait()
        container.stop()
