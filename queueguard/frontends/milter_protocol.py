"""The milter protocol (version 6, as Postfix and Sendmail speak it), without any I/O.

A packet is a 4-byte big-endian length, a command byte and its data; strings
are NUL-terminated. This module splits a byte stream into packets and encodes
and decodes their data, both ways (the MTA's side too, so that unit tests and
the benchmark's round-trip counter speak the protocol without an MTA). The
sockets are the front end's (frontends/milter.py). Written from libmilter's
`mfdef.h` and the behaviour of Postfix's milter8 client; miltertest and a
real Postfix judge it in the integration tests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

VERSION = 6
"""Protocol version 6 (Sendmail 8.14+, Postfix 2.6+): no-reply flags and macro lists."""

# --- commands, MTA -> milter (the command byte as an int) ---------------------------------------
ABORT = ord("A")
BODY = ord("B")
CONNECT = ord("C")
MACRO = ord("D")
EOM = ord("E")
HELO = ord("H")
QUIT_NC = ord("K")
"""QUIT, but the MTA reuses the connection for another SMTP session (a new CONNECT follows)."""
HEADER = ord("L")
MAIL = ord("M")
EOH = ord("N")
OPTNEG = ord("O")
QUIT = ord("Q")
RCPT = ord("R")
DATA = ord("T")
UNKNOWN = ord("U")

# --- replies and actions, milter -> MTA ---------------------------------------------------------
ACCEPT = ord("a")
CONTINUE = ord("c")
DISCARD = ord("d")
REJECT = ord("r")
TEMPFAIL = ord("t")
REPLYCODE = ord("y")
ADDHEADER = ord("h")
CHGHEADER = ord("m")
QUARANTINE = ord("q")
PROGRESS = ord("p")
FINAL = frozenset({ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, REPLYCODE})
"""Replies that end the MTA's wait for a command's answer (the others are actions before one)."""

# --- actions the milter may take (negotiated) ---------------------------------------------------
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100

# --- protocol steps the MTA may skip, and steps it need not wait for (negotiated) ---------------
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

NO_REPLY = {CONNECT: SMFIP_NR_CONN, HELO: SMFIP_NR_HELO, MAIL: SMFIP_NR_MAIL, RCPT: SMFIP_NR_RCPT,
            DATA: SMFIP_NR_DATA, UNKNOWN: SMFIP_NR_UNKN, EOH: SMFIP_NR_EOH, BODY: SMFIP_NR_BODY,
            HEADER: SMFIP_NR_HDR}
"""Which negotiated flag lets the MTA send a command without waiting for its answer."""

# --- macro stages for SMFIF_SETSYMLIST ---------------------------------------------------------
STAGE_CONNECT = 0
STAGE_HELO = 1
STAGE_MAIL = 2
STAGE_RCPT = 3
STAGE_DATA = 4
STAGE_EOM = 5
STAGE_EOH = 6
STAGES = (STAGE_CONNECT, STAGE_HELO, STAGE_MAIL, STAGE_RCPT, STAGE_DATA, STAGE_EOM, STAGE_EOH)

FAMILY_UNKNOWN = "U"
FAMILY_UNIX = "L"
FAMILY_INET = "4"
FAMILY_INET6 = "6"

NUL = b"\0"
_HEAD = struct.Struct(">IB")
_LEN = struct.Struct(">I")
_U32X3 = struct.Struct(">III")


class ProtocolError(ValueError):
    """Bytes that are not the milter protocol, or a packet over the size we accept."""


class PacketReader:
    """Splits a byte stream into (command, data) packets; holds at most one partial packet."""

    def __init__(self, max_packet: int) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        """Append; what was returned is dropped once it is half the buffer, so a packet trickled
        in byte by byte costs linear time (copying the rest on every read was quadratic)."""
        if self._pos >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as packets."""
        return len(self._buf) - self._pos

    def next(self) -> tuple[int, bytes] | None:
        """The next whole packet, or None until more bytes come."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (size,) = _LEN.unpack_from(buf, pos)
        if size == 0 or size > self.max_packet:
            raise ProtocolError(f"packet length {size} (at most {self.max_packet})")
        end = pos + 4 + size
        if len(buf) < end:
            return None
        self._pos = end
        return buf[pos + 4], bytes(buf[pos + 5:end])


# --- encoding -------------------------------------------------------------------------------------


def packet(command: int, data: bytes = b"") -> bytes:
    return _HEAD.pack(len(data) + 1, command) + data


def cstr(text: str | bytes) -> bytes:
    """A NUL-terminated string (text as UTF-8, undecodable bytes kept as they came)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    return raw.replace(b"\0", b"") + b"\0"


def optneg(version: int, actions: int, protocol: int, macros: Mapping[int, str] | None = None) -> bytes:
    """OPTNEG both ways: the MTA's offer, or the milter's answer with its macro lists per stage."""
    data = _U32X3.pack(version, actions, protocol)
    for stage, names in (macros or {}).items():
        data += struct.pack(">I", stage) + cstr(names)
    return packet(OPTNEG, data)


def replycode(code: str, status: str, text: str) -> bytes:
    """SMFIR_REPLYCODE: the SMTP reply the MTA sends instead of its own for a refusal."""
    return packet(REPLYCODE, cstr(f"{code} {status} {text}"))


def addheader(name: str, value: str) -> bytes:
    """Our own header: a line break in a value (none is expected: rule names, reasons) would start
    another header, so it becomes a space."""
    return packet(ADDHEADER, cstr(name) + cstr(value.replace("\r", " ").replace("\n", " ")))


def chgheader(index: int, name: str, value: str = "") -> bytes:
    """Change the index-th (from 1) header called `name`; an empty value deletes it."""
    return packet(CHGHEADER, struct.pack(">I", index) + cstr(name) + cstr(value))


def quarantine(reason: str) -> bytes:
    return packet(QUARANTINE, cstr(reason))


def connect(hostname: str, family: str, port: int = 0, address: str = "") -> bytes:
    """The MTA's CONNECT (tests and tools)."""
    data = cstr(hostname) + family.encode()
    if family != FAMILY_UNKNOWN:
        data += struct.pack(">H", port) + cstr(address)
    return packet(CONNECT, data)


def strings(command: int, args: Iterable[str | bytes]) -> bytes:
    """HELO, MAIL, RCPT, UNKNOWN: NUL-terminated strings."""
    return packet(command, b"".join(cstr(a) for a in args))


def header(name: str, value: str | bytes) -> bytes:
    return packet(HEADER, cstr(name) + cstr(value))


def macro(command: int, values: Mapping[str, str]) -> bytes:
    return packet(MACRO, bytes([command]) + b"".join(cstr(k) + cstr(v) for k, v in values.items()))


# --- decoding -------------------------------------------------------------------------------------


def text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def split_strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings -> their bytes (a missing last NUL is tolerated)."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def parse_optneg(data: bytes) -> tuple[int, int, int, dict[int, str]]:
    """(version, actions, protocol, macro lists per stage)."""
    if len(data) < 12:
        raise ProtocolError(f"OPTNEG of {len(data)} bytes")
    version, actions, protocol = _U32X3.unpack_from(data)
    macros: dict[int, str] = {}
    pos = 12
    while pos + 4 < len(data):
        (stage,) = struct.unpack_from(">I", data, pos)
        end = data.find(b"\0", pos + 4)
        end = len(data) if end < 0 else end
        macros[stage] = text(data[pos + 4:end])
        pos = end + 1
    return version, actions, protocol, macros


def parse_connect(data: bytes) -> tuple[str, str, int, str]:
    """(hostname, family letter, port, address) of SMFIC_CONNECT."""
    name_end = data.find(b"\0")
    if name_end < 0 or name_end + 1 >= len(data):
        raise ProtocolError("CONNECT without host name and family")
    hostname = text(data[:name_end])
    family = chr(data[name_end + 1])
    if family == FAMILY_UNKNOWN:
        return hostname, family, 0, ""
    if len(data) < name_end + 4:
        raise ProtocolError("CONNECT without port")
    (port,) = struct.unpack_from(">H", data, name_end + 2)
    address = split_strings(data[name_end + 4:])
    return hostname, family, port, text(address[0]) if address else ""


def parse_header(data: bytes) -> tuple[str, bytes]:
    """(name, value bytes) of SMFIC_HEADER."""
    name, sep, rest = data.partition(b"\0")
    if not sep:
        raise ProtocolError("HEADER without value")
    return name.decode("ascii", "surrogateescape"), rest[:-1] if rest.endswith(b"\0") else rest


def parse_macros(data: bytes) -> tuple[int, dict[str, str]]:
    """(command the macros are for, {name: value}); names without their braces."""
    if not data:
        raise ProtocolError("MACRO without a command")
    parts = split_strings(data[1:])
    values = {text(parts[i]).strip("{}"): text(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    return data[0], values


def parse_reply(command: int, data: bytes) -> str:
    """A milter reply as text (tests and tools): 'y 451 4.7.1 ...', 'h X-Name: value', 'a'."""
    letter = chr(command)
    if command in (REPLYCODE, QUARANTINE):
        return f"{letter} {text(data.rstrip(NUL))}"
    if command == ADDHEADER:
        name, value = (text(p) for p in split_strings(data))
        return f"{letter} {name}: {value}"
    if command == CHGHEADER:
        (index,) = struct.unpack_from(">I", data)
        parts = [text(p) for p in split_strings(data[4:])] + [""]
        return f"{letter} {index} {parts[0]}: {parts[1]}"
    return letter
