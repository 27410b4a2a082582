"""Who may read the status page and /status.json: they list recipient addresses.

A password (only its scrypt hash is in the settings) for people, a bearer token (in a file)
for scripts; either one logs a browser in through the form, which gets a session cookie so
the slow hash runs once per login, not on every 5-second refresh of the page.

Password hash format (`queueguard passwd` writes it; anything with Python's hashlib can check
it): `$scrypt$ln=15,r=8,p=1$SALT$KEY`, SALT and KEY in standard base64 without padding, KEY =
hashlib.scrypt(password as UTF-8, salt=SALT, n=2**ln, r=r, p=p, dklen=len(KEY)).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from queueguard.settings import StatusSettings

SCRYPT_LN, SCRYPT_R, SCRYPT_P = 15, 8, 1  # 32 MiB and ~0.1 s per try: an offline guess costs the same
SALT_BYTES, KEY_BYTES = 16, 32
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024  # refuse hashes whose check would take more than this
MIN_TOKEN_LENGTH = 32
MAX_SESSIONS = 256
LOGIN_FAIL_DELAY = 1.0  # seconds a wrong password holds the login gate: at most ~1 guess/s overall
LOGIN_MAX_WAITING = 8  # more logins queued than this get 429 at once, not a growing queue
LOGIN_PER_CLIENT = 2  # logins one client address may have queued: one guesser cannot fill the queue
COOKIE = "qg_session"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class ScryptHash:
    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def derive(self, password: str) -> bytes:
        return hashlib.scrypt(password.encode(), salt=self.salt, n=1 << self.ln, r=self.r, p=self.p,
                              maxmem=2 * 128 * self.r * (1 << self.ln) + (1 << 20), dklen=len(self.key))


def parse_password_hash(text: str) -> ScryptHash:
    """The settings' `status.password_hash`; ValueError naming what is wrong (checked at load)."""
    parts = text.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        raise ValueError("password_hash must look like $scrypt$ln=15,r=8,p=1$SALT$KEY (make one with "
                         "`queueguard passwd`)")
    try:
        params = dict(kv.split("=", 1) for kv in parts[2].split(","))
        ln, r, p = int(params.pop("ln")), int(params.pop("r")), int(params.pop("p"))
        if params:
            raise ValueError
    except (ValueError, KeyError):
        raise ValueError("password_hash: parameters must be ln=N,r=N,p=N") from None
    if not (10 <= ln <= 24 and 1 <= r <= 64 and 1 <= p <= 16) or 128 * r * (1 << ln) > MAX_SCRYPT_MEMORY:
        raise ValueError(f"password_hash: ln={ln},r={r},p={p} is too weak or needs over "
                         f"{MAX_SCRYPT_MEMORY >> 20} MiB per check")
    try:
        salt, key = _unb64(parts[3]), _unb64(parts[4])
    except (binascii.Error, ValueError):
        raise ValueError("password_hash: salt and key must be base64") from None
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("password_hash: salt under 8 bytes or key under 16 bytes")
    return ScryptHash(ln, r, p, salt, key)


def hash_password(password: str, ln: int = SCRYPT_LN) -> str:
    salt = os.urandom(SALT_BYTES)
    h = ScryptHash(ln, SCRYPT_R, SCRYPT_P, salt, b"\0" * KEY_BYTES)
    return f"$scrypt$ln={ln},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(h.derive(password))}"


def verify_password(password: str, encoded: ScryptHash) -> bool:
    return hmac.compare_digest(encoded.derive(password), encoded.key)


def read_token(path: os.PathLike[str] | str) -> str:
    """The bearer token in `path` (surrounding whitespace dropped); ValueError if too short to be safe."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ValueError(f"the token must be one word of at least {MIN_TOKEN_LENGTH} characters "
                         "(`openssl rand -hex 32`)")
    return token


def _digest(secret: str) -> bytes:
    """Compared as fixed-length digests: compare_digest on the raw strings would leak their length."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


class LoginBusy(Exception):
    """Too many logins are already waiting for the gate."""


@dataclass
class Sessions:
    """Random session ids kept by their SHA-256 (the table never holds a usable cookie), with expiry.

    With `directory` (the workers' run directory) the table is a file per session there: the
    kernel spreads an admin's requests over every worker, and a session one worker alone knew
    was a 401 from the others (the page then sent the admin back to the login form)."""

    lifetime: float
    clock: Callable[[], float] = time.monotonic
    """time.monotonic: one clock for every process of the host."""
    directory: Path | None = None
    _expiry: dict[bytes, float] = field(default_factory=dict)

    def new(self) -> str:
        now = self.clock()
        table = self._load()
        for k in [k for k, t in table.items() if t <= now]:
            self._forget(k)
            del table[k]
        while len(table) >= MAX_SESSIONS:
            oldest = min(table, key=table.__getitem__)
            self._forget(oldest)
            del table[oldest]
        sid = secrets.token_urlsafe(32)
        self._remember(_digest(sid), now + self.lifetime)
        return sid

    def valid(self, sid: str) -> bool:
        expiry = self._expiry_of(_digest(sid))
        return expiry is not None and expiry > self.clock()

    def drop(self, sid: str) -> None:
        self._forget(_digest(sid))

    def _load(self) -> dict[bytes, float]:
        if self.directory is None:
            return dict(self._expiry)
        table = {}
        for path in self.directory.glob("*.session"):
            with contextlib.suppress(ValueError, OSError):
                table[bytes.fromhex(path.stem)] = float(path.read_text())
        return table

    def _expiry_of(self, key: bytes) -> float | None:
        if self.directory is None:
            return self._expiry.get(key)
        try:
            return float((self.directory / f"{key.hex()}.session").read_text())
        except (OSError, ValueError):
            return None

    def _remember(self, key: bytes, expiry: float) -> None:
        if self.directory is None:
            self._expiry[key] = expiry
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.directory / f".{key.hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(repr(expiry))
        os.rename(tmp, self.directory / f"{key.hex()}.session")

    def _forget(self, key: bytes) -> None:
        if self.directory is None:
            self._expiry.pop(key, None)
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{key.hex()}.session").unlink()


class StatusAuth:
    """The credentials of one web listener, its sessions and its login gate."""

    def __init__(self, password_hash: str = "", token: str | None = None, session_lifetime: float = 8 * 3600.0,
                 *, session_dir: Path | None = None, processes: int = 1) -> None:
        """`session_dir` and `processes`: the workers' shared sessions, and how many processes
        serve logins (each one's wrong guesses are slowed by that many, so the host together
        still allows about one a second)."""
        self.password = parse_password_hash(password_hash) if password_hash else None
        self._token = _digest(token) if token else None
        if self.password is None and self._token is None:
            raise ValueError("StatusAuth needs a password hash or a token")
        self.sessions = Sessions(session_lifetime, directory=session_dir)
        self.processes = max(1, processes)
        self.lifetime = session_lifetime
        self._gate = asyncio.Lock()
        self._waiting: dict[str, int] = {}

    def token_ok(self, token: str) -> bool:
        return self._token is not None and hmac.compare_digest(_digest(token), self._token)

    def bearer_ok(self, authorization: str) -> bool:
        scheme, _, value = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def session_ok(self, cookie_header: str) -> bool:
        return any(self.sessions.valid(sid) for sid in session_ids(cookie_header))

    def _secret_ok(self, secret: str) -> bool:
        if self.token_ok(secret):
            return True
        return self.password is not None and verify_password(secret, self.password)

    async def login(self, secret: str, client: str = "") -> str | None:
        """A new session id for the right password or token, None for a wrong one.

        One check at a time, off the event loop (scrypt takes ~0.1 s and 32 MiB), and a wrong
        one holds the gate for LOGIN_FAIL_DELAY times the processes serving logins: guessing runs
        at about one try a second however many connections try, and cannot take the CPU from
        the mail. The queue is
        bounded, and so is each client address's share of it: a guesser from one address
        cannot keep it full and lock the admin out with 429s (the gate is first come, first
        served, so the admin waits that delay per address guessing).
        """
        if sum(self._waiting.values()) >= LOGIN_MAX_WAITING or self._waiting.get(client, 0) >= LOGIN_PER_CLIENT:
            raise LoginBusy
        self._waiting[client] = self._waiting.get(client, 0) + 1
        try:
            async with self._gate:
                if await asyncio.to_thread(self._secret_ok, secret):
                    return self.sessions.new()
                await asyncio.sleep(LOGIN_FAIL_DELAY * self.processes)
                return None
        finally:
            if (left := self._waiting[client] - 1) > 0:
                self._waiting[client] = left
            else:
                del self._waiting[client]


def session_ids(cookie_header: str) -> list[str]:
    """Every qg_session value in a Cookie header (a browser may send more than one)."""
    found = []
    for part in cookie_header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name == COOKIE and value:
            found.append(value)
    return found


def from_settings(status: StatusSettings, *, session_dir: Path | None = None, processes: int = 1
                  ) -> StatusAuth | None:
    """The listener's credentials; None when the settings give none (allowed on loopback only)."""
    token = read_token(status.token_file) if status.token_file is not None else None
    if not status.password_hash and token is None:
        return None
    return StatusAuth(status.password_hash, token, status.session_lifetime, session_dir=session_dir,
                      processes=processes)
