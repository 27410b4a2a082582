"""Structured log lines: quoting, escaping, one message = one line, journald mode."""

from __future__ import annotations

import calendar
import enum
import io
import json
import logging
import os
import re
import sys
import time
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queueguard import logging_setup
from queueguard.logging_setup import (
    _LOGFMT_BARE,
    _SYSLOG_PRIORITY,
    _UNSAFE,
    FIELDS_ATTR,
    MAX_VALUE_CHARS,
    MESSAGE_FIELDS,
    LogFormat,
    StructuredFormatter,
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


# --- differential: whole lines against the formatter they replaced ------------------------------------
#
# `RefStructuredFormatter` is StructuredFormatter as it was before it built lines straight from the
# record (renamed, body verbatim but for `ref_render` in place of `_render`). Every record must come
# out as the same bytes, whatever its level, logger, message, arguments, fields and exception.


class RefStructuredFormatter(logging.Formatter):
    """ts, level, logger, msg, then the record's fields (and exc), on one line."""

    def __init__(self, fmt: LogFormat = "logfmt", journal: bool = False) -> None:
        super().__init__()
        if fmt not in ("logfmt", "json"):
            raise ValueError(f"unknown log format {fmt!r}: use 'logfmt' or 'json'")
        self.fmt: LogFormat = fmt
        self.journal = journal
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        items: list[tuple[str, object]] = []
        if not self.journal:
            second = int(record.created)
            if second != self._second:  # strftime once a second, not once a line
                self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            items.append(("ts", f"{self._stamp}.{int(record.msecs):03d}Z"))
        items += [("level", record.levelname.lower()), ("logger", record.name), ("msg", record.getMessage())]
        extra = getattr(record, FIELDS_ATTR, None)
        if isinstance(extra, Mapping):
            taken = {k for k, _ in items} | {"exc"}
            items += [(f"{k}_" if k in taken else str(k), v) for k, v in extra.items()]
        if record.exc_info:
            items.append(("exc", self.formatException(record.exc_info)))
        line = ref_render(items, self.fmt)
        if self.journal:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


FORMATS: list[tuple[LogFormat, bool]] = [("logfmt", False), ("logfmt", True), ("json", False), ("json", True)]
# One formatter per kind for all examples, as a process has: what it keeps from one line must not
# leak into the next.
FORMATTERS = {kind: StructuredFormatter(*kind) for kind in FORMATS}
REFERENCES = {kind: RefStructuredFormatter(*kind) for kind in FORMATS}


def exc_info_of(text: str) -> logging._SysExcInfoType:
    try:
        raise ValueError(text)
    except ValueError:
        return sys.exc_info()


def make_record(
    name: str, level: int, msg: object, args: tuple[object, ...], fields: object, exc: str | None, created: float
) -> logging.LogRecord:
    exc_info = exc_info_of(exc) if exc is not None else None
    record = logging.LogRecord(name, level, "(unknown file)", 0, msg, args, exc_info)
    record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0  # as LogRecord sets them
    if fields is not None:
        setattr(record, FIELDS_ATTR, fields)
    return record


def assert_formats_as_the_reference(record: logging.LogRecord) -> None:
    for kind in FORMATS:
        line = FORMATTERS[kind].format(record)
        assert line == REFERENCES[kind].format(record), kind
        assert_one_line(line)


# Names the line's own keys take (clash renaming), keys that sanitise alike, and keys that are not
# exact strs but equal or hash like ones a line may already have kept.
field_names = st.sampled_from([
    "ts", "level", "logger", "msg", "exc", "level_", "msg=", "id", "", "bad key=", "rcpts",
    Shouty("id"), Shouty("level"), 1, True, 1.5, None, b"id", Level.HIGH,
]) | texts
logger_names = texts | st.sampled_from(
    ["queueguard.message", "queueguard.ratelimit", "root", Shouty("queueguard.message")]
)
levels = st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL, 25, 5, 0])
messages: st.SearchStrategy[tuple[object, tuple[object, ...]]] = st.one_of(
    texts.map(lambda t: (t, ())),  # no args: '%' stays as written
    st.tuples(texts, values).map(lambda p: (p[0].replace("%", "%%") + " %s=%r", (p[1], p[0]))),
    st.tuples(texts, st.integers()).map(lambda p: ("%(who)s sent %(n)d", ({"who": p[0], "n": p[1]},))),
    oddities.map(lambda v: (v, ())),
)
all_fields = st.one_of(
    st.none(),
    st.dictionaries(field_names, values, max_size=6),
    st.just(types.MappingProxyType({"id": "q1", "level": "evil"})),
    st.just(["not", "a", "mapping"]),
)
# Seconds either side of a change of second, and far apart, so kept timestamps go stale.
moments = st.sampled_from([1796668904.373, 1796668904.9995, 1796668905.0, 0.0, 951782400.5]) | st.floats(0, 4e9)


@settings(max_examples=400, deadline=None, database=None)
@given(logger_names, levels, messages, all_fields, st.none() | texts, moments)
def test_records_format_as_the_reference_does(
    name: str, level: int, message: tuple[object, tuple[object, ...]], fields: object, exc: str | None,
    created: float,
) -> None:
    msg, args = message
    assert_formats_as_the_reference(make_record(name, level, msg, args, fields, exc, created))


def test_kept_renderings_are_not_given_to_lookalikes() -> None:
    """A key, logger name or level name kept for an exact str is not used for a str subclass
    equal to it, nor for 1 after True: they print otherwise."""
    for fields in ({"id": 1, "level": 2}, {Shouty("id"): 1, Shouty("level"): 2}, {True: 1}, {1: 1}, {1.0: 1}):
        for name in ("queueguard.message", Shouty("queueguard.message")):
            record = make_record(name, logging.INFO, "message", (), fields, None, 1796668904.373)
            assert_formats_as_the_reference(record)
            record.levelname = Shouty(record.levelname)
            assert_formats_as_the_reference(record)


def test_the_timestamp_follows_the_second() -> None:
    """Forward, back and far: a kept second is never shown for another."""
    for created in (1796668904.373, 1796668904.9995, 1796668905.0, 1796668904.5, 0.0, 1796668904.001):
        assert_formats_as_the_reference(make_record("q", logging.INFO, "tick", (), None, None, created))


def test_the_two_lines_every_message_costs() -> None:
    """The message line and the rate-limit line, byte for byte as written before."""
    created = calendar.timegm((2026, 12, 7, 18, 41, 44)) + 0.3735
    ratelimit = make_record(
        "queueguard.ratelimit", logging.INFO, "ratelimit %s%s %s rcpt=%s %s txn=%s",
        ("flood-to-one-address", " (shadow) would", "tempfail", "bob@test.example",
         "key=bob@test.example|test.example retry_after=39847s", "1a251cfd3b5befeadb7"), None, None, created,
    )
    message = make_record("queueguard.message", logging.INFO, "message", (), {
        "id": "1a251cfd3b5befeadb7", "client": "unknown[127.0.0.1]", "helo": "vm", "sender": "<a@test.example>",
        "rcpts": ["bob@test.example"], "size": 4226, "verdict": "accept", "reason": "ok", "rule": "",
        "hits": ["ratelimit:flood-to-one-address(shadow)"], "downstream": "", "reply": "250 2.0.0 Ok",
        "t_total": 0.0003, "t_scan": 0.0, "t_relay": 0.0,
    }, None, created)
    assert FORMATTERS["logfmt", False].format(ratelimit) == (
        'ts=2026-12-07T18:41:44.373Z level=info logger=queueguard.ratelimit msg="ratelimit flood-to-one-address'
        ' (shadow) would tempfail rcpt=bob@test.example key=bob@test.example|test.example retry_after=39847s'
        ' txn=1a251cfd3b5befeadb7"'
    )
    assert FORMATTERS["logfmt", False].format(message) == (
        "ts=2026-12-07T18:41:44.373Z level=info logger=queueguard.message msg=message id=1a251cfd3b5befeadb7"
        ' client=unknown[127.0.0.1] helo=vm sender=<a@test.example> rcpts=bob@test.example size=4226'
        ' verdict=accept reason=ok rule="" hits=ratelimit:flood-to-one-address(shadow) downstream=""'
        ' reply="250 2.0.0 Ok" t_total=0.0003 t_scan=0.0 t_relay=0.0'
    )
    for record in (ratelimit, message):
        assert_formats_as_the_reference(record)


class Keep(logging.Handler):
    """Keeps the records it is given, to format them again with the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("journal", [False, True])
@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_a_file_gets_the_reference_lines(
    root_logger: logging.Logger, tmp_path: Path, fmt: LogFormat, journal: bool
) -> None:
    """Through logging and configure's handler into a real file: fields, %-args, exceptions,
    non-ASCII and control characters, each record one line as the reference writes it."""
    path = tmp_path / "log"
    keep = Keep()
    with path.open("w", encoding="utf-8") as stream:
        st_ = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino}"} if journal else {}
        configure(fmt, "debug", stream=stream, environ=environ)
        root_logger.addHandler(keep)
        msglog, other = logging.getLogger("queueguard.message"), logging.getLogger("queueguard.t\u00e9st\n\u202e")
        log_event(msglog, "message", **message_fields())
        log_event(msglog, "message", **{**message_fields(), "helo": "Jos\u00e9\x1b[2J\u2028", "msg": "x", "ts": 1})
        other.warning("ratelimit %s%s rcpt=%s", "rule", " (shadow) would", "b\u00f6b@x\r\n\x00")
        other.info("%(who)s sent %(n)d", {"who": "a b", "n": 3})
        other.debug("100% plain\t")
        log_event(other, "odd", logging.ERROR, level="evil", exc=ValueError("v"), rcpts=("a", "b c"), raw=b"\xff")
        try:
            raise RuntimeError("boom\n\u202esecond line \ud800")
        except RuntimeError:
            other.exception("failed %s", "here")
            log_event(msglog, "failed", logging.CRITICAL, id="q1")
            msglog.error("with fields too", exc_info=True, extra={FIELDS_ATTR: {"id": "q2"}})
    reference = RefStructuredFormatter(fmt, journal)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines.pop() == ""
    assert len(keep.records) == 9
    assert lines == [reference.format(r) for r in keep.records]
