"""The running policy, and how it is replaced.

A reload validates the whole directory first and swaps one reference only
when everything is good: readers call `current()` and get either the old or
the new policy, never a mix. A broken edit keeps the last good policy running
and is reported (each issue logged as `file:line: message`, a failure
counter). Transactions pin the policy at MAIL FROM, so in-flight mail
finishes under the rules it started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from queueguard import metrics
from queueguard.policy.loader import PolicyError, PolicyIssue, load_policy_dir_warned, policy_files
from queueguard.policy.schema import Policy

log = logging.getLogger("queueguard.policy")

Signature = tuple[tuple[str, int, int], ...]


def dir_signature(path: Path) -> Signature:
    """Names, mtimes and sizes of the policy files: changes when an admin saves one."""
    try:
        files = policy_files(path)
    except OSError:
        return ()
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((f.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


class PolicyHolder:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._policy: Policy | None = None
        self._loaded_at: float | None = None
        self._signature: Signature | None = None
        self._last_issues: list[PolicyIssue] = []
        self._lock = threading.Lock()

    def current(self) -> Policy:
        """The last good policy; RuntimeError before the first successful reload()."""
        policy = self._policy
        if policy is None:
            raise RuntimeError(f"no policy loaded from {self.path}")
        return policy

    def reload(self) -> list[PolicyIssue]:
        """Load the directory; swap in the result if it is valid. Returns the problems (empty: swapped)."""
        with self._lock:
            signature = dir_signature(self.path)
            try:
                policy, warnings = load_policy_dir_warned(self.path)
            except PolicyError as e:
                self._signature = signature
                self._report(e.issues)
                return e.issues
            except Exception as e:  # a loader bug or MemoryError must not end the watcher or a SIGHUP
                log.exception("policy in %s could not be loaded", self.path)
                self._signature = signature
                issues = [PolicyIssue(str(self.path), 0, f"could not be loaded: {type(e).__name__}: {e}")]
                self._report(issues)
                return issues
            self._policy, self._signature = policy, signature
            self._loaded_at = self.clock()
            self._last_issues = []
        metrics.policy_reloads.inc()
        metrics.policy_last_success.set(self._loaded_at)
        for kind, rules in (("ratelimit", policy.ratelimits), ("burst", policy.bursts),
                            ("pattern", policy.patterns)):
            metrics.policy_rules.labels(kind).set(len(rules))
        log.info("policy loaded from %s: %s", self.path, describe(policy))
        for warning in warnings:
            log.warning("policy %s", warning)
        if not (policy.ratelimits or policy.bursts or policy.patterns):
            log.warning("policy in %s has no ratelimits, bursts or patterns: nothing is limited or held "
                        "(an empty file, or one saved half-way?)", self.path)
        return []

    def _report(self, issues: list[PolicyIssue]) -> None:
        metrics.policy_reload_failures.inc()
        keeping = "keeping the last good policy" if self._policy is not None else "no policy loaded"
        if issues == self._last_issues:
            log.error("policy in %s still has the same %d error(s); %s", self.path, len(issues), keeping)
            return
        self._last_issues = list(issues)
        log.error("policy in %s has %d error(s); %s", self.path, len(issues), keeping)
        for issue in issues:
            log.error("policy error: %s", issue)

    def summary(self) -> dict[str, object]:
        policy = self._policy
        return {
            "path": str(self.path),
            "loaded_at": self._loaded_at,
            "rules": None if policy is None else describe(policy),
            "errors": [str(i) for i in self._last_issues],
        }

    async def watch(self, interval: float = 2.0, on_change: Callable[[Policy], None] | None = None) -> None:
        """Poll the directory and reload when a file is added, removed or saved, and has stayed
        so for one more interval: an editor that truncates a file and then writes it must not
        get its empty moment loaded (a policy without those rules). `on_change` runs on the
        event loop after a good policy was swapped in."""
        seen = self._signature
        while True:
            await asyncio.sleep(interval)
            now = dir_signature(self.path)
            settled, seen = now == seen, now
            if now != self._signature and settled:
                problems = await asyncio.to_thread(self.reload)
                if not problems and on_change is not None:
                    try:
                        on_change(self.current())
                    except Exception:  # the watcher must outlive it: the next save is reloaded too
                        log.exception("applying the policy reloaded from %s failed", self.path)


def describe(policy: Policy) -> str:
    """'2 lists, 4 ratelimits, 1 burst, 2 patterns' (what `queueguard check` prints too)."""
    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    return ", ".join((n(len(policy.lists), "list"), n(len(policy.ratelimits), "ratelimit"),
                      n(len(policy.bursts), "burst"), n(len(policy.patterns), "pattern")))
