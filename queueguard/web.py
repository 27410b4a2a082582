"""The metrics listener: /metrics, /status.json, /healthz, /readyz and a status page at /.

A deliberately small asyncio HTTP/1.1 server (GET and HEAD only, one request
per connection, bounded request line and headers, a deadline for reading
them) so the daemon needs no web framework; Prometheus and a browser are its
only clients.

`status()` is called for each /status.json and must be cheap (it reads state
the components already hold). The page (queueguard/static/status.html) reads
these keys and prints "n/a" for any that are missing or null, so a daemon
without, say, clamd or a Mailman watcher still renders:

    node, time        str; float unix seconds (else queuewatch.time)
    pressure          the governor (admission at the door, scanning or not):
                      {"level": "normal"|"soften"|"shed", "reason": str, "sensors": {name: number}}
    scan              ScanCheck.status() (null without clamd): {"gate": {"in_flight", "waiting", "limit"},
                      "clamd_up": bool, "breaker": "closed"|..., "clamd_stats": {"queue": int, ...}}
    ratelimit         {"top": [{"key": recipient, "rule": str, "count": int}]} (or the list itself),
                      most-limited first
    bursts            {"active": [{"rule", "fingerprint", "count": int, "since": unix}]} (or the list)
    quarantine        {"messages": int, "bytes": int, "by_rule": {rule: int}}
    downstreams       the relay's view: [{"address" (or "name"), "route", "up": bool}]
    queuewatch        QueueWatch.snapshot():
        time          float, when the last round finished
        queues        [{"mta", "queue", "messages", "oldest_age_seconds", "frozen": int|null,
                        "arrived", "departed" (last round), "stuck": bool, "departed_window": int (30m)}]
        filesystems   [{"path", "free_bytes", "size_bytes", "free_inodes", "inodes"}]
        downstreams   the banner probe: [{"name": address, "up": bool, "detail": str, "seconds"}]
        mailman_runners [{"runner", "running": int, "expected": bool}]
        processes     [{"name", "running": int}]
        clamd         {"up", "detail", "threads_live", "threads_idle", "threads_max", "queue_items"}
        watchers      [{"name", "ok": bool, "error": str, "seconds"}]

Strings from mail (recipients, fingerprints) are put into the page as text,
never as markup.

Access (docs/settings.md#status): /metrics (no addresses in any label), /healthz and /readyz
are always open. The page and /status.json list recipients: with a password or token in the
settings they need a login (POST /login sets an HttpOnly, SameSite=Strict session cookie) or
`Authorization: Bearer TOKEN`, whatever address the listener is on; with neither, `serve`
refuses a non-loopback listener (settings.host_problems) and the open page answers only to a
loopback Host header, so a web page whose DNS name is rebound to 127.0.0.1 cannot read it
through the admin's browser. No CSRF token: the only requests that change anything are login
and logout of one shared account.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import json
import logging
import math
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST

from queueguard import metrics
from queueguard.settings import StatusSettings, is_loopback, split_hostport
from queueguard.webauth import COOKIE, LoginBusy, StatusAuth, from_settings, session_ids

log = logging.getLogger("queueguard.web")

LINE_LIMIT = 8192
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
"""All header lines of a request together: 100 lines of 8 KiB each held 800 KB per connection."""
MAX_CONNECTIONS = 256
MAX_PER_CLIENT = 16
"""Requests being read or answered at once, in all and from one client address: the page may be
public (with a password), and connections holding memory must not grow without bound."""
MAX_BODY = 4096  # a login form; nothing else has a body
READ_DEADLINE = 10.0
REASONS = {
    200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}
PAGE_SECURITY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
LOGIN_SECURITY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'self'; " \
    "frame-ancestors 'none'"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="queueguard status"'}
LOGOUT_HIDDEN = b'<form id="logout" method="post" action="/logout" hidden>'
LOGIN_MESSAGE = b"<!--MESSAGE-->"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"

StatusFn = Callable[[], dict[str, object]]


class BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


def status_page() -> bytes:
    return importlib.resources.files("queueguard").joinpath("static/status.html").read_bytes()


@functools.cache
def _login_template() -> bytes:
    return importlib.resources.files("queueguard").joinpath("static/login.html").read_bytes()


def login_page(message: str = "") -> bytes:
    """The login form (read once, not per request); `message` is one of our fixed strings, never from the request."""
    page = _login_template()
    html = f'<p id="message" class="bad">{message}</p>'.encode() if message else b""
    return page.replace(LOGIN_MESSAGE, html)


async def start_web(host: str, port: int, status: StatusFn, access: StatusSettings | StatusAuth | None = None,
                    *, reuse_port: bool = False) -> asyncio.base_events.Server:
    """Listen on host:port (port 0 picks one: read it from server.sockets) and serve until closed.

    `access`: the settings' `status` section (or its StatusAuth); without credentials only a
    loopback host is allowed (ValueError otherwise: `serve` refuses earlier, in host_problems).
    `reuse_port` when several workers share the port.
    """
    auth = from_settings(access) if isinstance(access, StatusSettings) else access
    if auth is None and not is_loopback(host):
        raise ValueError(f"the status page on {host} needs status.password_hash or status.token_file")
    page = status_page()
    if auth is not None:
        page = page.replace(LOGOUT_HIDDEN, LOGOUT_HIDDEN.replace(b" hidden", b""))

    open_now: dict[str, int] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else ""
        if sum(open_now.values()) >= MAX_CONNECTIONS or open_now.get(client, 0) >= MAX_PER_CLIENT:
            writer.transport.abort()
            return
        open_now[client] = open_now.get(client, 0) + 1
        try:
            await _serve_one(reader, writer, status, page, auth)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("web: request failed")
        finally:
            if (left := open_now[client] - 1) > 0:
                open_now[client] = left
            else:
                del open_now[client]
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    return await asyncio.start_server(handle, host, port, limit=LINE_LIMIT, reuse_port=reuse_port)


SINGLE_HEADERS = ("authorization", "content-length", "host", "transfer-encoding")


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Request line, headers and (POST only) a small body within the limits; BadRequest otherwise."""
    line = await _read_line(reader, 414)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1")
    request = Request(method, target.split("?", 1)[0])
    headers = request.headers
    total = 0
    for _ in range(MAX_HEADERS + 1):
        line = await _read_line(reader, 431)
        if not line:
            break
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise BadRequest(431, f"header lines larger than {MAX_HEADER_BYTES} bytes together")
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        key, value = name.lower(), value.strip()
        if key in headers and key in SINGLE_HEADERS:
            raise BadRequest(400, f"more than one {name} header")  # which one would a proxy have checked?
        headers[key] = f"{headers[key]}{'; ' if key == 'cookie' else ', '}{value}" if key in headers else value
    else:
        raise BadRequest(431, f"more than {MAX_HEADERS} header lines")
    if method == "POST" and request.path == "/login":  # the one request with a body
        request.body = await _read_body(reader, headers)
    return request


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "transfer-encoding" in headers:
        raise BadRequest(400, "send a Content-Length, not a Transfer-Encoding")
    length = headers.get("content-length")
    if length is None:
        raise BadRequest(411, "POST needs a Content-Length")
    if not length.isdigit():
        raise BadRequest(400, "bad Content-Length")
    if int(length) > MAX_BODY:
        raise BadRequest(413, f"body larger than {MAX_BODY} bytes")
    try:
        return await reader.readexactly(int(length))
    except asyncio.IncompleteReadError as e:
        raise BadRequest(400, "connection closed mid-body") from e


async def _read_line(reader: asyncio.StreamReader, too_long: int) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as e:
        raise BadRequest(too_long, f"line longer than {LINE_LIMIT} bytes") from e
    except asyncio.IncompleteReadError as e:
        raise BadRequest(400, "connection closed mid-request") from e
    try:
        return raw.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise BadRequest(400, "request is not ASCII") from e


async def _serve_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: StatusFn, page: bytes,
    auth: StatusAuth | None,
) -> None:
    try:
        request = await asyncio.wait_for(read_request(reader), READ_DEADLINE)
    except BadRequest as e:
        await _respond(writer, e.status, TEXT, f"{e}\n".encode())
        return
    method, path = request.method, request.path
    head_only = method == "HEAD"
    if path in ("/login", "/logout") and auth is not None:
        await _login(writer, request, auth)
        return
    if method not in ("GET", "HEAD"):
        await _respond(writer, 405, TEXT, b"only GET and HEAD\n", {"Allow": "GET, HEAD"})
        return
    if path in ("/status.json", "/", "/index.html") and not _allowed(request, auth):
        if auth is None:  # open, loopback only, and the Host says it is not: DNS rebinding
            await _respond(writer, 403, TEXT, b"the open status page answers to a loopback Host only\n",
                           head_only=head_only)
        elif path == "/status.json":
            await _respond(writer, 401, "application/json", b'{"error": "authentication required"}', CHALLENGE,
                           head_only=head_only)
        else:
            await _respond(writer, 401, HTML, login_page(), {**CHALLENGE, "Content-Security-Policy": LOGIN_SECURITY},
                           head_only=head_only)
        return
    if path == "/metrics":
        try:  # a scrape that fails says why (a 500 alerts as the target down), not a closed socket
            body, code, kind = metrics.exposition(), 200, CONTENT_TYPE_LATEST
        except Exception as e:
            log.exception("web: metrics exposition failed")
            body, code, kind = f"{type(e).__name__}: {e}\n".encode(), 500, TEXT
        await _respond(writer, code, kind, body, head_only=head_only)
    elif path == "/status.json":
        try:
            body = json.dumps(_finite(status()), default=str, allow_nan=False).encode()
            code = 200
        except Exception as e:
            log.exception("web: status() failed")
            body, code = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), 500
        await _respond(writer, code, "application/json", body, head_only=head_only)
    elif path == "/healthz":
        await _respond(writer, 200, TEXT, b"ok\n", head_only=head_only)
    elif path == "/readyz":
        try:
            ready, problems = readiness(status())
        except Exception as e:
            log.exception("web: status() failed")
            ready, problems = False, [f"status unavailable: {type(e).__name__}"]
        answer = ("ready" if ready else "not ready") + (": " + "; ".join(problems) if problems else "") + "\n"
        await _respond(writer, 200 if ready else 503, TEXT, answer.encode(), head_only=head_only)
    elif path in ("/", "/index.html"):
        await _respond(writer, 200, HTML, page, {"Content-Security-Policy": PAGE_SECURITY}, head_only=head_only)
    else:
        await _respond(writer, 404, TEXT,
                       b"not found: try /, /metrics, /status.json, /healthz, /readyz\n", head_only=head_only)


def _allowed(request: Request, auth: StatusAuth | None) -> bool:
    """May this request see recipients: a session or bearer token, or the open page asked for by a loopback name."""
    if auth is None:
        host_header = request.headers.get("host", "")
        try:
            host, _ = split_hostport(host_header, 80)
        except ValueError:
            return False
        return bool(host_header) and is_loopback(host)
    return auth.bearer_ok(request.headers.get("authorization", "")) or auth.session_ok(
        request.headers.get("cookie", ""))


async def _login(writer: asyncio.StreamWriter, request: Request, auth: StatusAuth) -> None:
    """GET /login: the form; POST /login: check, then a session cookie; POST /logout: drop it."""
    cookie = f"{COOKIE}={{}}; Path=/; HttpOnly; SameSite=Strict; Max-Age={{}}"
    if request.method != "POST":
        if request.path == "/login" and request.method in ("GET", "HEAD"):
            await _respond(writer, 200, HTML, login_page(), {"Content-Security-Policy": LOGIN_SECURITY},
                           head_only=request.method == "HEAD")
        else:
            allow = "GET, HEAD, POST" if request.path == "/login" else "POST"
            await _respond(writer, 405, TEXT, f"only {allow}\n".encode(), {"Allow": allow})
        return
    if request.path == "/logout":
        for old in session_ids(request.headers.get("cookie", "")):
            auth.sessions.drop(old)
        await _respond(writer, 303, TEXT, b"logged out\n", {"Location": "/", "Set-Cookie": cookie.format("", 0)})
        return
    try:
        form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:
        await _respond(writer, 400, TEXT, b"too many form fields\n")
        return
    secret = (form.get("password") or [""])[0]
    peer = str((writer.get_extra_info("peername") or ("?",))[0])
    try:
        sid = await auth.login(secret, peer) if secret else None
    except LoginBusy:
        await _respond(writer, 429, HTML, login_page("Too many login attempts; try again in a minute."),
                       {"Content-Security-Policy": LOGIN_SECURITY, "Retry-After": "60"})
        return
    if sid is None:
        if secret:  # a checked guess: at most ~1/s get here, the gate's pace, so the log cannot be flooded
            log.warning("web: status page login failed client=%s", peer)
        await _respond(writer, 401, HTML, login_page("Wrong password or token."),
                       {**CHALLENGE, "Content-Security-Policy": LOGIN_SECURITY})
        return
    log.info("web: status page login client=%s", peer)
    await _respond(writer, 303, TEXT, b"logged in\n",
                   {"Location": "/", "Set-Cookie": cookie.format(sid, round(auth.lifetime))})


def readiness(status: dict[str, object]) -> tuple[bool, list[str]]:
    """(ready, problems): whether this instance should be sent mail now, and what is wrong.

    Not ready when the default route has no downstream up (all its mail would get 451 here)
    or the scanner sheds load. Another route without a downstream is listed but leaves the
    instance ready: its downstreams are usually shared by every MX, so steering traffic away
    would only refuse the rest of the mail too. /healthz says the process lives (for restarts);
    /readyz is for a load balancer in front of several MX hosts.
    """
    routes: dict[str, bool] = {}
    downstreams = status.get("downstreams")
    for d in downstreams if isinstance(downstreams, list) else []:
        if isinstance(d, dict):
            route = str(d.get("route", "default"))
            routes[route] = routes.get(route, False) or bool(d.get("up"))
    problems = [f"route {route} has no downstream up" for route, up in sorted(routes.items()) if not up]
    ready = routes.get("default", True)
    pressure = status.get("pressure")
    if isinstance(pressure, dict) and pressure.get("level") == "shed":
        problems.append(f"shedding load under memory pressure ({pressure.get('reason') or 'memory pressure'})")
        ready = False
    return ready, problems


def _finite(value: object) -> object:
    """NaN/inf become null: JSON has no spelling for them and one would break the whole page."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _respond(
    writer: asyncio.StreamWriter, code: int, content_type: str, body: bytes,
    extra: dict[str, str] | None = None, *, head_only: bool = False,
) -> None:
    headers = {
        "Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff", "Connection": "close", **(extra or {}),
    }
    head = f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode() + (b"" if head_only else body))
    await writer.drain()
