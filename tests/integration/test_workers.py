"""`workers: 2`: two processes share the SMTP and metrics ports, a supervisor restarts a killed one,
nothing is lost meanwhile, SIGHUP reloads both, SIGTERM drains both; `state: memory` is refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from queueguard.workers import HEARTBEAT_STALE
from tests.components.redis import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as r:
        yield r


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def status(guard: Guard) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{guard.metrics_port}/status.json", timeout=5) as r:
        doc: dict[str, Any] = json.load(r)
    return doc


def wait_for(what: str, ok: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def send_all(port: int, ids: list[int], done: list[int]) -> None:
    """A retrying sender: every message is sent until some answer takes it (250)."""
    for i in ids:
        for _ in range(100):
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                    c.sendmail("a@client.example", ["bob@test.example"], b"Subject: m%d\r\n\r\nbody\r\n" % i)
                done.append(i)
                break
            except (smtplib.SMTPException, OSError):
                time.sleep(0.05)


def test_two_workers_share_the_port_survive_a_kill_reload_and_drain(redis: RedisServer) -> None:
    with RecordingSink() as sink:
        guard = Guard({"workers": 2, "state": redis.url, "downstreams": [{"address": f"127.0.0.1:{sink.port}"}]})
        guard.start(timeout=60)
        try:
            assert guard.proc is not None
            wait_for("two workers", lambda: len(children(guard.proc.pid)) == 2)
            seen = set()
            wait_for("both workers answering", lambda: seen.add(status(guard)["worker"]) or seen == {"0/2", "1/2"})

            done: list[int] = []
            threads = [threading.Thread(target=send_all, args=(guard.port, list(range(k, 300, 4)), done))
                       for k in range(4)]
            for t in threads:
                t.start()
            wait_for("some mail", lambda: len(done) > 50)
            victim = min(children(guard.proc.pid))
            os.kill(victim, signal.SIGKILL)  # mid-load
            for t in threads:
                t.join(120)
            assert sorted(done) == list(range(300))
            got = {int(m.data.split(b"Subject: m")[1].split(b"\r\n")[0]) for m in sink.messages}
            assert got == set(range(300)), sorted(set(range(300)) - got)  # none lost (a retry may duplicate)
            wait_for("the killed worker replaced",
                     lambda: len(children(guard.proc.pid)) == 2 and victim not in children(guard.proc.pid))
            assert "exited with code -9; restarting" in guard.log()
            wait_for("the restart counted", lambda: guard.metric("queueguard_worker_restarts_total") == 1)
            assert guard.metric("queueguard_worker_restarts_total", reason="exited") == 1
            # One scrape, all workers: 40 more messages over both are all counted in it within the
            # workers' metric flush (0.1 s). (A worker killed hard takes its last 0.1 s of counts
            # with it, so the 300 above are not all in the total.)
            counted = guard.metric("queueguard_transactions_total", frontend="smtp")
            more: list[int] = []
            send_all(guard.port, list(range(300, 340)), more)
            assert len(more) == 40
            wait_for("the 40 counted", lambda: guard.metric("queueguard_transactions_total", frontend="smtp")
                     >= counted + 40)

            (guard.policy_dir / "extra.yaml").write_text("lists: {extra: [a@b.example]}\n")
            loaded = guard.log().count("policy loaded from")
            guard.signal(signal.SIGHUP)
            wait_for("both workers reloaded", lambda: guard.log().count("policy loaded from") >= loaded + 2)

            hung = min(children(guard.proc.pid))
            os.kill(hung, signal.SIGSTOP)  # alive but its event loop never runs: the watchdog's case
            wait_for("the hung worker replaced", lambda: hung not in children(guard.proc.pid)
                     and len(children(guard.proc.pid)) == 2, timeout=HEARTBEAT_STALE + 30)
            assert f"(pid {hung}) stopped beating" in guard.log()
            wait_for("the restart counted", lambda: guard.metric("queueguard_worker_restarts_total") == 2)
            assert guard.metric("queueguard_worker_restarts_total", reason="hung") == 1
            with smtplib.SMTP("127.0.0.1", guard.port, timeout=20) as c:
                assert c.sendmail("a@client.example", ["bob@test.example"], b"Subject: after\r\n\r\nx\r\n") == {}
        finally:
            code = guard.stop(timeout=60)
        assert code == 0 and "workers draining" in guard.log()


def test_more_than_one_worker_with_in_process_state_is_refused(tmp_path: Path) -> None:
    guard = Guard({"workers": 2, "state": "memory"})
    with pytest.raises(RuntimeError, match="exited 2") as e:
        guard.start()
    assert "set state to a redis:// URL, or workers: 1" in str(e.value)


PASSED = {"a", "c"}
"""The milter's end-of-message answers that let a message through (accept, continue)."""


def milter_message(path: Path, n: int) -> list[str]:
    """One whole MTA conversation with the milter on unix socket `path`: its end-of-message answer."""
    from tests.unit.frontends.test_milter import MTA

    async def talk() -> list[str]:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
        mta = MTA(reader, writer)
        try:
            await mta.negotiate()
            await mta.connect()
            await mta.envelope("<a@client.example>", "<bob@test.example>")
            return await asyncio.wait_for(mta.content(f"m{n}"), 10)
        finally:
            mta.close()

    return asyncio.run(talk())


def test_every_worker_answers_the_milter_on_one_socket(redis: RedisServer, tmp_path: Path) -> None:
    """The supervisor binds the milter's unix socket once and every worker accepts on it: with
    worker 0 stopped (hung) or killed, the other one answers every MTA connection. Before, the
    milter ran in worker 0 alone: a Postfix site used one core, and lost its milter with it."""
    sock = tmp_path / "milter.sock"
    guard = Guard({"workers": 2, "state": redis.url, "milter": {"enabled": True, "listen": f"unix:{sock}"}})
    guard.start(timeout=60)
    try:
        assert guard.proc is not None
        wait_for("two workers ready", lambda: guard.log().count("milter listening on") >= 2)
        assert all(milter_message(sock, i)[-1] in PASSED for i in range(10))
        first = int(re.search(r"worker 0 started \(pid (\d+)\)", guard.log()).group(1))  # type: ignore[union-attr]
        os.kill(first, signal.SIGSTOP)
        try:
            answers = [milter_message(sock, i)[-1] for i in range(10, 40)]
        finally:
            os.kill(first, signal.SIGCONT)
        assert len(answers) == 30 and set(answers) <= PASSED, answers
        os.kill(first, signal.SIGKILL)
        wait_for("worker 0 replaced", lambda: guard.log().count("milter listening on") >= 3)
        assert milter_message(sock, 40)[-1] in PASSED
        assert sock.is_socket()
        assert guard.log().count("msg=message") >= 41
    finally:
        code = guard.stop(timeout=60)
    assert code == 0
    assert not sock.exists(), "the supervisor removes the socket it made"


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its new parent to reap it."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_workers_of_a_killed_supervisor_drain_and_exit(redis: RedisServer) -> None:
    """`kill -9` of the main process (an admin, the OOM killer): its workers must not serve on
    unsupervised beside the next start, which SO_REUSEPORT would let bind the same port."""
    guard = Guard({"workers": 2, "state": redis.url})
    guard.start(timeout=60)
    workers: set[int] = set()
    try:
        assert guard.proc is not None
        wait_for("two workers", lambda: len(children(guard.proc.pid)) == 2)
        workers = children(guard.proc.pid)
        guard.kill()
        wait_for("the orphaned workers to exit", lambda: not any(running(pid) for pid in workers), timeout=20)
        assert guard.log().count("the supervisor (pid") == 2
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def slow_to_scan(i: int) -> bytes:
    """A small message clamd takes a while over: a zip of 10 MB of zeros, distinct per message
    (clamd caches clean results by hash), so scans overlap while the transfers do not."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("data.bin", os.urandom(16) + bytes(10_000_000))
    attachment = base64.encodebytes(buf.getvalue()).replace(b"\n", b"\r\n")
    return (b"Subject: archive %d\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: application/zip\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=data.zip\r\n\r\n"
            % i) + attachment + b"--b--\r\n"


def test_workers_share_the_hosts_scan_bound(redis: RedisServer, tmp_path: Path) -> None:
    """`scan.max_concurrent` bounds the streams in this host's clamd, however many workers: with
    2 workers and a bound of 2, clamd (whose STATS we sample) never runs more than 2 of our scans.
    Before, each worker's gate allowed the whole bound, 4 here; N workers, N times it."""
    from queueguard.harness.clamd import Clamd
    from tests.integration.test_scan_clamd import StatsSampler

    policy = ("scan:\n  max_concurrent: 2\n  min_concurrent: 1\n  adaptive: false\n  max_waiting: 100\n"
              "  max_wait: 60s\n")
    with Clamd(tmp_path / "clamd", max_threads=8) as clamd, RecordingSink() as sink:
        guard = Guard({"workers": 2, "state": redis.url, "downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
                       "clamd": {"enabled": True, "address": str(clamd.socket), "pid_file": str(clamd.pid_file),
                                 "timeout": "60s", "ping_interval": "10m"}},  # no PING amid the samples
                      {"scan.yaml": policy})
        guard.start(timeout=60)
        sampler = StatsSampler(clamd)
        try:
            assert guard.proc is not None
            wait_for("both workers' first PING", lambda: guard.log().count("clamd is up") >= 2)
            sampler.start()
            replies: list[int] = []

            def send(i: int) -> None:
                with smtplib.SMTP("127.0.0.1", guard.port, timeout=120) as c:
                    c.sendmail("a@client.example", ["bob@test.example"], slow_to_scan(i))
                replies.append(250)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
        finally:
            sampler.stop.set()
            sampler.join(5)
            guard.stop(timeout=60)
    assert replies == [250] * 12
    # clamd's own count of our scans; its threads may still be tidying up scans whose answers the
    # workers already read (their slots are free, the next scans start): over the bound in a rare
    # sample (one per worker at most), never for long. Each worker allowed the whole bound before:
    # 4 in most samples.
    assert 2 <= max(sampler.busy) <= 4, sampler.busy
    assert sum(1 for b in sampler.busy if b > 2) <= max(1, len(sampler.busy) // 20), sampler.busy


def policy_answer(path: Path, n: int) -> bytes:
    """One Postfix policy delegation request on unix socket `path`: the answer's action line."""
    request = (f"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.{n % 250 + 1}\n"
               f"sender=a@client.example\nrecipient=bob{n}@test.example\n\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(request)
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = s.recv(4096)
            assert chunk, f"closed after {answer!r}"
            answer += chunk
    return answer.split(b"\n")[0]


def test_every_worker_answers_the_policy_socket(redis: RedisServer, tmp_path: Path) -> None:
    """The policy service, like the milter, is bound once and answered by every worker: with
    worker 0 stopped the other answers every request (before, the MTA deferred its mail)."""
    sock = tmp_path / "policy.sock"
    guard = Guard({"workers": 2, "state": redis.url, "policy_socket": {"enabled": True, "listen": str(sock)}})
    guard.start(timeout=60)
    try:
        assert guard.proc is not None
        wait_for("two workers ready", lambda: guard.log().count("policy socket listening on") >= 2)
        first = int(re.search(r"worker 0 started \(pid (\d+)\)", guard.log()).group(1))  # type: ignore[union-attr]
        os.kill(first, signal.SIGSTOP)
        try:
            answers = [policy_answer(sock, i) for i in range(30)]
        finally:
            os.kill(first, signal.SIGCONT)
        assert answers == [b"action=dunno"] * 30, answers
    finally:
        code = guard.stop(timeout=60)
    assert code == 0
    assert not sock.exists(), "the supervisor removes the socket it made"


def test_connection_limits_count_a_client_over_every_worker(redis: RedisServer) -> None:
    """The kernel spreads one client's connections over the workers: counted per worker, a client
    held `max_per_ip` open on each (twice the limit with two). Counted for the host: exactly the limit."""
    policy = "connections:\n  max_per_ip: 6\n  max_per_network: 100\n"
    with RecordingSink() as sink, Guard({"workers": 2, "state": redis.url,
                                         "downstreams": [{"address": f"127.0.0.1:{sink.port}"}]},
                                        {"connections.yaml": policy}) as guard, contextlib.ExitStack() as held:
        assert guard.proc is not None
        wait_for("two workers", lambda: len(children(guard.proc.pid)) == 2)
        lines = []
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", guard.port), source_address=("127.0.0.9", 0), timeout=10)
            held.callback(s.close)
            lines.append(s.makefile("rb").readline())
        assert sum(line.startswith(b"220 ") for line in lines) == 6, lines
        assert sum(line.startswith(b"421 4.7.0 Too many connections") for line in lines) == 10, lines
        seen: set[str] = set()
        wait_for("both workers answering", lambda: seen.add(status(guard)["worker"]) or seen == {"0/2", "1/2"})
        held.close()
        deadline = time.monotonic() + 10
        while True:  # the places come back once the workers have seen the connections close
            try:
                with smtplib.SMTP("127.0.0.1", guard.port, source_address=("127.0.0.9", 0), timeout=10) as c:
                    assert c.sendmail("a@client.example", ["bob@test.example"], b"Subject: back\r\n\r\nx\r\n") == {}
                break
            except smtplib.SMTPConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert sink.wait_count(1) == 1


def test_the_connection_rate_is_one_for_the_host(redis: RedisServer) -> None:
    """`rate_per_ip` with two workers: the kernel spreads a client's new connections over both,
    and each worker keeping its own rate let through twice the rate. One rate for the host."""
    policy = "connections:\n  rate_per_ip: 4/1h\n"
    with RecordingSink() as sink, Guard({"workers": 2, "state": redis.url,
                                         "downstreams": [{"address": f"127.0.0.1:{sink.port}"}]},
                                        {"connections.yaml": policy}) as guard:
        assert guard.proc is not None
        wait_for("two workers", lambda: len(children(guard.proc.pid)) == 2)
        seen: set[str] = set()
        wait_for("both workers answering", lambda: seen.add(status(guard)["worker"]) or seen == {"0/2", "1/2"})
        lines = []
        for _ in range(24):
            with socket.create_connection(("127.0.0.1", guard.port), source_address=("127.0.0.10", 0),
                                          timeout=10) as s:
                lines.append(s.makefile("rb").readline())
        assert sum(line.startswith(b"220 ") for line in lines) == 4, lines
        assert sum(line.startswith(b"421 4.7.0 Too many new connections") for line in lines) == 20, lines


def test_a_status_page_login_holds_on_every_worker(redis: RedisServer) -> None:
    """The kernel spreads an admin's requests over the workers: a session only the worker that
    took the login knew was a 401 from the others (19 of 30 requests), and the page sent the admin
    back to the login form. Sessions are the host's: every request passes, a logout ends it on all."""
    import http.client
    from urllib.parse import urlencode

    from queueguard.webauth import hash_password

    with RecordingSink() as sink, Guard({"workers": 2, "state": redis.url,
                                         "downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
                                         "status": {"password_hash": hash_password("right horse")}}) as guard:
        assert guard.proc is not None
        # Both listening (the supervisor says so once every worker is), not only both started: a
        # worker still starting left all 30 requests to the other (seen once in CI).
        wait_for("both workers ready", lambda: "queueguard ready: 2 workers" in guard.log())

        def call(method: str, path: str, cookie: str = "", body: str = "") -> tuple[int, str, bytes]:
            c = http.client.HTTPConnection("127.0.0.1", guard.metrics_port, timeout=10)
            headers = {"Cookie": cookie} if cookie else {}
            if body:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            c.request(method, path, body=body or None, headers=headers)
            response = c.getresponse()
            answer = (response.status, response.headers.get("Set-Cookie", ""), response.read())
            c.close()
            return answer

        code, set_cookie, _ = call("POST", "/login", body=urlencode({"password": "right horse"}))
        assert code == 303
        cookie = set_cookie.split(";")[0]
        answers = [call("GET", "/status.json", cookie) for _ in range(30)]
        assert [code for code, _, _ in answers] == [200] * 30
        assert {json.loads(body)["worker"] for _, _, body in answers} == {"0/2", "1/2"}  # both answered
        assert call("POST", "/logout", cookie)[0] == 303
        assert [call("GET", "/status.json", cookie)[0] for _ in range(10)] == [401] * 10


def _run_dir(guard: Guard) -> Path:
    """The workers' run directory, as the supervisor gave it to them."""
    assert guard.proc is not None
    child = min(children(guard.proc.pid))
    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    (value,) = [e.split(b"=", 1)[1] for e in env if e.startswith(b"QUEUEGUARD_RUN_DIR=")]
    return Path(value.decode())


def test_a_cleaned_run_directory_loses_no_mail_and_no_worker(redis: RedisServer) -> None:
    """A tmp cleaner deletes the files of the workers' run directory (systemd-tmpfiles ages /tmp,
    a private one too). Before: a message the downstream took got 451 (the metrics file could not
    be created after its 250: the sender retried, and it was delivered again and again); a hung
    worker without a heartbeat file was never replaced, and one that died was never restarted
    (its settings and the host counts file were gone). Now the answer stands and workers recover."""
    with RecordingSink() as sink, Guard({"workers": 2, "state": redis.url,
                                         "downstreams": [{"address": f"127.0.0.1:{sink.port}"}]}) as guard:
        assert guard.proc is not None
        wait_for("two workers ready", lambda: "queueguard ready: 2 workers" in guard.log())
        run_dir = _run_dir(guard)
        for path in sorted(run_dir.rglob("*"), reverse=True):  # everything, as `rm -r run_dir/*`
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        for i in range(6):
            with smtplib.SMTP("127.0.0.1", guard.port, timeout=30) as c:
                assert c.sendmail("a@client.example", ["bob@test.example"], b"Subject: m%d\r\n\r\nx\r\n" % i) == {}
        assert len(sink.messages) == 6
        hung, dead = sorted(children(guard.proc.pid))
        os.kill(hung, signal.SIGSTOP)
        for beat in run_dir.glob("heartbeat-*"):  # cleaned away again: no beat is a stopped beat
            beat.unlink()
        os.kill(dead, signal.SIGKILL)
        wait_for("both workers replaced", lambda: not {hung, dead} & children(guard.proc.pid)
                 and len(children(guard.proc.pid)) == 2, timeout=HEARTBEAT_STALE + 30)
        wait_for("the new workers ready", lambda: guard.log().count("queueguard ready: smtp=") >= 4, timeout=30)
        assert f"(pid {hung}) stopped beating" in guard.log()
        with smtplib.SMTP("127.0.0.1", guard.port, timeout=30) as c:
            assert c.sendmail("a@client.example", ["bob@test.example"], b"Subject: after\r\n\r\nx\r\n") == {}


def test_reloads_while_workers_start_kill_none(redis: RedisServer) -> None:
    """SIGHUP is forwarded to the workers; one still starting had no handler yet, and SIGHUP's
    default action killed it: at start-up the guard failed, later a replacement worker died and
    its restart was delayed. Reloads during start-up (and during a restart) now kill nobody."""
    guard = Guard({"workers": 2, "state": redis.url, "downstreams": [{"address": "127.0.0.1:9"}]})
    done = threading.Event()

    def reload_storm() -> None:  # from the moment the supervisor starts workers (its handler is in)
        while not done.is_set():
            if guard.proc is not None and guard.proc.poll() is None and "worker 0 started" in guard.log():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(guard.proc.pid, signal.SIGHUP)
            time.sleep(0.05)

    storm = threading.Thread(target=reload_storm)
    storm.start()
    try:
        guard.start(timeout=60)
        assert guard.proc is not None
        wait_for("two workers ready", lambda: "queueguard ready: 2 workers" in guard.log())
        os.kill(min(children(guard.proc.pid)), signal.SIGKILL)  # its replacement starts under the storm
        wait_for("the replacement ready", lambda: guard.log().count("queueguard ready: smtp=") >= 3)
    finally:
        done.set()
        storm.join()
        log = guard.log()
        guard.stop(timeout=60)
    assert "exited with code -1;" not in log and "before it was ready" not in log, log[-2000:]
