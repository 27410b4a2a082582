"""What a replay reports: the accounting that proves nothing was lost, checks, figures.

Pure data and pure functions: a scenario fills a `Summary`; `render` prints the
verdict table, `Summary.as_dict` is the machine-readable form (--json).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Accounting:
    """Where every message the scenario sent ended up, counted from the components themselves
    (downstream maildirs, the quarantine store, the sender's log and spool), not from the guard.

    `rejected` maps a stated reason (the 5xx text's rule) to a count.
    """

    sent: int = 0
    delivered: int = 0
    quarantined: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    queued_at_sender: int = 0
    duplicates: int = 0
    """Messages delivered more than once (not a loss, but worth seeing)."""

    @property
    def lost(self) -> int:
        """Sent but in none of the four places. Negative would mean double counting: reported as is."""
        return self.sent - self.delivered - self.quarantined - sum(self.rejected.values()) - self.queued_at_sender

    def equation(self) -> str:
        rejected = sum(self.rejected.values())
        return (f"sent {self.sent} = delivered {self.delivered} + quarantined {self.quarantined} + "
                f"rejected {rejected} + queued at sender {self.queued_at_sender} + lost {self.lost}")

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "delivered": self.delivered, "quarantined": self.quarantined,
                "rejected": dict(self.rejected), "queued_at_sender": self.queued_at_sender,
                "duplicates": self.duplicates, "lost": self.lost}


def account(sent: Sequence[str], delivered: Sequence[str], quarantined: Sequence[str],
            rejected: Mapping[str, str], queued: Sequence[str]) -> Accounting:
    """Accounting from message ids: each sent id is placed once, in the first of delivered,
    quarantined, rejected (id -> reason), queued that holds it; extra copies count as duplicates."""
    sent_set = set(sent)
    placed: set[str] = set()
    acc = Accounting(sent=len(sent_set))
    acc.duplicates = (len(delivered) - len(set(delivered))) + (len(quarantined) - len(set(quarantined)))
    for mid in set(delivered) & sent_set:
        placed.add(mid)
        acc.delivered += 1
    for mid in (set(quarantined) & sent_set) - placed:
        placed.add(mid)
        acc.quarantined += 1
    for mid, reason in rejected.items():
        if mid in sent_set and mid not in placed:
            placed.add(mid)
            acc.rejected[reason] = acc.rejected.get(reason, 0) + 1
    for mid in (set(queued) & sent_set) - placed:
        placed.add(mid)
        acc.queued_at_sender += 1
    return acc


def missing(sent: Sequence[str], *found: Sequence[str]) -> list[str]:
    """Sent ids found nowhere: the lost ones, named (sorted) so a failed replay says which."""
    seen = set().union(*(set(f) for f in found))
    return sorted(set(sent) - seen)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Check:
    """One claim the replay makes about the incident, and whether it held."""

    name: str
    ok: bool
    detail: str


@dataclass
class Summary:
    scenario: str
    incident: str
    scale: float
    accounting: Accounting
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))

    def note_lost(self, lost: list[str]) -> None:
        """Name the first lost message ids (the accounting already counts them)."""
        if lost:
            self.notes.append(f"lost ids: {', '.join(lost[:20])}")

    @property
    def ok(self) -> bool:
        return self.accounting.lost == 0 and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "incident": self.incident, "scale": self.scale,
            "seconds": round(self.seconds, 1), "ok": self.ok, "lost": self.accounting.lost,
            "accounting": self.accounting.as_dict(), "figures": self.figures,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "notes": self.notes,
        }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render(summary: Summary) -> str:
    """The short verdict table a person reads at the end of a replay."""
    acc = summary.accounting
    lines = [f"replay {summary.scenario} ({summary.incident}), scale {summary.scale:g}, "
             f"{summary.seconds:.1f} s: {'PASS' if summary.ok else 'FAIL'}", ""]
    rows = [("lost", "ok" if acc.lost == 0 else "FAIL", acc.equation())]
    if acc.rejected:
        rows.append(("rejected by reason", "", ", ".join(f"{k}: {v}" for k, v in sorted(acc.rejected.items()))))
    if acc.duplicates:
        rows.append(("delivered twice", "", str(acc.duplicates)))
    rows += [(c.name, "ok" if c.ok else "FAIL", c.detail) for c in summary.checks]
    rows += [(k, "", _fmt(v)) for k, v in summary.figures.items() if not isinstance(v, list | dict)]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {name:<{width}}  {status:<4}  {detail}" for name, status, detail in rows]
    lines += [f"  note: {n}" for n in summary.notes]
    arms = summary.figures.get("arms")
    if isinstance(arms, dict) and arms:
        lines += ["", *side_by_side(arms)]
    return "\n".join(lines)


def side_by_side(arms: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Arms of one scenario (control and protected) in columns, so the same figure reads across."""
    names = list(arms)
    keys = list(dict.fromkeys(k for figs in arms.values() for k in figs))
    cells = [[_fmt(arms[n].get(k, "")) for n in names] for k in keys]
    kw = max(len(k) for k in keys)
    cw = [max(len(n), *(len(row[i]) for row in cells)) for i, n in enumerate(names)]
    out = ["  " + " " * kw + "  " + "  ".join(n.ljust(w) for n, w in zip(names, cw, strict=True))]
    out += ["  " + k.ljust(kw) + "  " + "  ".join(c.ljust(w) for c, w in zip(row, cw, strict=True)).rstrip()
            for k, row in zip(keys, cells, strict=True)]
    return out
