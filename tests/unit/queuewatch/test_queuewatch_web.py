"""The metrics/status listener over a real loopback socket: routes, limits and bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from queueguard.web import LINE_LIMIT, MAX_HEADER_BYTES, MAX_HEADERS, MAX_PER_CLIENT, start_web

Status = Callable[[], dict[str, object]]


async def request(port: int, raw: bytes, source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange from `source` (any loopback address: a client of its own)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@pytest.fixture
def status_value() -> dict[str, object]:
    return {"node": "mx1", "queuewatch": {"queues": [{"mta": "exim", "queue": "main", "messages": 7}]}}


@pytest.fixture
async def port(status_value: dict[str, object]) -> AsyncIterator[int]:
    def status() -> dict[str, object]:
        if status_value.get("explode"):
            raise RuntimeError("component broke")
        return status_value

    server = await start_web("127.0.0.1", 0, status)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_healthz(port: int) -> None:
    code, headers, body = await request(port, get("/healthz"))
    assert (code, body) == (200, b"ok\n")
    assert headers["Connection"] == "close"


async def test_metrics_exposition(port: int) -> None:
    from queueguard import metrics

    metrics.queue_messages.labels("exim", "web-test").set(42)
    code, headers, body = await request(port, get("/metrics"))
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=")
    assert b'queueguard_queue_messages{mta="exim",queue="web-test"} 42.0' in body


async def test_status_json(port: int) -> None:
    code, headers, body = await request(port, get("/status.json?x=1"))
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["queuewatch"]["queues"][0]["messages"] == 7


async def test_status_json_turns_nan_into_null(port: int, status_value: dict[str, object]) -> None:
    status_value["scan"] = {"sensors": {"psi": float("nan"), "mem": float("inf")}}
    code, _, body = await request(port, get("/status.json"))
    assert code == 200 and json.loads(body)["scan"]["sensors"] == {"psi": None, "mem": None}


async def test_status_failure_is_a_500_with_the_reason(port: int, status_value: dict[str, object]) -> None:
    status_value["explode"] = True
    code, _, body = await request(port, get("/status.json"))
    assert code == 500 and json.loads(body) == {"error": "RuntimeError: component broke"}


async def test_page_is_self_contained(port: int) -> None:
    code, headers, body = await request(port, get("/"))
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"/status.json" in body
    for external in (b"http://", b"https://", b"<link", b"src="):
        assert external not in body


async def test_head_has_no_body(port: int) -> None:
    code, headers, body = await request(port, get("/healthz", "HEAD"))
    assert (code, headers["Content-Length"], body) == (200, "3", b"")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (get("/nope"), 404),
        (get("/metrics", "POST"), 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET /" + b"a" * LINE_LIMIT + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * LINE_LIMIT + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
        # 99 cookie lines of 8 KB: 800 KB held per connection, before the total was bounded
        (b"GET / HTTP/1.1\r\n" + (b"Cookie: " + b"a" * 8000 + b"\r\n") * (MAX_HEADER_BYTES // 8000 + 1)
         + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", 400),  # client gave up mid-headers (half-close below)
    ],
)
async def test_bad_requests_get_a_clear_answer(port: int, raw: bytes, code: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith(f"HTTP/1.1 {code} ".encode()), data[:80]


async def test_readyz_names_what_keeps_it_from_taking_mail(port: int, status_value: dict[str, object]) -> None:
    status_value["downstreams"] = [{"route": "default", "address": "a:25", "up": False},
                                   {"route": "default", "address": "b:25", "up": True},
                                   {"route": "tickets", "address": "t:25", "up": False}]
    status_value["pressure"] = {"level": "shed", "reason": "psi_memory_some_avg10=52"}
    code, _, body = await request(port, get("/readyz"))
    assert code == 503
    assert body == (b"not ready: route tickets has no downstream up; "
                    b"shedding load under memory pressure (psi_memory_some_avg10=52)\n")
    status_value["pressure"] = {"level": "soften", "reason": ""}
    code, _, body = await request(port, get("/readyz"))  # another route down: listed, still ready
    assert (code, body) == (200, b"ready: route tickets has no downstream up\n")
    status_value["downstreams"] = [{"route": "default", "address": "a:25", "up": False}]
    code, _, body = await request(port, get("/readyz"))
    assert (code, body) == (503, b"not ready: route default has no downstream up\n")
    status_value["downstreams"] = [{"route": "default", "address": "a:25", "up": True}]
    code, _, body = await request(port, get("/readyz"))
    assert (code, body) == (200, b"ready\n")
    status_value["explode"] = True
    code, _, body = await request(port, get("/readyz"))
    assert code == 503 and body == b"not ready: status unavailable: RuntimeError\n"


async def test_one_client_cannot_hold_every_connection(port: int) -> None:
    """Connections sending nothing hold a request slot each until the read deadline: one address
    may hold MAX_PER_CLIENT of them; past that it is cut off at once, and others are still served."""
    held = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.6.1", 0))
            for _ in range(MAX_PER_CLIENT)]
    try:
        await asyncio.sleep(0.1)  # the server has taken them all (the next one is judged against them)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.6.1", 0))
        writer.write(get("/metrics"))
        with pytest.raises(ConnectionResetError):  # aborted: no answer, no lingering
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        code, _, _ = await request(port, get("/metrics"), source="127.0.6.2")
        assert code == 200
    finally:
        for _, w in held:
            w.close()


async def test_a_scrape_that_cannot_be_rendered_is_a_500_with_the_reason(port: int) -> None:
    """A label value with a lone surrogate (an undecodable file name) cannot be encoded: every
    scrape closed the connection without a word. Now it is a 500 that says why."""
    import prometheus_client

    broken = prometheus_client.Gauge("queueguard_test_broken_label", "a label that cannot be encoded", ["name"])
    try:
        broken.labels("bad\udcff").set(1)
        code, _, body = await request(port, get("/metrics"))
        assert code == 500 and b"UnicodeEncodeError" in body
    finally:
        prometheus_client.REGISTRY.unregister(broken)
    code, _, _ = await request(port, get("/metrics"))
    assert code == 200
