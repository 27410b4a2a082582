"""SMTP command syntax for the proxy front end: pure functions over one command's text.

What each function takes is what Exim takes from a client (we must never be stricter than the MTA
behind us), and what the proxy answered when aiosmtpd parsed for it: tests/unit/frontends/
test_smtp_syntax.py holds the path parser to aiosmtpd's answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

COMMAND_LIMIT = 16 * 1024 - 1
"""Octets in a command line, CRLF included. Exim takes up to ~16 KB (its command buffer): long
AUTH= values and SRS/VERP senders with parameters pass there, so they must pass here too
(RFC 5321 sets 512 as the least a server must take, not the most)."""
IGNORED_PARAMS = ("RET", "ENVID")
"""MAIL parameters of DSN (RFC 3461) that Exim accepts and ignores when it does not offer DSN; so do we."""
BAD_HELO = "501 5.5.2 Syntax error in HELO/EHLO hostname"
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ADDRESS = re.compile(r"^[^\s<>()\[\]\\,;:@\"]+(\.[^\s<>()\[\]\\,;:@\"]+)*@[^\s<>@]+$"
                      r"|^\"(?:[^\"\\\r\n]|\\[^\r\n])*\"@[^\s<>@]+$")
"""Dot-atom or quoted local part (with quoted pairs: `"a\\"b"@`, which Exim takes) at a domain."""
_PLAIN_PATH = re.compile(
    r"<((?!\.)((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|\.(?!\.))+)(?<!\.)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z",
    re.DOTALL)
"""A path whose local part is a plain dot-atom and whose domain is a plain host name."""
_QUOTED_PATH = re.compile(r'<("(?:[^"\\\r\n]|\\[^\r\n])*"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z', re.DOTALL)
"""A path whose local part is a quoted string, kept as the client wrote it (the email package's
parser rewrites `".a"@` to `.a@`, which is no address)."""
_DIGITS = re.compile(r"[0-9]{1,20}")


def valid_helo(hostname: str) -> bool:
    """No control characters (a NUL would reach logs and the downstream's Received line). Any
    length the command line allows is taken, as Exim takes it (5,000 characters and more)."""
    return _CONTROL.search(hostname) is None


def valid_address(address: str, *, allow_null: bool) -> bool:
    """RFC 5321 path, loosely: local@domain without spaces, brackets or control characters; `<>`
    only where allowed; `postmaster` alone as a recipient (RFC 5321 4.5.1 says it must be accepted)."""
    if address in ("", "<>"):
        return allow_null
    if not allow_null and address.lower() == "postmaster":
        return True
    return len(address) <= 320 and _ADDRESS.match(address) is not None and _CONTROL.search(address) is None


def strip_keyword(keyword: str, arg: str) -> str | None:
    """`FROM:<a@b>` → `<a@b>`; None when the keyword is missing."""
    if arg[:len(keyword)].upper() == keyword:
        return arg[len(keyword):].strip()
    return None


def parse_path(arg: str) -> tuple[str | None, str]:
    """A command's path and what follows it: `("", "")` for nothing, `(None, "")` for a path that
    does not parse. The everyday `<local@domain>` and a quoted local part are matched directly;
    anything else (source routes, comments, spaces in the local part) goes through the email
    package's RFC 5322 parser, which quotes or drops what it must."""
    m = _PLAIN_PATH.match(arg)
    if m is not None and "(" not in m.group(3):
        return m.group(1), m.group(3).lstrip(" \t")
    q = _QUOTED_PATH.match(arg)
    if q is not None and "(" not in q.group(2):
        return q.group(1), q.group(2).lstrip(" \t")
    if not arg:
        return "", ""
    try:
        address, rest = get_angle_addr(arg) if arg.lstrip().startswith("<") else get_addr_spec(arg)
    except HeaderParseError:
        return None, ""
    return str(address.addr_spec), rest


def ignored_param(param: str) -> bool:
    """A MAIL parameter taken and dropped: DSN's RET/ENVID, a SIZE that says no number."""
    name, _, value = param.partition("=")
    name = name.upper()
    return name in IGNORED_PARAMS or (name == "SIZE" and _DIGITS.fullmatch(value) is None)


@dataclass
class MailParams:
    """MAIL's parameters as the pipeline gets them (upper-cased, the ignored ones dropped), or the
    reply that refuses them."""

    options: list[str] = field(default_factory=list)
    error: str = ""


def mail_params(rest: str, size_limit: int, syntax_error: str) -> MailParams:
    """`AUTH=` (RFC 4954), `RET=` and `ENVID=` (RFC 3461) are accepted and ignored, as Exim does
    without authenticators or DSN (senders that saw them offered elsewhere send them), and so is a
    SIZE that is not a number of ASCII digits (Exim takes `SIZE=` and `SIZE=²`). BODY and
    SMTPUTF8 are what EHLO offers; anything else is 555."""
    options = [o for o in rest.upper().split() if not ignored_param(o)]
    params: dict[str, str | bool] = {}
    for param in options:
        name, eq, value = param.partition("=")
        if not name.isalnum() or (eq and not value):
            return MailParams(error=syntax_error)
        params[name] = value if eq else True
    params.pop("AUTH", None)
    if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
        return MailParams(error="501 Error: BODY can only be one of 7BIT, 8BITMIME")
    if not isinstance(params.pop("SMTPUTF8", False), bool):
        return MailParams(error="501 Error: SMTPUTF8 takes no arguments")
    size = params.pop("SIZE", None)
    if isinstance(size, str) and size_limit and int(size) > size_limit:
        return MailParams(error=SIZE_EXCEEDED)
    if params:
        return MailParams(error="555 MAIL FROM parameters not recognized or not implemented")
    return MailParams(options)


def rcpt_params(rest: str, syntax_error: str) -> str:
    """RCPT parameters: none is offered (no DSN), so any well-formed one is 555; '' when none."""
    for param in rest.upper().split():
        name, eq, value = param.partition("=")
        if not name.isalnum() or (eq and not value):
            return syntax_error
        return "555 RCPT TO parameters not recognized or not implemented"
    return ""
