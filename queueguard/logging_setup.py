"""Structured logging: one line per event, logfmt or JSON, journald-friendly.

Admins grep and ship these lines, so every event is exactly one line whatever
its values hold (newlines, quotes, non-ASCII, undecodable bytes from a hostile
HELO), and every front end logs a message with the same fields
(`MESSAGE_FIELDS`). Message bodies are never logged: only envelope facts,
verdicts and timings.

Under systemd (JOURNAL_STREAM names our stderr) lines carry no timestamp —
journald stamps them — and start with a `<N>` syslog priority so
`journalctl -p warning` works.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Literal, TextIO

LogFormat = Literal["logfmt", "json"]

# The one-line-per-message log: these fields, in this order, from every front end.
MESSAGE_FIELDS = (
    "id", "client", "helo", "sender", "rcpts", "size", "verdict", "reason", "rule", "hits",
    "downstream", "reply", "t_total", "t_scan", "t_relay",
)

# Keeps a line well under journald's LineMax (48 KiB), past which it splits lines.
MAX_VALUE_CHARS = 4096

# Attribute on a LogRecord that carries structured fields (see `log_event`).
FIELDS_ATTR = "qg_fields"

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
}

_CONTROLS = ("\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
             "\ufff9-\ufffb\ud800-\udfff")
"""Characters a reader or a terminal acts on instead of showing: C0/C1 controls and DEL (escape
sequences), line and paragraph separators, bidi overrides and isolates (they reorder what
follows on screen), zero-width and other invisible format characters, lone surrogates."""
_UNSAFE = re.compile(f"[{_CONTROLS}]")
_LOGFMT_BARE = re.compile(f'[^\\s"=\\\\{_CONTROLS}]+')
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
_keys: dict[str, str] = {}
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    return _SHORT_ESCAPES.get(ch) or f"\\u{ord(ch):04x}"


def visible(text: str) -> str:
    """`text` as one line a terminal shows as written: every character it would act on (an
    escape sequence, a line break, a bidi override) appears as its escape, e.g. `\\u001b`."""
    return _UNSAFE.sub(_escape_char, text)


def _truncate(text: str) -> str:
    if len(text) <= MAX_VALUE_CHARS:
        return text
    return f"{text[:MAX_VALUE_CHARS]}...(+{len(text) - MAX_VALUE_CHARS} chars)"


def _plain_strs(items: list[object] | tuple[object, ...]) -> bool:
    """True when `_scalar` keeps `items` as they are: exact strs (a subclass may override
    `__str__`) that fit in MAX_VALUE_CHARS together, so none is truncated or dropped."""
    used = 0
    for item in items:
        if type(item) is not str:
            return False
        used += len(item) + 1
    return used <= MAX_VALUE_CHARS


def _scalar(value: object) -> object:
    """JSON-ready form of one value: numbers stay numbers, sequences lists, rest text."""
    if type(value) is str:  # the common types first, by exact type, short of the general path
        return value if len(value) <= MAX_VALUE_CHARS else _truncate(value)
    if type(value) is float:
        return round(value, 6)
    if type(value) is int:
        return value
    if (type(value) is list or type(value) is tuple) and _plain_strs(value):
        return list(value)
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
            plain = _scalar(item)
            used += len(str(plain)) + 1
            if used > MAX_VALUE_CHARS:
                out.append(f"...(+{len(items) - n} more)")
                break
            out.append(plain)
        return out
    return _truncate(str(value))


def logfmt_value(value: object) -> str:
    """One logfmt value: bare when safe, else double-quoted with \\\\, \\" and controls escaped.

    Exact str, list/tuple of short strs, float and int skip `_scalar`: what it would return
    for them is known. Ints and floats print as digits, sign, '.', 'e', 'inf' or 'nan', all bare.
    """
    if type(value) is str:
        text = value if len(value) <= MAX_VALUE_CHARS else _truncate(value)
    elif (type(value) is list or type(value) is tuple) and _plain_strs(value):
        text = ",".join(value)
    elif type(value) is float:
        return str(round(value, 6))
    elif type(value) is int:
        return str(value)
    else:
        plain = _scalar(value)
        if plain is None:
            text = ""
        elif plain is True or plain is False:
            text = "true" if plain else "false"
        elif isinstance(plain, list):
            text = ",".join("" if v is None else str(v) for v in plain)
        else:
            text = str(plain)
    # The decision of `_LOGFMT_BARE.fullmatch(text)`, faster for ASCII (`isascii` reads a flag):
    # there the pattern refuses exactly the non-printable characters, space, '"', '=' and '\\'.
    if text.isascii():
        if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text \
                and "\\" not in text:
            return text
    elif _LOGFMT_BARE.fullmatch(text):
        return text
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    if quoted.isascii() and quoted.isprintable():  # no control to escape: ASCII ones are the unprintable
        return f'"{quoted}"'
    return '"' + _UNSAFE.sub(_escape_char, quoted) + '"'


def _key(name: str) -> str:
    key = _keys.get(name)
    if key is None:
        key = _KEY_CHARS.sub("_", name) or "_"
        if len(_keys) < 1024:  # field names are few; a bound in case a caller makes them up
            _keys[name] = key
    return key


def format_fields(fmt: LogFormat = "logfmt", /, **fields: object) -> str:
    """Render fields as one logfmt or JSON line (no newline), in the order given."""
    return _render(fields.items(), fmt)


def _render(items: Iterable[tuple[str, object]], fmt: LogFormat) -> str:
    if fmt == "json":
        return _json_line({_key(k): _scalar(v) for k, v in items})
    if fmt == "logfmt":
        return " ".join(f"{_key(k)}={logfmt_value(v)}" for k, v in items)
    raise ValueError(f"unknown log format {fmt!r}: use 'logfmt' or 'json'")


_json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""What json.dumps(..., ensure_ascii=False, separators=(",", ":")) does, without building an
encoder per line."""


def _json_line(data: dict[str, object]) -> str:
    """`data` as one JSON line, with the controls json leaves raw escaped as well.

    json escapes C0 controls itself, so ASCII output (`isascii` reads a flag) can only hold
    DEL; other text is searched for every control.
    """
    text = _json_encode(data)
    if text.isascii() and "\x7f" not in text:
        return text
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: object) -> None:
    """Log `event` with structured fields, e.g. log_event(log, "message", id=..., verdict=...)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={FIELDS_ATTR: fields})


def on_journal(environ: Mapping[str, str], stream_stat: os.stat_result | None) -> bool:
    """True when JOURNAL_STREAM ('dev:inode') names the stream we write to.

    Checking the inode, not just the variable, matters: a child whose stderr
    was redirected to a file inherits JOURNAL_STREAM but is not on the journal.
    """
    value = environ.get("JOURNAL_STREAM", "")
    if not value or stream_stat is None:
        return False
    dev, _, ino = value.partition(":")
    return dev == str(stream_stat.st_dev) and ino == str(stream_stat.st_ino)


class StructuredFormatter(logging.Formatter):
    """ts, level, logger, msg, then the record's fields (and exc), on one line.

    The line `_render` would make of those items, built straight from the record: what
    repeats from line to line (a field's key, clash renaming included; the level and logger
    part; the timestamp's second) is rendered once and kept. `fmt` and `journal` are read at
    construction: the kept renderings depend on them.
    """

    def __init__(self, fmt: LogFormat = "logfmt", journal: bool = False) -> None:
        super().__init__()
        if fmt not in ("logfmt", "json"):
            raise ValueError(f"unknown log format {fmt!r}: use 'logfmt' or 'json'")
        self.fmt: LogFormat = fmt
        self.journal = journal
        own = ("level", "logger", "msg", "exc")
        self._taken = frozenset(own if journal else ("ts", *own))  # a field by one of these names gets a '_'
        self._stamp = (-1, "")  # one tuple, so a thread never reads one second's stamp with another's
        # Renderings keyed by exact strs only: a str subclass equal to a cached name may print otherwise.
        self._heads: dict[tuple[str, str], str] = {}  # "level=info logger=name msg=" in logfmt
        self._keys: dict[str, str] = {}  # field name -> its key as written

    def format(self, record: logging.LogRecord) -> str:
        line = self._json(record) if self.fmt == "json" else self._logfmt(record)
        if self.journal:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line

    def _ts(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:  # strftime once a second, not once a line
            stamp = self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{stamp[1]}.{int(record.msecs):03d}Z"

    def _logfmt(self, record: logging.LogRecord) -> str:
        levelname, name = record.levelname, record.name
        cacheable = type(levelname) is str and type(name) is str
        head = self._heads.get((levelname, name)) if cacheable else None
        if head is None:
            head = f"level={logfmt_value(levelname.lower())} logger={logfmt_value(name)} msg="
            if cacheable and len(self._heads) < 1024:
                self._heads[levelname, name] = head
        msg = logfmt_value(record.getMessage())
        # The timestamp is digits, '-', 'T', ':' and '.': bare, as logfmt_value would leave it.
        parts = [head, msg] if self.journal else [f"ts={self._ts(record)} ", head, msg]
        extra = getattr(record, FIELDS_ATTR, None)
        if isinstance(extra, Mapping):
            keys = self._keys
            for k, v in extra.items():
                parts.append((keys.get(k) if type(k) is str else None) or self._new_key(k))
                parts.append(logfmt_value(v))
        if record.exc_info:
            parts.append(" exc=")
            parts.append(logfmt_value(self.formatException(record.exc_info)))
        return "".join(parts)

    def _json(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {} if self.journal else {"ts": self._ts(record)}
        data["level"] = _scalar(record.levelname.lower())
        data["logger"] = _scalar(record.name)
        data["msg"] = _scalar(record.getMessage())
        extra = getattr(record, FIELDS_ATTR, None)
        if isinstance(extra, Mapping):
            keys = self._keys
            for k, v in extra.items():
                data[(keys.get(k) if type(k) is str else None) or self._new_key(k)] = _scalar(v)
        if record.exc_info:
            data["exc"] = _scalar(self.formatException(record.exc_info))
        return _json_line(data)

    def _new_key(self, name: object) -> str:
        """A field's key as this format writes it (`' key='` in logfmt), renamed with a '_' when
        it would clash with the line's own; kept for the next line if `name` is an exact str."""
        key = _key(f"{name}_" if name in self._taken else str(name))
        if self.fmt == "logfmt":
            key = f" {key}="
        if type(name) is str and len(self._keys) < 1024:
            self._keys[name] = key
        return key


_handler: logging.Handler | None = None


def configure(
    fmt: LogFormat,
    level: str,
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send all logging to stderr (or `stream`) as structured lines at `level`.

    Safe to call again (on reload): it replaces the handler it installed before.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    target = stream if stream is not None else sys.stderr
    try:
        stat: os.stat_result | None = os.fstat(target.fileno())
    except (OSError, ValueError, AttributeError):
        stat = None  # not a real file (e.g. io.StringIO)
    handler = logging.StreamHandler(target)
    journal = on_journal(os.environ if environ is None else environ, stat)
    handler.setFormatter(StructuredFormatter(fmt, journal))
    # Our lines carry none of these record fields; the logging HOWTO's "Optimization"
    # switches skip collecting them (a frame walk, thread and process look-ups per line).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    global _handler
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(LEVELS[level.lower()])
    _handler = handler
    return handler
