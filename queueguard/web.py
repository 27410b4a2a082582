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
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import math
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

from queueguard import metrics

log = logging.getLogger("queueguard.web")

LINE_LIMIT = 8192
MAX_HEADERS = 100
READ_DEADLINE = 10.0
REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}
PAGE_SECURITY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

StatusFn = Callable[[], dict[str, object]]


class BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def status_page() -> bytes:
    return importlib.resources.files("queueguard").joinpath("static/status.html").read_bytes()


async def start_web(host: str, port: int, status: StatusFn, *,
                    reuse_port: bool = False) -> asyncio.base_events.Server:
    """Listen on host:port (port 0 picks one: read it from server.sockets) and serve until closed;
    `reuse_port` when several workers share the port."""
    page = status_page()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_one(reader, writer, status, page)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("web: request failed")
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    return await asyncio.start_server(handle, host, port, limit=LINE_LIMIT, reuse_port=reuse_port)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Request line and headers within the limits -> (method, path); BadRequest otherwise."""
    line = await _read_line(reader, 414)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1")
    for _ in range(MAX_HEADERS + 1):
        if not await _read_line(reader, 431):
            return method, target.split("?", 1)[0]
    raise BadRequest(431, f"more than {MAX_HEADERS} header lines")


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
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: StatusFn, page: bytes
) -> None:
    try:
        method, path = await asyncio.wait_for(read_request(reader), READ_DEADLINE)
    except BadRequest as e:
        await _respond(writer, e.status, "text/plain; charset=utf-8", f"{e}\n".encode())
        return
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        await _respond(writer, 405, "text/plain; charset=utf-8", b"only GET and HEAD\n", {"Allow": "GET, HEAD"})
        return
    if path == "/metrics":
        await _respond(writer, 200, CONTENT_TYPE_LATEST, metrics.exposition(), head_only=head_only)
    elif path == "/status.json":
        try:
            body = json.dumps(_finite(status()), default=str, allow_nan=False).encode()
            code = 200
        except Exception as e:
            log.exception("web: status() failed")
            body, code = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), 500
        await _respond(writer, code, "application/json", body, head_only=head_only)
    elif path == "/healthz":
        await _respond(writer, 200, "text/plain; charset=utf-8", b"ok\n", head_only=head_only)
    elif path == "/readyz":
        try:
            ready, problems = readiness(status())
        except Exception as e:
            log.exception("web: status() failed")
            ready, problems = False, [f"status unavailable: {type(e).__name__}"]
        answer = ("ready" if ready else "not ready") + (": " + "; ".join(problems) if problems else "") + "\n"
        await _respond(writer, 200 if ready else 503, "text/plain; charset=utf-8", answer.encode(),
                       head_only=head_only)
    elif path in ("/", "/index.html"):
        await _respond(writer, 200, "text/html; charset=utf-8", page,
                       {"Content-Security-Policy": PAGE_SECURITY}, head_only=head_only)
    else:
        await _respond(writer, 404, "text/plain; charset=utf-8",
                       b"not found: try /, /metrics, /status.json, /healthz, /readyz\n", head_only=head_only)


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
