"""Structured log lines: quoting, escaping, one message = one line, journald mode."""

from __future__ import annotations

import enum
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queueguard import logging_setup
from queueguard.logging_setup import (
    _LOGFMT_BARE,
    _UNSAFE,
    MAX_VALUE_CHARS,
    MESSAGE_FIELDS,
    LogFormat,
    _escape_char,
    _key,
    _render,
    _scalar,
    _truncate,
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


# --- differential: the fast paths against the code they replaced --------------------------------------
#
# The reference below is logging_setup's `_scalar`, `logfmt_value` and `_render` as they were
# before the fast paths (renamed, bodies verbatim).
# The fast paths must give the same bytes for every input, however odd.

_LOGFMT_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def ref_scalar(value: object) -> object:
    """JSON-ready form of one value: numbers stay numbers, sequences lists, rest text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, bytes):
        return _truncate(value.decode("utf-8", "backslashreplace"))
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        out: list[object] = []
        used = 0
        for n, item in enumerate(items):
            plain = ref_scalar(item)
            used += len(str(plain)) + 1
            if used > MAX_VALUE_CHARS:
                out.append(f"...(+{len(items) - n} more)")
                break
            out.append(plain)
        return out
    return _truncate(str(value))


def ref_logfmt_value(value: object) -> str:
    """One logfmt value: bare when safe, else double-quoted with \\\\, \\" and controls escaped."""
    if type(value) is str and len(value) <= MAX_VALUE_CHARS and _LOGFMT_BARE.fullmatch(value):
        return value  # the common case, one regex pass
    plain = ref_scalar(value)
    if plain is None:
        text = ""
    elif plain is True or plain is False:
        text = "true" if plain else "false"
    elif isinstance(plain, list):
        text = ",".join("" if v is None else str(v) for v in plain)
    else:
        text = str(plain)
    if text and not _LOGFMT_NEEDS_QUOTES.search(text) and not _UNSAFE.search(text):
        return text
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _UNSAFE.sub(_escape_char, quoted) + '"'


def ref_render(items: Iterable[tuple[str, object]], fmt: LogFormat) -> str:
    if fmt == "json":
        text = json.dumps({_key(k): ref_scalar(v) for k, v in items}, ensure_ascii=False, separators=(",", ":"))
        # json escapes C0 controls itself; these it leaves raw.
        return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    if fmt == "logfmt":
        return " ".join(f"{_key(k)}={ref_logfmt_value(v)}" for k, v in items)
    raise ValueError(f"unknown log format {fmt!r}: use 'logfmt' or 'json'")


class Shouty(str):
    """A str whose str() is other text: the exact-type fast paths must not take it."""

    def __str__(self) -> str:
        return self.upper() + " !"


class Odd:
    """An object that prints as hostile text."""

    def __str__(self) -> str:
        return 'odd "x"=\\\n\u202e\x7f\ud800'


class Level(enum.IntEnum):
    HIGH = 3


class Ratio(float):
    pass


# Every ASCII character (the fast paths' own ground), the non-ASCII ones that matter to the
# regexes (whitespace, controls, format characters, surrogates) and some readable ones.
SPECIAL_CHARS = [chr(c) for c in range(128)] + list(
    "\x85\xa0\xad\u061c\u1680\u180e\u2000\u200a\u200b\u200f\u2028\u2029\u202e\u202f\u205f"
    "\u2066\u206f\u3000\ufeff\ufff9\ufffb\ud800\udfff\u00e9\u2603\u65e5\U0001f600\U000e0001"
)
chars = st.sampled_from(SPECIAL_CHARS) | st.characters(exclude_categories=())
texts = st.text(chars, max_size=30)
# Strings and lists of strings either side of MAX_VALUE_CHARS (the truncation edges).
long_texts = st.builds(lambda unit, n: (unit * n)[:n], st.text(chars, min_size=1, max_size=3),
                       st.integers(MAX_VALUE_CHARS - 3, MAX_VALUE_CHARS + 3))
long_lists = st.builds(
    lambda unit, size, extra: [unit * size] * (MAX_VALUE_CHARS // (size + 1) + extra),
    st.text(chars, min_size=1, max_size=1), st.integers(1, 300), st.integers(-1, 1),
)
oddities: st.SearchStrategy[object] = st.sampled_from([
    Shouty("id"), Shouty("a b"), Odd(), Level.HIGH, Ratio(0.1234567), ValueError("x\ny"), True, False, None,
    -0.0, float("nan"), float("inf"), -float("inf"), 1e-7, 1e300, 10**30, -(10**30), 0, (), [], "", frozenset(),
    bytearray(b"\xff"),
])
hashables = st.none() | st.booleans() | st.integers() | st.floats() | texts | st.binary(max_size=20)
scalars = hashables | long_texts | oddities
values = st.recursive(
    scalars | long_lists,
    lambda inner: st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple)
    | st.sets(hashables, max_size=5) | st.frozensets(hashables, max_size=5),
    max_leaves=12,
)

def test_fast_paths_agree_with_the_reference_on_every_character() -> None:
    """Each character alone, between bare ones, and every code point in runs of 64: the
    ASCII shortcuts replace the regexes only on ASCII, so this covers their decisions."""
    cases = [*SPECIAL_CHARS, *(f"a{c}b" for c in SPECIAL_CHARS)]
    cases += ["".join(map(chr, range(start, min(start + 64, sys.maxunicode + 1))))
              for start in range(0, sys.maxunicode + 1, 64)]
    for text in cases:
        assert logfmt_value(text) == ref_logfmt_value(text), repr(text)
        assert logfmt_value([text, "x"]) == ref_logfmt_value([text, "x"]), repr(text)
        for fmt in ("logfmt", "json"):
            assert _render([("k", text)], fmt) == ref_render([("k", text)], fmt), repr(text)


@settings(max_examples=500, deadline=None, database=None)
@given(values)
def test_values_render_as_the_reference_does(value: object) -> None:
    assert logfmt_value(value) == ref_logfmt_value(value)
    for fmt in ("logfmt", "json"):
        assert _render([("v", value)], fmt) == ref_render([("v", value)], fmt)
    assert json.dumps(_scalar(value)) == json.dumps(ref_scalar(value))


def test_the_message_line_renders_as_the_reference_does() -> None:
    """The line every relayed message costs, in both formats."""
    fields: list[tuple[str, object]] = [
        ("id", "4fXk2a9Qz1"), ("client", "unknown[127.0.0.1]"), ("helo", "localhost.localdomain"),
        ("sender", "<a@test.example>"), ("rcpts", ["bob@test.example"]), ("size", 4321), ("verdict", "accept"),
        ("reason", "ok"), ("rule", ""), ("hits", ["ratelimit:rcpt-flood:tempfail(shadow)"]),
        ("downstream", "127.0.0.1:2525"), ("reply", "250 2.0.0 Ok: queued as 123"),
        ("t_total", 0.0123), ("t_scan", 0.0), ("t_relay", 0.0021),
    ]
    for fmt in ("logfmt", "json"):
        assert _render(fields, fmt) == ref_render(fields, fmt)
