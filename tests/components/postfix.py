"""A real Postfix for tests, from a private config directory (`postfix -c DIR start`).

Each `Postfix` gets its own 0755 temp dir (its daemons run as `postfix` and
must traverse it) holding main.cf/master.cf, queue_directory, data_directory
and a maillog file. smtpd listens on a free loopback port; mynetworks is
127.0.0.0/8; everything is relayed to ``relay_port`` (a sink). The queueguard
parts of main.cf are the shipped contrib/postfix files, copied verbatim with
only the queueguard address replaced (`contrib_snippet` refuses a file whose
default address is gone, so docs and tests cannot drift).

Usage:
    with Postfix(relay_port=sink.port, milter="inet:127.0.0.1:PORT", policy="127.0.0.1:PORT") as pf:
        pf.port; pf.queue_counts(); pf.wait_queue_empty(); pf.maillog()

Startup takes ~3 s (postfix-script checks); stop() sends SIGTERM to master's PID.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from queueguard.harness.ports import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "postfix"
POSTFIX = "/usr/sbin/postfix"
DEFAULT_MILTER = "inet:127.0.0.1:8894"
DEFAULT_POLICY = "inet:127.0.0.1:10031"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")

MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def send(port: int, rcpts: list[str], subject: str = "hello",
         sender: str = "someone@remote.example") -> dict[str, tuple[int, bytes]]:
    """One message over SMTP; returns the refused recipients (smtplib raises if all were refused)."""
    msg = f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        refused: dict[str, tuple[int, bytes]] = client.sendmail(sender, rcpts, msg)
        return refused


class PostfixError(RuntimeError):
    """Postfix failed to start or a postfix command failed."""


def contrib_snippet(name: str, replacements: Mapping[str, str]) -> str:
    """A contrib/postfix file verbatim, with each default address replaced exactly once."""
    text = (CONTRIB / name).read_text()
    for old, new in replacements.items():
        if text.count(old) != 1:
            raise PostfixError(f"contrib/postfix/{name} must contain {old!r} exactly once (docs and tests drifted)")
        text = text.replace(old, new)
    return text


def master_cf_options(milter: str) -> list[str]:
    """The `-o name=value` lines of contrib/postfix/master.cf's smtp service."""
    text = contrib_snippet("master.cf", {DEFAULT_MILTER: milter})
    options = [line.strip() for line in text.splitlines() if line.strip().startswith("-o ")]
    if not options:
        raise PostfixError("contrib/postfix/master.cf has no -o lines")
    return options


class Postfix:
    """One private Postfix instance on a free loopback port."""

    def __init__(
        self,
        *,
        relay_port: int,
        milter: str | None = None,
        policy: str | None = None,
        milter_in_master_cf: bool = False,
        main_cf: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        if not Path(POSTFIX).exists():
            raise PostfixError(f"{POSTFIX} is missing: install postfix (setup.sh does)")
        self.port = port or free_port()
        self.relay_port = relay_port
        self.dir = Path(tempfile.mkdtemp(prefix="qg-postfix-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        for d in (self.conf, self.queue, self.data):
            d.mkdir()
        ent = pwd.getpwnam("postfix")
        os.chown(self.data, ent.pw_uid, ent.pw_gid)
        self.maillog_path = self.dir / "maillog"
        self._write_config(milter, policy, milter_in_master_cf, main_cf or {})

    def _write_config(self, milter: str | None, policy: str | None, in_master: bool,
                      extra: Mapping[str, str]) -> None:
        main = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = mx.queueguard.test",
            "mydestination =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            f"relayhost = [127.0.0.1]:{self.relay_port}",
            f"maillog_file = {self.maillog_path}",
            f"maillog_file_prefixes = {self.dir}",
            "smtputf8_enable = no",
            "biff = no",
            "alias_maps =",
            "local_recipient_maps =",
            "smtpd_banner = $myhostname ESMTP",
            "default_process_limit = 50",
            "smtp_connection_cache_on_demand = yes",
            "queue_run_delay = 300s",
            "minimal_backoff_time = 300s",
            "smtpd_error_sleep_time = 0",
            "smtpd_soft_error_limit = 1000",
            "smtpd_hard_error_limit = 1000",
            "smtpd_client_connection_rate_limit = 0",
            "anvil_rate_time_unit = 60s",
        ]
        main.extend(f"{k} = {v}" for k, v in extra.items())
        text = "\n".join(main) + "\n"
        if milter is not None and not in_master:
            text += "\n" + contrib_snippet("main.cf.milter", {DEFAULT_MILTER: milter})
        if policy is not None:
            text += "\n" + contrib_snippet("main.cf.policy", {DEFAULT_POLICY: f"inet:{policy}"})
        (self.conf / "main.cf").write_text(text)
        smtpd = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        if milter is not None and in_master:
            smtpd += "".join(f"  {opt}\n" for opt in master_cf_options(milter))
        (self.conf / "master.cf").write_text(smtpd + MASTER_SERVICES)

    # --- life cycle ----------------------------------------------------------------

    def postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.conf), *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    @property
    def pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def start(self, timeout: float = 30.0) -> Self:
        check = subprocess.run(["postconf", "-c", str(self.conf), "-n"], capture_output=True, text=True, check=False)
        if check.returncode != 0 or "warning" in check.stderr:
            raise PostfixError(f"postconf rejects the test config: {check.stderr}")
        result = self.postfix("start", timeout=timeout)
        if result.returncode != 0:
            raise PostfixError(f"postfix start failed ({result.returncode}): {result.stderr}\n{self.maillog()}")
        wait_port("127.0.0.1", self.port, timeout=timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- observing ------------------------------------------------------------------

    def maillog(self) -> str:
        return self.maillog_path.read_text(errors="replace") if self.maillog_path.exists() else ""

    def queue_counts(self) -> dict[str, int]:
        """Queue files per queue (maildrop, incoming, active, deferred, hold, corrupt)."""
        counts = {}
        for name in QUEUES:
            d = self.queue / name
            counts[name] = sum(1 for p in d.rglob("*") if p.is_file()) if d.exists() else 0
        return counts

    def wait_queue_empty(self, timeout: float = 20.0, *, ignore: tuple[str, ...] = ("hold",)) -> dict[str, int]:
        """Wait until every queue but `ignore` is empty; returns the last counts."""
        deadline = time.monotonic() + timeout
        counts = self.queue_counts()
        while time.monotonic() < deadline:
            counts = self.queue_counts()
            if not any(n for q, n in counts.items() if q not in ignore):
                return counts
            time.sleep(0.05)
        return counts

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Wait until the maillog has `count` lines matching `pattern` (regex); return them."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        found: list[str] = []
        while time.monotonic() < deadline:
            found = [line for line in self.maillog().splitlines() if rx.search(line)]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return found


__all__ = ["DEFAULT_MILTER", "DEFAULT_POLICY", "Postfix", "PostfixError", "contrib_snippet", "free_port", "send"]
