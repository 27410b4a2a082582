"""Parsing of the small languages admins write: durations, sizes, rates.

Pure functions; each raises ValueError with a message fit to show an admin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(text: str | int | float) -> float:
    """'10m' -> 600.0; a bare number is seconds."""
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"duration must not be negative, got {text}")
        return float(text)
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"bad duration {text!r}: expected a number with unit ms, s, m, h or d (like '10m')")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str | int) -> int:
    """'512MiB' -> 536870912; a bare number is bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"bad size {text!r}: expected a number with unit B, KB, KiB, MB, MiB, GB or GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class Rate:
    """`count` events per `period` seconds."""

    count: int
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


MAX_RATE_COUNT = 1_000_000_000
MAX_RATE_PERIOD = 366 * 86400.0


def parse_rate(text: str) -> Rate:
    """'120/10m' -> Rate(120, 600.0)."""
    count, sep, period = str(text).partition("/")
    if not sep or not count.strip().isdigit():
        raise ValueError(f"bad rate {text!r}: expected COUNT/PERIOD like '120/10m'")
    try:
        seconds = parse_duration(period if period.strip()[:1].isdigit() else "1" + period.strip())
    except ValueError:
        raise ValueError(f"bad rate {text!r}: period {period!r} is not a duration like '10m'") from None
    if int(count) <= 0 or seconds <= 0:
        raise ValueError(f"bad rate {text!r}: count and period must be positive")
    if int(count) > MAX_RATE_COUNT or seconds > MAX_RATE_PERIOD:
        raise ValueError(f"bad rate {text!r}: at most {MAX_RATE_COUNT:,} per period, periods up to 366d "
                         "(a larger number is no limit at all; leave the rule out instead)")
    return Rate(int(count), seconds)


def parse_threshold(text: str) -> Rate:
    """'40 in 10m' -> Rate(40, 600.0): burst thresholds read naturally."""
    count, sep, period = str(text).partition(" in ")
    if not sep:
        return parse_rate(text)
    return parse_rate(f"{count.strip()}/{period.strip()}")
