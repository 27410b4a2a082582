"""A real Exim 4.96 on loopback for tests and replays, run from an unpacked exim4-daemon-heavy tree.

Where the binary comes from (`exim_binary()`): ``$QUEUEGUARD_EXIM_ROOT`` (what
`queueguard replay --exim-root` sets; ``DIR/usr/sbin/exim4``), else the
checkout's ``.deps/exim/root`` when the package runs from one (`./setup.sh
--no-run` unpacks it there: Exim conflicts with the postfix package as the
machine's MTA), else the system's ``/usr/sbin/exim4``.

Each `Exim` gets its own 0755 temp dir (Exim drops to Debian-exim, which must be
able to traverse it) with config, spool, logs, pid file and maildirs, and runs
`exim -C conf -bdf` in the foreground on a free loopback port. The generated
config `.include`s the shipped proxy-deployment.conf (`queueguard.shipped`)
verbatim, so the shipped snippet is the tested one; with ``proxy=False`` its
QG_PROXY_HOSTS macro is empty, i.e. no PROXY header is expected.

Mail for ``@test.example`` goes to ``<dir>/maildir/<local_part>`` for the
configured users; any other local part gets ``550 Unrouteable address`` at
RCPT. Other domains may only be relayed by ``relay_from_hosts`` (empty by
default); relayed mail goes to ``smarthost`` if given, else to
``<dir>/relayed`` so a test can see it.

A client connecting from 127.0.0.1 (or ::1) to an Exim with ``proxy=True``
must send a PROXY header; for a direct "external" client bind the source to
127.0.0.2 (``swaks --local-interface 127.0.0.2``).

Callers add ACL text with ``rcpt_acl`` / ``data_acl`` (statements spliced into
acl_check_rcpt after relay control and recipient verification, and into
acl_check_data), ``acl_definitions`` (whole extra ACLs, e.g.
``.include`` of the shipped readsocket-acl.conf), ``main_config`` and ``macros``.

``queue_only=True`` keeps accepted mail in the queue (``queue_count()``,
``run_queue()``); otherwise Exim delivers right after its 250, so use
``wait_maildir()``. The mainlog line "exim user lost privilege for using -C
option" is expected: the delivery re-exec runs as Debian-exim, which is also
the transports' user.

Exim delays its 221 reply to QUIT by ~200 ms; clients in tests should reuse
connections or not wait for the 221.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from queueguard.harness.ports import free_port
from queueguard.shipped import EXIM_SNIPPETS

EXIM_USER = "Debian-exim"
EXIM_ROOT_ENV = "QUEUEGUARD_EXIM_ROOT"
SYSTEM_EXIM = Path("/usr/sbin/exim4")
_SOURCE_TREE = Path(__file__).resolve().parents[2]
_IN_ROOT = Path("usr") / "sbin" / "exim4"


class EximError(RuntimeError):
    """Exim failed to start, or an exim command failed."""


def exim_binary() -> Path:
    """The Exim to run: the tree named by $QUEUEGUARD_EXIM_ROOT, the checkout's .deps, or the system's."""
    named = os.environ.get(EXIM_ROOT_ENV)
    if named:
        binary = Path(named) / _IN_ROOT
        if not binary.is_file():
            raise EximError(f"Exim root {named} (--exim-root, ${EXIM_ROOT_ENV}): no {_IN_ROOT} under it; give "
                            "an unpacked exim4-daemon-heavy tree, such as a checkout's .deps/exim/root")
        return binary
    checkout = _SOURCE_TREE / ".deps" / "exim" / "root" / _IN_ROOT
    if (_SOURCE_TREE / "pyproject.toml").is_file() and checkout.is_file():
        return checkout
    if SYSTEM_EXIM.is_file():
        return SYSTEM_EXIM
    raise EximError(f"no Exim found: pass --exim-root DIR (or set {EXIM_ROOT_ENV}=DIR) for an unpacked "
                    f"exim4-daemon-heavy tree with DIR/{_IN_ROOT} (in a checkout, ./setup.sh --no-run makes "
                    f".deps/exim/root), or install exim4-daemon-heavy for {SYSTEM_EXIM}")


@functools.cache
def _runtime() -> Path:
    """A 0755 copy of the Exim binary and the shipped Exim snippets, made once per process.

    Exim drops to Debian-exim before it reads a ``-C`` config and re-execs itself for
    deliveries, so the binary and every included file must be reachable by that user. A
    checkout or venv in a 0700 directory (``mktemp -d``) is not; the copies are byte for byte
    the shipped files.
    """
    root = Path(tempfile.mkdtemp(prefix="qg-exim-runtime-"))
    root.chmod(0o755)
    atexit.register(shutil.rmtree, root, True)
    (root / "contrib").mkdir(mode=0o755)
    for conf in EXIM_SNIPPETS.glob("*.conf"):
        shutil.copy2(conf, root / "contrib" / conf.name)
    shutil.copy2(exim_binary(), root / "exim4")
    return root


def _staged(text: str) -> str:
    """Config text with the shipped snippets' paths pointed at the runtime copies."""
    return text.replace(f"{EXIM_SNIPPETS}/", f"{_runtime() / 'contrib'}/")


LOCAL_DOMAIN = "test.example"
DEFAULT_USERS = ("alice", "bob", "carol", "dave", "postmaster", "info")
#: Source address for a "direct" client that must not be treated as the proxy.
DIRECT_SOURCE = "127.0.0.2"


def _config(
    *,
    root: Path,
    port: int,
    ipv6: bool,
    proxy: bool,
    relay_from_hosts: Sequence[str],
    users: Sequence[str],
    queue_only: bool,
    smarthost: tuple[str, int] | None,
    macros: Mapping[str, str],
    main_config: str,
    acl_definitions: str,
) -> str:
    """Render the Exim configuration (pure: paths and options in, text out)."""
    macro_lines = "\n".join(f"{k} = {v}" for k, v in macros.items())
    loopbacks = "<; 127.0.0.1 ; ::1" if ipv6 else "<; 127.0.0.1"
    proxy_hosts = loopbacks if proxy else ""
    relay = "<; " + " ; ".join(relay_from_hosts) if relay_from_hosts else ""
    if smarthost is None:
        relay_router = "  driver = accept\n  transport = relayed_maildir\n"
    else:
        host, hport = smarthost
        relay_router = (
            "  driver = manualroute\n"
            f"  route_list = * {host}::{hport} byname\n"
            "  transport = remote_smtp\n"
            "  self = send\n"
        )
    return f"""# generated by queueguard/harness/exim.py
QG_EXIM_PORT = {port}
QG_PROXY_HOSTS = {proxy_hosts}
QG_LOCAL_INTERFACES = {loopbacks}
{macro_lines}
.include {EXIM_SNIPPETS / "proxy-deployment.conf"}

primary_hostname = mx.{LOCAL_DOMAIN}
exim_path = {_runtime() / "exim4"}
spool_directory = {root}/spool
log_file_path = {root}/log/%slog
pid_file_path = {root}/exim.pid
keep_environment =
domainlist local_domains = {LOCAL_DOMAIN}
hostlist relay_from_hosts = {relay}
host_lookup =
# This sandbox has no DNS: with PROXY, Exim looks up the client's PTR and a DNS
# timeout costs 5 s per connection. byaddr uses /etc/hosts (gethostbyaddr).
host_lookup_order = byaddr
rfc1413_hosts =
tls_advertise_hosts =
queue_only = {"true" if queue_only else "false"}
acl_smtp_rcpt = acl_check_rcpt
acl_smtp_data = acl_check_data
message_size_limit = 50M
log_selector = +smtp_connection +incoming_port +received_recipients +proxy
# Fail fast (and let start() pick another port) instead of Exim's 9 x 30 s bind retries.
daemon_startup_retries = 0
{main_config}

begin acl

acl_check_rcpt:
  accept  hosts = :
  deny    message = Restricted characters in address
          local_parts = ^[.] : ^.*[@%!/|]
  deny    message = relay not permitted
          !hosts = +relay_from_hosts
          !domains = +local_domains
  require verify = recipient
.include {root}/acl-rcpt.conf
  accept

acl_check_data:
.include {root}/acl-data.conf
  accept

{acl_definitions}

begin routers

local_user:
  driver = accept
  domains = +local_domains
  local_parts = {" : ".join(u.lower() for u in users) or ":"}
  transport = local_maildir

relay:
  domains = ! +local_domains
{relay_router}
begin transports

local_maildir:
  driver = appendfile
  directory = {root}/maildir/${{local_part_data}}
  maildir_format
  create_directory
  delivery_date_add
  envelope_to_add
  return_path_add
  user = {EXIM_USER}
  group = {EXIM_USER}
  mode = 0640

relayed_maildir:
  driver = appendfile
  directory = {root}/relayed
  maildir_format
  create_directory
  envelope_to_add
  user = {EXIM_USER}
  group = {EXIM_USER}
  mode = 0640

remote_smtp:
  driver = smtp
  hosts_try_fastopen =

begin retry

*   *   F,10m,10s
"""


def _has_ipv6_loopback() -> bool:
    """Containers often lack ::1; Exim refuses to start if it cannot bind every local_interface."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _messages(maildir: Path) -> list[bytes]:
    """All messages in a maildir (new/ and cur/), oldest first."""
    files = [p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()]
    files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
    return [p.read_bytes() for p in files]


class Exim:
    """One Exim daemon on 127.0.0.1/::1 with its own temp dir; stop() by PID."""

    def __init__(
        self,
        *,
        proxy: bool = False,
        relay_from_hosts: Sequence[str] = (),
        users: Sequence[str] = DEFAULT_USERS,
        queue_only: bool = False,
        smarthost: tuple[str, int] | None = None,
        macros: Mapping[str, str] | None = None,
        main_config: str = "",
        rcpt_acl: str = "",
        data_acl: str = "",
        acl_definitions: str = "",
        port: int | None = None,
    ) -> None:
        self.proxy = proxy
        self.relay_from_hosts = tuple(relay_from_hosts)
        self.users = tuple(users)
        self.queue_only = queue_only
        self.smarthost = smarthost
        self.macros = dict(macros or {})
        self.main_config = main_config
        self.rcpt_acl = rcpt_acl
        self.data_acl = data_acl
        self.acl_definitions = acl_definitions
        self.port = port or 0
        self._auto_port = port is None
        self.dir = Path(tempfile.mkdtemp(prefix="qg-exim-"))
        self.dir.chmod(0o755)
        self.config_path = self.dir / "exim.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepare()

    # -- setup ---------------------------------------------------------------

    def _prepare(self) -> None:
        exim_binary()  # a clear error before anything is made
        try:
            ent = pwd.getpwnam(EXIM_USER)
        except KeyError as exc:
            raise EximError(f"user {EXIM_USER} missing: run ./setup.sh --no-run, or install exim4-base") from exc
        for sub in ("spool", "log", "maildir", "relayed"):
            d = self.dir / sub
            d.mkdir(exist_ok=True)
            os.chown(d, ent.pw_uid, ent.pw_gid)
            d.chmod(0o750)
        if not self.port:
            self.port = free_port()
        self.write_config()

    def write_config(self) -> None:
        """(Re)write the config from the current attributes; a running daemon needs restart()."""
        (self.dir / "acl-rcpt.conf").write_text(_staged(self.rcpt_acl) + "\n")
        (self.dir / "acl-data.conf").write_text(_staged(self.data_acl) + "\n")
        text = _config(
            root=self.dir,
            port=self.port,
            ipv6=_has_ipv6_loopback(),
            proxy=self.proxy,
            relay_from_hosts=self.relay_from_hosts,
            users=self.users,
            queue_only=self.queue_only,
            smarthost=self.smarthost,
            macros=self.macros,
            main_config=self.main_config,
            acl_definitions=self.acl_definitions,
        )
        self.config_path.write_text(_staged(text))

    # -- process control -----------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the running daemon, None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> Exim:
        """Start the daemon and wait for its 220 banner; raise EximError with its stderr otherwise.

        If the port was picked here and someone else took it meanwhile, pick another one.
        """
        if self.pid is not None:
            return self
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except EximError as exc:
                if not self._auto_port or "Address already in use" not in str(exc) or attempt == 2:
                    raise
                self.port = free_port()
                self.write_config()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> Exim:
        self.check_config()
        stderr = open(self.dir / "daemon.stderr", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [str(_runtime() / "exim4"), "-C", str(self.config_path), "-bdf"],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            stderr.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise EximError(f"exim exited with {self._proc.returncode}: {self._diagnostics()}")
            if self._banner():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise EximError(f"exim gave no 220 banner on port {self.port}: {self._diagnostics()}")
            time.sleep(0.02)

    def _banner(self) -> bool:
        """True once the daemon greets a client (source 127.0.0.2: not subject to hosts_proxy)."""
        try:
            with socket.create_connection(
                ("127.0.0.1", self.port), timeout=2, source_address=(DIRECT_SOURCE, 0)
            ) as s:
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    def _diagnostics(self) -> str:
        parts = []
        for name in ("daemon.stderr", "log/paniclog"):
            p = self.dir / name
            if p.exists():
                parts.append(f"{name}: {p.read_text(errors='replace')[-2000:]}")
        return "; ".join(parts) or "(no output)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the daemon and whatever it forked (its own session), then reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> Exim:
        """Stop, rewrite the config from the attributes, start again on the same port."""
        self.stop()
        self.write_config()
        return self.start()

    def close(self) -> None:
        """Stop the daemon and remove the temp dir."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Exim:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- running exim commands -------------------------------------------------

    def run(self, *args: str, input: str | bytes = b"", check: bool = True) -> str:
        """Run ``exim -C conf ARGS`` and return stdout+stderr as text."""
        data = input.encode() if isinstance(input, str) else input
        res = subprocess.run(
            [str(_runtime() / "exim4"), "-C", str(self.config_path), *args],
            input=data,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
        out = res.stdout.decode(errors="replace")
        if check and res.returncode != 0:
            raise EximError(f"exim {' '.join(args)} exited {res.returncode}: {out}")
        return out

    def check_config(self) -> str:
        """``exim -bV``: parses the whole config; raises EximError on a config error."""
        return self.run("-bV")

    def bh(self, client_ip: str, dialogue: str) -> str:
        """Host-checking mode (``exim -bh IP``): run the ACLs on a scripted SMTP dialogue.

        ``dialogue`` is SMTP commands, one per line. Returns Exim's replies and
        its ">>>" commentary. Needs no daemon.
        """
        if not dialogue.endswith("\n"):
            dialogue += "\n"
        return self.run("-bh", client_ip, input=dialogue, check=False)

    def queue_count(self) -> int:
        """Messages in the queue (``exim -bpc``)."""
        return int(self.run("-bpc").strip())

    def run_queue(self) -> None:
        """Force one delivery attempt for every queued message (``exim -qff``), foreground."""
        self.run("-qff")

    def reset_ratelimits(self) -> None:
        """Forget ratelimit state (spool/db/ratelimit*), which persists across -bh runs."""
        for p in (self.dir / "spool" / "db").glob("ratelimit*"):
            p.unlink()

    # -- results -------------------------------------------------------------

    def maildir(self, local_part: str) -> list[bytes]:
        """Messages delivered to local_part@test.example, oldest first."""
        return _messages(self.dir / "maildir" / local_part.lower())

    def relayed(self) -> list[bytes]:
        """Messages relayed to other domains (when no smarthost is set)."""
        return _messages(self.dir / "relayed")

    def wait_maildir(self, local_part: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Wait until local_part has at least ``count`` messages (delivery runs after the 250)."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.maildir(local_part)
            if len(msgs) >= count or time.monotonic() > deadline:
                return msgs
            time.sleep(0.02)

    def _log(self, name: str) -> str:
        p = self.dir / "log" / name
        return p.read_text(errors="replace") if p.exists() else ""

    def mainlog(self) -> str:
        return self._log("mainlog")

    def rejectlog(self) -> str:
        return self._log("rejectlog")

    def paniclog(self) -> str:
        return self._log("paniclog")

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for a regex to appear in the mainlog (deliveries are logged after the 250)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.mainlog())
            if m is not None:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in mainlog after {timeout}s:\n{self.mainlog()[-3000:]}")
            time.sleep(0.02)
