"""The status page in headless Chromium, served by start_web with live numbers from a real QueueWatch.

Spools are real directories (Exim split spool, Postfix hashed queues, Mailman .pck files) and a real
process poses as Mailman's out runner. Chromium loads `/`, the page fetches /status.json and renders;
`--dump-dom` gives the DOM after that fetch (`--virtual-time-budget` lets the page's timers run), and a
screenshot is kept in tests/artifacts/status-page.png. With a password in the settings, a Browser
driven over Chromium's DevTools pipe types it into the login form (tests/artifacts/status-login.png).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import http.client
import json
import os
import select
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from queueguard.queuewatch.service import QueueWatch
from queueguard.settings import QueueWatchSettings
from queueguard.web import start_web
from queueguard.webauth import hash_password
from tests.unit.queuewatch.spoolbuild import exim_message, mailman_message, postfix_long, postfix_message

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium missing: ./setup.sh --no-run installs Debian's chromium"
    return path


class Rows(HTMLParser):
    """data-row -> {data-k: text} for every table row, plus element ids -> text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}
        self.body_attrs: dict[str, str | None] = {}
        self._row: str | None = None
        self._key: str | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body_attrs = a
        if tag == "tr" and a.get("data-row"):
            self._row = a["data-row"]
            self.rows[self._row or ""] = {}
        if tag == "td" and self._row:
            self._key = a.get("data-k")
        if a.get("id"):
            self._id = a["id"]
            self.ids[self._id or ""] = ""

    def handle_data(self, data: str) -> None:
        if self._row and self._key:
            self.rows[self._row][self._key] = self.rows[self._row].get(self._key, "") + data
        if self._id:
            self.ids[self._id] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._key = None
        if tag == "tr":
            self._row = None
        self._id = None


@pytest.fixture
def out_runner(tmp_path: Path) -> Iterator[None]:
    script = tmp_path / "mailman" / "bin" / "runner"
    script.parent.mkdir(parents=True)
    script.write_text("import time\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script), "-C", "mailman.cfg", "--runner=out:0:1"])
    deadline = time.monotonic() + 10
    while b"--runner" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    yield
    proc.kill()
    proc.wait()


def build_spools(root: Path) -> QueueWatchSettings:
    now = int(time.time())
    exim = root / "exim"
    for i in range(1234):
        exim_message(exim, now - 5 * i, i, split=True, frozen=i < 3)  # oldest: 6165 s, shown as 103m
    pf = root / "postfix"
    for q in ("incoming", "active", "deferred", "hold"):
        (pf / q).mkdir(parents=True)
    for i in range(42):
        postfix_message(pf, "deferred", postfix_long(now - 3 * 86400 + i, i))
    mm = root / "mailman" / "queue"
    for i in range(17):
        mailman_message(mm, "out", now - 600.0 + i, i)
    (mm / "in").mkdir()
    return QueueWatchSettings(exim_spool=exim, postfix_queue=pf, mailman_queue=mm,
                              mailman_runners=["out", "in"], filesystems=[root])


async def run_chromium(*args: str) -> str:
    profile = tempfile.mkdtemp(prefix="qg-chromium-")
    try:
        proc = await asyncio.create_subprocess_exec(
            chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return out.decode()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Browser:
    """Headless Chromium (same binary and flags as run_chromium) driven over its DevTools pipe, for
    what --dump-dom cannot do: type a password, press Enter, read cookies.

    --remote-debugging-pipe: JSON messages, each ended by a NUL byte, read from fd 3 and written
    to fd 4 of the browser. One page, attached with a flat session.
    """

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="qg-chromium-")
        pipes = os.pipe(), os.pipe()
        # the browser's ends, moved to 10 and up so that bash's 3<& and 4>& cannot clobber them (bash, not
        # sh: dash takes one-digit fds only)
        to_browser, from_browser = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (pipes[0][0], pipes[1][1]))
        self._out, self._in = pipes[0][1], pipes[1][0]
        os.close(pipes[0][0])
        os.close(pipes[1][1])
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-', "bash",
             chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
             "about:blank"],
            pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", page=True)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer on its DevTools pipe")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed its DevTools pipe")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None, *, page: bool = False,
             timeout: float = 30) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))
        self.events.clear()

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         page=True)["result"].get("value")

    def html(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def loads(self, action: Any) -> None:
        """Run action() and wait for the page it leads to to finish loading."""
        self.events.clear()
        action()
        self.wait_event("Page.loadEventFired")

    def goto(self, url: str) -> None:
        self.loads(lambda: self.call("Page.navigate", {"url": url}, page=True))

    def type_and_enter(self, element_id: str, text: str) -> None:
        """Focus the field, type as a keyboard would, press Enter: the form submits itself."""
        assert self.evaluate(f"document.getElementById({json.dumps(element_id)}).focus(), "
                             f"document.activeElement.id") == element_id
        self.call("Input.insertText", {"text": text}, page=True)
        enter = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        self.loads(lambda: (self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **enter}, page=True),
                            self.call("Input.dispatchKeyEvent", {"type": "keyUp", **enter}, page=True)))

    def wait_for(self, expression: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"not true within {timeout}s: {expression}"
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", page=True)["data"]))

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._in)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)


async def test_status_page_renders_live_numbers(tmp_path: Path, out_runner: None) -> None:
    watch = QueueWatch(build_spools(tmp_path))
    await watch.collect()

    def status() -> dict[str, object]:
        return {
            "node": "mx-test",
            "time": time.time(),
            "queuewatch": watch.snapshot(),
            "pressure": {"level": "soften", "reason": "psi some avg10 12.5 >= 10",
                         "sensors": {"psi_some_avg10": 12.5}},
            "scan": {"gate": {"in_flight": 3, "waiting": 2, "limit": 4}, "clamd_up": True, "breaker": "closed",
                     "clamd_stats": {"queue": 1}},
            "ratelimit": {"top": [{"key": "info@example.org", "rule": "flood-to-one-address", "count": 311}]},
            "bursts": {"active": [{"rule": "same-message-wave", "fingerprint": "body:9f2c", "count": 57,
                                   "since": time.time() - 300}]},
            "quarantine": {"messages": 8, "bytes": 123456, "by_rule": {"mini-cooper-wave": 8}},
            "downstreams": [{"route": "default", "address": "127.0.0.1:2525", "up": True}],
        }

    server = await start_web("127.0.0.1", 0, status)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        dom = await run_chromium("--virtual-time-budget=5000", "--dump-dom", url)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        await run_chromium("--virtual-time-budget=5000", "--window-size=1280,1700", f"--screenshot={shot}", url)
    finally:
        server.close()
        await server.wait_closed()

    page = Rows()
    page.feed(dom)
    assert page.body_attrs.get("data-loaded") == "yes", "the page's fetch of /status.json did not render"
    assert page.ids["node"] == "mx-test"
    assert page.rows["exim/main"] == {"messages": "1,234", "oldest": "103m", "frozen": "3", "departed": "0",
                                      "flow": "n/a"}
    assert page.rows["postfix/deferred"]["messages"] == "42"
    assert page.rows["postfix/deferred"]["oldest"] == "3.0d"
    assert page.rows["mailman/out"]["messages"] == "17"
    assert page.rows["mailman/out"]["oldest"] == "10m"
    assert page.rows["mailman runner out"]["state"] == "running"
    assert page.rows["mailman runner in"]["state"] == "MISSING"
    assert page.rows[str(tmp_path)]["free_pct"].endswith("%")
    assert page.ids["pressure-level"] == "soften"
    assert page.ids["scan-in-flight"] == "3" and page.ids["scan-waiting"] == "2"
    assert page.ids["quarantine-messages"] == "8"
    assert "info@example.org" in dom and "same-message-wave" in dom
    assert page.rows["127.0.0.1:2525"]["relay"] == "up"
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_status_page_shows_na_for_missing_keys() -> None:
    server = await start_web("127.0.0.1", 0, lambda: {"queuewatch": {"queues": [{"mta": "exim", "queue": "main"}]}})
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        dom = await run_chromium("--virtual-time-budget=5000", "--dump-dom", url)
    finally:
        server.close()
        await server.wait_closed()
    page = Rows()
    page.feed(dom)
    assert page.body_attrs.get("data-loaded") == "yes"
    assert page.ids["pressure-level"] == "n/a" and page.ids["quarantine-messages"] == "n/a"
    assert page.rows["exim/main"]["messages"] == "n/a" and page.rows["exim/main"]["oldest"] == "n/a"


POLICY_FOR_LIVE_PAGE = """
ratelimits:
  - name: flood-to-one-address
    key: recipient
    rate: 2/1h
    burst: 2
    action: tempfail
bursts:
  - name: same-message-wave
    fingerprint: subject
    threshold: 3 in 10m
    action: quarantine
"""


def flood_and_wave(c: smtplib.SMTP, recipient: str = "info@example.org", wave: str = "user") -> int:
    """Under POLICY_FOR_LIVE_PAGE: five messages to `recipient` (three deferred) and a wave of six with
    one subject (quarantined from the third on); returns how many RCPTs were deferred."""
    deferred = 0
    for i in range(5):
        c.mail("a@client.example")
        if c.rcpt(recipient)[0] == 250:
            c.data(b"Subject: hello\r\n\r\nmessage %d\r\n" % i)
        else:
            deferred += 1
            c.rset()
    for i in range(6):
        c.sendmail(f"s{i}@client.example", [f"{wave}{i}@example.org"],
                   b"Subject: Win a MINI Cooper now\r\n\r\nclick here %d\r\n" % i)
    return deferred


async def test_status_page_of_a_running_guard_shows_its_own_live_numbers() -> None:
    """A real `queueguard serve`: a flood to one recipient and a wave are sent through it; its own
    status page (metrics listener, `/`) then shows the rate-limited recipient, the active burst and
    the quarantine count, as a responder without Grafana would see them."""
    from queueguard.harness.guard import Guard
    from queueguard.harness.sink import RecordingSink

    with RecordingSink() as sink, Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]},
                                        {"policy.yaml": POLICY_FOR_LIVE_PAGE}) as g:
        def send() -> None:
            with g.smtp() as c:
                flood_and_wave(c)

        await asyncio.to_thread(send)
        dom = await run_chromium("--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{g.metrics_port}/")
    page = Rows()
    page.feed(dom)
    assert page.body_attrs.get("data-loaded") == "yes"
    assert "info@example.org" in dom and "flood-to-one-address" in dom
    assert "same-message-wave" in dom
    assert int(page.ids["quarantine-messages"]) >= 3
    assert page.ids["pressure-level"] in ("normal", "soften", "shed")  # the governor runs without clamd


async def test_status_page_shows_a_refused_policy_reload() -> None:
    """An admin's broken edit is refused and the last good policy keeps running: the page says so,
    with the file:line error, so the responder without shell access sees why the edit did not take."""
    from queueguard.harness.guard import Guard

    with Guard(policies={"policy.yaml": "lists: {}\n"}) as g:
        (g.policy_dir / "policy.yaml").write_text("ratelimits:\n  - name: x\n    key: recipient\n    rate: 60/10x\n")
        g.signal(signal.SIGHUP)
        for _ in range(50):
            if "reload" in g.log() and "policy error" in g.log():
                break
            await asyncio.sleep(0.1)
        dom = await run_chromium("--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{g.metrics_port}/")
    page = Rows()
    page.feed(dom)
    assert page.body_attrs.get("data-loaded") == "yes"
    assert "reload refused: " in dom and "policy.yaml:4: ratelimits[0].rate: bad rate" in dom
    assert page.ids["policy-rules"] == "0 lists, 0 ratelimits, 0 bursts, 0 patterns"


def test_status_page_with_a_password_shows_nothing_before_login() -> None:
    """A real `queueguard serve` with status.password_hash after a flood and a wave. Without a login
    Chromium gets the login form and /status.json a 401, with none of the recipients or rules; a
    wrong password changes nothing; the right one, typed into the form, shows the live page; the
    session cookie is HttpOnly and SameSite=Strict; a session ended elsewhere takes the data off the
    screen at the next refresh; logging out brings the form back."""
    from queueguard.harness.guard import Guard
    from queueguard.harness.sink import RecordingSink

    password = "correct horse battery staple"
    secrets_of_the_page = ("info@example.org", "user0@example.org", "flood-to-one-address", "same-message-wave")
    with RecordingSink() as sink, Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
                                         "status": {"password_hash": hash_password(password)}},
                                        {"policy.yaml": POLICY_FOR_LIVE_PAGE}) as g:
        with g.smtp() as c:
            assert flood_and_wave(c) == 3
        base = f"http://127.0.0.1:{g.metrics_port}"

        dom = asyncio.run(run_chromium("--virtual-time-budget=5000", "--dump-dom", f"{base}/"))
        page = Rows()
        page.feed(dom)
        assert "login" in page.ids and "password" in page.ids and "ratelimited" not in page.ids
        assert page.body_attrs.get("data-loaded") is None
        assert not [s for s in secrets_of_the_page if s in dom]
        dom = asyncio.run(run_chromium("--virtual-time-budget=5000", "--dump-dom", f"{base}/status.json"))
        assert "authentication required" in dom and not [s for s in secrets_of_the_page if s in dom]

        with Browser() as browser:
            browser.goto(f"{base}/")
            ARTIFACTS.mkdir(exist_ok=True)
            browser.screenshot(ARTIFACTS / "status-login.png")
            browser.type_and_enter("password", "correct horse battery stapler")
            html = browser.html()
            assert "Wrong password or token." in html and not [s for s in secrets_of_the_page if s in html]
            assert browser.call("Storage.getCookies")["cookies"] == []

            browser.type_and_enter("password", password)
            browser.wait_for("document.body.dataset.loaded === 'yes'")
            html = browser.html()
            page = Rows()
            page.feed(html)
            assert "info@example.org" in html and "flood-to-one-address" in html and "same-message-wave" in html
            assert int(page.ids["quarantine-messages"]) >= 3
            assert browser.evaluate("getComputedStyle(document.getElementById('logout')).display") != "none"
            (cookie,) = browser.call("Storage.getCookies")["cookies"]
            assert cookie["name"] == "qg_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert browser.evaluate("document.cookie") == ""  # the page's own script cannot read it

            # the session ends elsewhere (here: a logout with the same cookie): the page's next refresh
            # gets 401 and swaps itself for the login form, so no stale data stays on screen
            other = http.client.HTTPConnection("127.0.0.1", g.metrics_port, timeout=5)
            other.request("POST", "/logout", headers={"Cookie": f"qg_session={cookie['value']}"})
            assert other.getresponse().status == 303
            other.close()
            browser.wait_for("document.getElementById('login') !== null", timeout=15)
            html = browser.html()
            assert not [s for s in secrets_of_the_page if s in html]

            browser.type_and_enter("password", password)
            browser.wait_for("document.body.dataset.loaded === 'yes'")
            browser.loads(lambda: browser.evaluate("document.querySelector('#logout button').click()"))
            html = browser.html()
            assert 'id="login"' in html and not [s for s in secrets_of_the_page if s in html]
            browser.goto(f"{base}/status.json")
            assert "authentication required" in browser.html()
