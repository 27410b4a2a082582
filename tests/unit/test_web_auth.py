"""The status listener's access rules over a real loopback socket, attacked the ways a stranger would.

Data markers (a recipient, the node name) are in every status() answer: no response to an
unauthenticated request may contain them, whatever the path, method or headers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from queueguard import metrics, webauth
from queueguard.web import start_web
from queueguard.webauth import StatusAuth, hash_password, parse_password_hash, verify_password
from tests.unit.queuewatch.test_queuewatch_web import request

PASSWORD = "correct horse battery staple"
TOKEN = secrets.token_hex(32)
RECIPIENT = "info@example.org"
NODE = "mx-secret-node"
HASH = hash_password(PASSWORD, ln=10)  # the cheapest allowed cost keeps the tests quick; same code path


def status() -> dict[str, object]:
    return {"node": NODE, "ratelimit": {"top": [{"key": RECIPIENT, "rule": "flood", "count": 9}]}}


def req(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def login_body(secret: str) -> bytes:
    from urllib.parse import urlencode

    return urlencode({"password": secret}).encode()


def no_data(body: bytes) -> bool:
    return RECIPIENT.encode() not in body and NODE.encode() not in body and b"flood" not in body


async def serve(auth: StatusAuth | None) -> tuple[asyncio.base_events.Server, int]:
    server = await start_web("127.0.0.1", 0, status, auth)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server, p = await serve(StatusAuth(HASH, TOKEN))
    yield p
    server.close()
    await server.wait_closed()


async def log_in(port: int, secret: str = PASSWORD) -> str:
    code, headers, _ = await request(port, req("POST", "/login", body=login_body(secret)))
    assert code == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{webauth.COOKIE}=")
    return cookie.split(";", 1)[0]


# --- the hash -------------------------------------------------------------------------------------------


def test_hash_round_trip_and_documented_format() -> None:
    encoded = hash_password(PASSWORD, ln=10)
    assert verify_password(PASSWORD, parse_password_hash(encoded))
    assert not verify_password(PASSWORD + " ", parse_password_hash(encoded))
    assert hash_password(PASSWORD, ln=10) != encoded  # a fresh salt each time
    # docs/settings.md#status, followed with hashlib alone
    _, alg, params, salt, key = encoded.split("$")
    p = dict(kv.split("=") for kv in params.split(","))
    unb64 = lambda t: base64.b64decode(t + "=" * (-len(t) % 4))  # noqa: E731
    derived = hashlib.scrypt(PASSWORD.encode(), salt=unb64(salt), n=2 ** int(p["ln"]), r=int(p["r"]), p=int(p["p"]),
                             dklen=len(unb64(key)))
    assert alg == "scrypt" and "=" not in salt + key and derived == unb64(key)


@pytest.mark.parametrize(("text", "message"), [
    ("plaintext-password", "must look like $scrypt$"),
    ("$pbkdf2$ln=15,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "must look like $scrypt$"),
    ("$scrypt$ln=15,r=8$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "ln=N,r=N,p=N"),
    ("$scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "too weak"),
    ("$scrypt$ln=30,r=8,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "too weak or needs over"),
    ("$scrypt$ln=15,r=8,p=1$not base64!$a2V5a2V5a2V5a2V5a2V5a2V5", "base64"),
    ("$scrypt$ln=15,r=8,p=1$c2FsdA$a2V5", "salt under 8 bytes"),
])
def test_malformed_hashes_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("$", r"\$")):
        parse_password_hash(text)


# --- before login ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    req("GET", "/"), req("GET", "/index.html"), req("HEAD", "/"), req("GET", "/status.json"),
    req("HEAD", "/status.json"), req("GET", "/status.json?callback=x"), req("GET", "/login"),
    # path tricks: none of these may reach the data
    req("GET", "//status.json"), req("GET", "/status.json/"), req("GET", "/./status.json"),
    req("GET", "/%73tatus.json"), req("GET", "/STATUS.JSON"), req("GET", "/status.json%00"),
    req("GET", "/status.json;x"), req("GET", "/login/../status.json"), req("GET", "/metrics/../status.json"),
    req("GET", "http://127.0.0.1/status.json"), req("GET", "/healthz/../index.html"), req("GET", "/status.json#"),
    # headers that are not credentials
    req("GET", "/status.json", "Authorization: Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()),
    req("GET", "/status.json", f"Authorization: Bearer {TOKEN[:-1]}"),
    req("GET", "/status.json", f"Authorization: Bearer {TOKEN}x"),
    req("GET", "/status.json", f"Authorization: {TOKEN}"),
    req("GET", "/status.json", f"Authorization: Bearer {PASSWORD}"),
    req("GET", "/status.json", f"Cookie: {webauth.COOKIE}={TOKEN}"),
    req("GET", "/status.json", "X-Forwarded-For: 127.0.0.1", "X-Real-IP: 127.0.0.1"),
    req("GET", "/status.json", f"Authorization: Bearer {TOKEN}", f"Authorization: Bearer {TOKEN}"),
    req("POST", "/status.json", body=b"password=" + PASSWORD.encode()),
])
async def test_no_data_without_credentials(port: int, raw: bytes) -> None:
    code, _, body = await request(port, raw)
    assert code in (200, 303, 400, 401, 404, 405), code
    assert no_data(body), body[:300]
    if code == 200:  # only the login form is ever 200 here
        assert b'<form id="login"' in body and b"<script" not in body


async def test_unauthenticated_answers_say_what_to_do(port: int) -> None:
    code, headers, body = await request(port, req("GET", "/"))
    assert code == 401 and headers["Content-Type"].startswith("text/html")
    assert 'name="password"' in body.decode() and "form-action 'self'" in headers["Content-Security-Policy"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    code, _, body = await request(port, req("GET", "/status.json"))
    assert (code, body) == (401, b'{"error": "authentication required"}')


async def test_health_readiness_and_metrics_stay_open(port: int) -> None:
    assert (await request(port, req("GET", "/healthz")))[:3:2] == (200, b"ok\n")
    code, _, body = await request(port, req("GET", "/readyz"))
    assert (code, body) == (200, b"ready\n")
    metrics.clamd_up.set(1)
    code, _, body = await request(port, req("GET", "/metrics"))
    assert code == 200 and b"queueguard_clamd_up 1.0" in body


# --- credentials -----------------------------------------------------------------------------------------


async def test_bearer_token_reads_status_json(port: int) -> None:
    for scheme in ("Bearer", "bearer"):
        code, _, body = await request(port, req("GET", "/status.json", f"Authorization: {scheme} {TOKEN}"))
        assert code == 200 and RECIPIENT.encode() in body


async def test_login_sets_a_strict_httponly_session(port: int) -> None:
    code, headers, _ = await request(port, req("POST", "/login", body=login_body(PASSWORD)))
    assert code == 303
    attrs = [a.strip() for a in headers["Set-Cookie"].split(";")]
    assert {"Path=/", "HttpOnly", "SameSite=Strict", "Max-Age=28800"} <= set(attrs[1:])
    cookie = attrs[0]
    assert len(cookie.split("=", 1)[1]) >= 40  # 32 random bytes
    code, _, body = await request(port, req("GET", "/", f"Cookie: theme=dark; {cookie}"))
    assert code == 200 and b'id="ratelimited"' in body
    code, _, body = await request(port, req("GET", "/status.json", f"Cookie: {cookie}"))
    assert code == 200 and RECIPIENT.encode() in body and NODE.encode() in body


async def test_the_token_also_logs_a_browser_in(port: int) -> None:
    cookie = await log_in(port, TOKEN)
    assert (await request(port, req("GET", "/status.json", f"Cookie: {cookie}")))[0] == 200


async def test_wrong_password_is_slow_logged_and_sets_no_cookie(port: int, caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    code, headers, body = await request(port, req("POST", "/login", body=login_body(PASSWORD[:-1])))
    assert code == 401 and "Set-Cookie" not in headers
    assert time.monotonic() - started >= webauth.LOGIN_FAIL_DELAY
    assert b"Wrong password or token." in body and no_data(body)
    code, headers, _ = await request(port, req("POST", "/login", body=b"password="))
    assert code == 401 and "Set-Cookie" not in headers
    # one line for the checked guess; the empty one (no check, no delay) logs nothing
    assert [r.getMessage() for r in caplog.records if "login" in r.getMessage()] == [
        "web: status page login failed client=127.0.0.1"]


async def test_forged_and_altered_cookies_are_refused(port: int) -> None:
    cookie = await log_in(port)
    name, sid = cookie.split("=", 1)
    flipped = sid[:-1] + ("A" if sid[-1] != "A" else "B")
    digest = base64.urlsafe_b64encode(hashlib.sha256(sid.encode()).digest()).decode()
    for forged in (flipped, sid[:-1], sid + "A", digest, secrets.token_urlsafe(32), "", sid.upper()):
        code, _, body = await request(port, req("GET", "/status.json", f"Cookie: {name}={forged}"))
        assert code == 401 and no_data(body), forged
    code, _, body = await request(port, req("GET", "/status.json", f"Cookie: other={sid}"))
    assert code == 401 and no_data(body)


async def test_logout_ends_the_session(port: int) -> None:
    cookie = await log_in(port)
    code, headers, _ = await request(port, req("POST", "/logout", f"Cookie: {cookie}"))
    assert code == 303 and "Max-Age=0" in headers["Set-Cookie"]
    code, _, body = await request(port, req("GET", "/status.json", f"Cookie: {cookie}"))
    assert code == 401 and no_data(body)


async def test_a_session_expires() -> None:
    server, port = await serve(StatusAuth(HASH, None, session_lifetime=0.5))
    try:
        cookie = await log_in(port)
        assert (await request(port, req("GET", "/status.json", f"Cookie: {cookie}")))[0] == 200
        deadline = time.monotonic() + 10
        while (await request(port, req("GET", "/status.json", f"Cookie: {cookie}")))[0] == 200:
            assert time.monotonic() < deadline, "the session did not expire"
            await asyncio.sleep(0.1)
        code, _, body = await request(port, req("GET", "/status.json", f"Cookie: {cookie}"))
        assert code == 401 and no_data(body)
    finally:
        server.close()
        await server.wait_closed()


async def test_guessing_is_serialised_and_bounded(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crowd of wrong guesses at once from many addresses: one check at a time, the overflow
    refused at once, and the right password still works afterwards. (The delay is shortened to
    keep the test quick.)"""
    monkeypatch.setattr(webauth, "LOGIN_FAIL_DELAY", 0.2)
    crowd = webauth.LOGIN_MAX_WAITING + 4
    started = time.monotonic()
    answers = await asyncio.gather(*(request(port, req("POST", "/login", body=login_body(f"guess{i}")),
                                             source=f"127.0.4.{i + 1}") for i in range(crowd)))
    codes = sorted(code for code, _, _ in answers)
    assert codes == [401] * webauth.LOGIN_MAX_WAITING + [429] * 4
    assert time.monotonic() - started >= webauth.LOGIN_MAX_WAITING * 0.2
    assert all("Set-Cookie" not in headers and no_data(body) for _, headers, body in answers)
    await log_in(port)


async def test_one_guessing_address_cannot_lock_the_admin_out(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, one client keeping the queue full (8 waiting) gave everyone else 429: the admin was
    locked out for as long as it kept guessing. Now one address holds at most its share."""
    monkeypatch.setattr(webauth, "LOGIN_FAIL_DELAY", 0.2)
    guesses = [asyncio.create_task(request(port, req("POST", "/login", body=login_body(f"g{i}")), source="127.0.5.1"))
               for i in range(webauth.LOGIN_MAX_WAITING + 2)]
    # a 429 for the guesser means its share of the queue is taken: the admin comes after it
    await asyncio.wait(guesses, return_when=asyncio.FIRST_COMPLETED)
    code, headers, _ = await request(port, req("POST", "/login", body=login_body(PASSWORD)), source="127.0.5.2")
    assert code == 303 and "qg_session=" in headers["Set-Cookie"]
    codes = sorted(c for c, _, _ in await asyncio.gather(*guesses))
    assert codes == [401] * webauth.LOGIN_PER_CLIENT + [429] * (len(guesses) - webauth.LOGIN_PER_CLIENT)


@pytest.mark.parametrize(("raw", "code"), [
    (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\npassword=x", 411),
    (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999\r\n\r\n", 413),
    (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nabcde", 400),
    (b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n Authorization: x\r\n\r\n", 400),
    (req("POST", "/login", body=b"&".join(b"a=%d" % i for i in range(20))), 400),
    (req("GET", "/logout"), 405),
    (req("DELETE", "/login"), 405),
])
async def test_odd_login_requests_get_a_clear_answer(port: int, raw: bytes, code: int) -> None:
    got, _, body = await request(port, raw)
    assert got == code and no_data(body)


# --- without credentials ----------------------------------------------------------------------------------


async def test_open_page_only_for_a_loopback_host_header() -> None:
    """No credentials (loopback only): a DNS name rebound to 127.0.0.1 must not read it via a browser."""
    server, port = await serve(None)
    try:
        for host in ("127.0.0.1", "127.0.0.1:9925", "localhost:9925", "[::1]:9925"):
            code, _, body = await request(port, f"GET /status.json HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert code == 200 and RECIPIENT.encode() in body, host
        for raw in (b"GET /status.json HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: evil.example:9925\r\n\r\n",
                    b"GET /status.json HTTP/1.0\r\n\r\n"):
            code, _, body = await request(port, raw)
            assert code == 403 and no_data(body), raw
        assert (await request(port, b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n"))[0] == 200
        assert (await request(port, req("POST", "/login", body=login_body(PASSWORD))))[0] == 405
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
async def test_no_open_listener_off_loopback(host: str) -> None:
    """Refused before anything binds (nothing here listens beyond loopback)."""
    with pytest.raises(ValueError, match=r"needs status\.password_hash or status\.token_file"):
        await start_web(host, 0, status)


def test_token_file_rules(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(f"  {TOKEN}\n")
    assert webauth.read_token(f) == TOKEN
    for bad in ("short", "two words " + TOKEN):
        f.write_text(bad)
        with pytest.raises(ValueError, match="at least 32 characters"):
            webauth.read_token(f)


def test_passwd_command_prints_a_hash_the_listener_accepts() -> None:
    run = [sys.executable, "-m", "queueguard.cli", "passwd"]
    r = subprocess.run(run, input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("$scrypt$ln=15,r=8,p=1$") and PASSWORD not in r.stdout + r.stderr
    assert verify_password(PASSWORD, parse_password_hash(line))
    assert not verify_password(PASSWORD.upper(), parse_password_hash(line))
    r = subprocess.run(run, input="short\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "at least 12 characters" in r.stderr
