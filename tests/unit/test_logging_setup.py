"""Structured log lines: quoting, escaping, one message = one line, journald mode."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from queueguard import logging_setup
from queueguard.logging_setup import (
    MAX_VALUE_CHARS,
    MESSAGE_FIELDS,
    configure,
    format_fields,
    log_event,
    logfmt_value,
    on_journal,
)

_TOKEN = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s]*)')
_UNESCAPE = re.compile(r"\\(u[0-9a-f]{4}|.)")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t"}


def _unescape(e: re.Match[str]) -> str:
    code = e.group(1)
    return chr(int(code[1:], 16)) if code.startswith("u") else _SIMPLE.get(code, code)


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict reader: every byte of the line must belong to a key=value token."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        assert m, f"unparsable at {pos}: {line[pos:]!r}"
        value = m.group(2)
        if value.startswith('"'):
            value = _UNESCAPE.sub(_unescape, value[1:-1])
        out[m.group(1)] = value
        pos = m.end()
        if pos < len(line):
            assert line[pos] == " "
            pos += 1
    return out


def assert_one_line(line: str) -> None:
    assert len(line.splitlines()) == 1, repr(line)
    line.encode("utf-8")  # nothing unencodable (lone surrogates) reaches the stream


HOSTILE = [
    "plain",
    "two words",
    'say "hi"',
    "a=b",
    "back\\slash",
    "line1\nline2\r\nline3",
    "tab\there",
    "nul\x00bell\x07del\x7f",
    "Jos\u00e9 \u2603 \u65e5\u672c",
    "sep\u2028para\u2029nel\u0085",
    "bidi\u202eevil\u2066x\u200bzw\ufeff",
    b"\xffHELO\xfe".decode("utf-8", "surrogateescape"),
    "",
    '"',
    "\\",
    '\\"',
]


@pytest.mark.parametrize("text", HOSTILE)
def test_logfmt_round_trips_hostile_strings_on_one_line(text: str) -> None:
    line = format_fields(helo=text, id="q1")
    assert_one_line(line)
    assert parse_logfmt(line) == {"helo": text, "id": "q1"}


@pytest.mark.parametrize("text", HOSTILE)
def test_json_round_trips_hostile_strings_on_one_line(text: str) -> None:
    line = format_fields("json", helo=text, id="q1")
    assert_one_line(line)
    assert json.loads(line) == {"helo": text, "id": "q1"}


def test_logfmt_quoting_rules() -> None:
    assert logfmt_value("bare.value@example.org") == "bare.value@example.org"
    assert logfmt_value("Jos\u00e9") == "Jos\u00e9"  # non-ASCII stays readable
    assert logfmt_value("two words") == '"two words"'
    assert logfmt_value('say "hi"') == '"say \\"hi\\""'
    assert logfmt_value("a=b") == '"a=b"'
    assert logfmt_value("c:\\x") == '"c:\\\\x"'
    assert logfmt_value("a\nb") == '"a\\nb"'
    assert logfmt_value("a\x00b") == '"a\\u0000b"'
    assert logfmt_value("a\u202eb") == '"a\\u202eb"'  # a bidi override would reorder the line in a log viewer
    assert logfmt_value("") == '""'
    assert logfmt_value(None) == '""'


def test_logfmt_and_json_value_types() -> None:
    line = format_fields(size=1234, ok=True, bad=False, none=None, t=0.0123456789, rcpts=["a@x", "b@y"])
    assert line == 'size=1234 ok=true bad=false none="" t=0.012346 rcpts=a@x,b@y'
    data = json.loads(
        format_fields("json", size=1234, ok=True, none=None, t=0.0123456789, rcpts=["a@x", "b@y"])
    )
    assert data == {"size": 1234, "ok": True, "none": None, "t": 0.012346, "rcpts": ["a@x", "b@y"]}
    assert format_fields(rcpts=["a b@x", "c"]) == 'rcpts="a b@x,c"'
    assert format_fields(raw=b"\xff\n") == 'raw="\\\\xff\\n"'


def test_keys_are_sanitised() -> None:
    assert format_fields(**{"bad key=": 1, "": 2}) == "bad_key_=1 _=2"


def test_long_values_are_truncated_so_journald_keeps_one_line() -> None:
    line = format_fields(helo="h" * 100_000)
    assert len(line) < MAX_VALUE_CHARS + 100
    assert line.endswith(f"...(+{100_000 - MAX_VALUE_CHARS} chars)\"")
    rcpts = format_fields(rcpts=["r" * 99] * 1000)
    kept = MAX_VALUE_CHARS // 100
    assert parse_logfmt(rcpts)["rcpts"] == ",".join(["r" * 99] * kept) + f",...(+{1000 - kept} more)"
    data = json.loads(format_fields("json", rcpts=["r" * 99] * 1000))
    assert len(data["rcpts"]) == kept + 1


def test_unknown_format_and_level_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        format_fields("xml", a=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure("logfmt", "loud", stream=io.StringIO())
    with pytest.raises(ValueError, match="unknown log format"):
        configure("yaml", "info", stream=io.StringIO())  # type: ignore[arg-type]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging_setup._handler = None


def message_fields() -> dict[str, object]:
    return {
        "id": "qg-7f3a", "client": "[198.51.100.9]:50123", "helo": "mail.sender\nX-Injected: 1",
        "sender": "alice@example.org", "rcpts": ["info@example.org", "bob@example.org"], "size": 20480,
        "verdict": "tempfail", "reason": "rate limit", "rule": "flood-to-one-address",
        "hits": ["flood-to-one-address"], "downstream": None,
        "reply": "451 4.7.1 rate limit (flood-to-one-address)",
        "t_total": 0.0042, "t_scan": 0.0, "t_relay": None,
    }


def test_message_line_in_logfmt(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure("logfmt", "info", stream=out, environ={})
    log_event(logging.getLogger("queueguard.smtp"), "message", **message_fields())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    parsed = parse_logfmt(lines[0])
    assert list(parsed) == ["ts", "level", "logger", "msg", *MESSAGE_FIELDS]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["ts"])
    assert parsed["level"] == "info"
    assert parsed["logger"] == "queueguard.smtp"
    assert parsed["msg"] == "message"
    assert parsed["helo"] == "mail.sender\nX-Injected: 1"
    assert parsed["rcpts"] == "info@example.org,bob@example.org"
    assert parsed["reply"] == "451 4.7.1 rate limit (flood-to-one-address)"


def test_message_line_in_json(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure("json", "info", stream=out, environ={})
    log_event(logging.getLogger("queueguard.milter"), "message", **message_fields())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert list(data) == ["ts", "level", "logger", "msg", *MESSAGE_FIELDS]
    assert data["rcpts"] == ["info@example.org", "bob@example.org"]
    assert data["t_relay"] is None
    assert data["size"] == 20480


def test_level_filters_and_reconfigure_replaces_handler(root_logger: logging.Logger) -> None:
    first = io.StringIO()
    configure("logfmt", "warning", stream=first, environ={})
    log = logging.getLogger("queueguard.test")
    log.info("hidden")
    log_event(log, "hidden too", logging.DEBUG, a=1)
    log.warning("shown %s", "here")
    second = io.StringIO()
    configure("json", "debug", stream=second, environ={})
    log.debug("now json")
    assert first.getvalue().count("\n") == 1
    assert 'msg="shown here"' in first.getvalue()
    assert json.loads(second.getvalue())["msg"] == "now json"


def test_field_names_that_clash_with_the_line_keys_are_renamed(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure("json", "info", stream=out, environ={})
    log_event(logging.getLogger("q"), "event", level="evil", msg="other")
    data = json.loads(out.getvalue())
    assert data["level"] == "info" and data["level_"] == "evil"
    assert data["msg"] == "event" and data["msg_"] == "other"


def test_exception_stays_on_one_line(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure("logfmt", "info", stream=out, environ={})
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("q").exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    parsed = parse_logfmt(lines[0])
    assert parsed["level"] == "error"
    assert "Traceback" in parsed["exc"] and "RuntimeError: boom\nsecond line" in parsed["exc"]


def test_on_journal_matches_the_stream_inode(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("")
    st = os.stat(f)
    assert on_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, st)
    assert not on_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, st)
    assert not on_journal({}, st)
    assert not on_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, None)


def test_journal_lines_have_priority_prefix_and_no_timestamp(
    root_logger: logging.Logger, tmp_path: Path
) -> None:
    path = tmp_path / "journal-stream"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        configure("logfmt", "info", stream=stream, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log = logging.getLogger("queueguard.test")
        log.info("hello")
        log.warning("careful")
        log.error("bad")
    assert path.read_text().splitlines() == [
        "<6>level=info logger=queueguard.test msg=hello",
        "<4>level=warning logger=queueguard.test msg=careful",
        "<3>level=error logger=queueguard.test msg=bad",
    ]
