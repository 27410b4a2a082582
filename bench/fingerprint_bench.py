"""Burst detection on the generated corpus: recall, false positives, and cost per message.

Run: .venv/bin/python -m bench.fingerprint_bench [--seed N] [--threshold 40] [--against REF]

Feeds the corpus (queueguard/replay/corpus.py) in one arrival order through BurstCheck
with in-memory counts, all inside one 10-minute window, and reports:
recall = campaign copies held / copies after the threshold (the first
`threshold` copies of a wave are let through by design); false positives
= legitimate messages held, with the default exemptions and a sender list
for the notification stream and the newsletter and a trusted List-Id for the list (what an
admin configures), and without any exemption (what they save).
Cost: parse_message and fingerprints() per message and per 10 KB of message.
With --against REF (a git revision), fingerprints() of REF's fingerprint.py is timed in the same
process, alternating with the current one, so the ratio holds even on a busy box.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from queueguard.burst.check import BurstCheck
from queueguard.burst.fingerprint import fingerprints
from queueguard.burst.window import MemoryWindow
from queueguard.mime import ParsedMessage, parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.replay.corpus import Sample, campaign, corpus
from queueguard.stage import MessageContext

REPO = Path(__file__).resolve().parents[1]


def policy(threshold: int, exemptions: bool) -> Policy:
    rule: dict[str, object] = {"name": "wave", "fingerprint": "body", "threshold": f"{threshold} in 10m"}
    if exemptions:
        rule["unless"] = [{"sender_in": "bulk_senders"}, {"list_id_in": "trusted_list_ids"}]
    else:
        rule.update(exempt_authenticated=False)
    lists = {"bulk_senders": ["*@phabricator.example.org", "news.example.com"],
             "trusted_list_ids": ["lists.example.org"]}
    return Policy.model_validate({"lists": lists, "bursts": [rule]})


async def detect(samples: list[Sample], parsed: list[ParsedMessage], pol: Policy) -> dict[str, Counter[str]]:
    clock = [1_000_000.0]
    check = BurstCheck(MemoryWindow(), clock=lambda: clock[0])
    held: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for sample, p in zip(samples, parsed, strict=True):
        clock[0] += 500.0 / len(samples)  # the whole corpus arrives within 500 s
        txn = Transaction(Connection(parse_ip("192.0.2.1")), sample.sender, recipients=[sample.recipient])
        ctx = MessageContext(txn, sample.raw, pol, parse_message)
        ctx.__dict__["parsed"] = p  # parsed once above, as the pipeline's cached_property would
        result = await check.on_message(ctx)
        seen[sample.kind] += 1
        if result.verdict is not None:
            held[sample.kind] += 1
    return {"held": held, "seen": seen}


def timed(fn: object, items: list[object], repeat: int = 3) -> float:
    """Median CPU seconds of this process for one pass of fn over items (other load on the box counts less)."""
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        for item in items:
            fn(item)  # type: ignore[operator]
        runs.append(time.process_time() - start)
    return statistics.median(runs)


def fingerprints_at(ref: str) -> Callable[[ParsedMessage], object]:
    """fingerprints() of queueguard/burst/fingerprint.py as it is at git revision `ref`."""
    source = subprocess.run(["git", "show", f"{ref}:queueguard/burst/fingerprint.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"fingerprint_at_{ref}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{ref}:fingerprint.py", "exec"), module.__dict__)  # our own file, at another commit
    found: Callable[[ParsedMessage], object] = module.fingerprints
    return found


def compare(ref: str, parsed: list[ParsedMessage], size: int, rounds: int = 9) -> tuple[float, float]:
    """(REF's, current) median CPU ms per 10 KB, measured alternately."""
    theirs, ours = fingerprints_at(ref), fingerprints
    runs: dict[str, list[float]] = {"theirs": [], "ours": []}
    for _ in range(rounds):
        for name, fn in (("theirs", theirs), ("ours", ours)):
            runs[name].append(timed(fn, parsed, repeat=1) / (size / 10240) * 1e3)  # type: ignore[arg-type]
    return statistics.median(runs["theirs"]), statistics.median(runs["ours"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threshold", type=int, default=40)
    ap.add_argument("--against", metavar="REF", help="also time fingerprints() of this git revision, alternately")
    args = ap.parse_args()

    samples = corpus(seed=args.seed)
    parsed = [parse_message(s.raw) for s in samples]
    kinds = Counter(s.kind for s in samples)
    print(f"corpus: {len(samples)} messages: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))

    for exemptions in (True, False):
        r = asyncio.run(detect(samples, parsed, policy(args.threshold, exemptions)))
        spam_groups = Counter(s.group for s in samples if s.kind == "spam")
        catchable = sum(max(0, n - args.threshold) for n in spam_groups.values())
        caught = r["held"]["spam"]
        label = "configured exemptions: bulk_senders, trusted_list_ids" if exemptions else "no exemptions"
        print(f"\n[{label}] threshold {args.threshold} in 10m")
        print(f"  campaign copies held: {caught} of {catchable} after the threshold "
              f"(recall {caught / catchable:.1%}; {len(spam_groups)} campaigns x {max(spam_groups.values())})")
        for kind in ("distinct", "list", "notification", "newsletter"):
            print(f"  {kind:12} held: {r['held'][kind]} of {r['seen'][kind]}")

    raws = [s.raw for s in samples]
    total = sum(len(r) for r in raws)
    t_parse = timed(parse_message, raws)  # type: ignore[arg-type]
    t_fp = timed(fingerprints, parsed)  # type: ignore[arg-type]
    per10k = total / 10240
    print(f"\ncost over {len(raws)} messages, mean size {total / len(raws) / 1024:.1f} KiB:")
    print(f"  parse_message: {t_parse / len(raws) * 1e3:.3f} ms/msg, {t_parse / per10k * 1e3:.3f} ms per 10 KB")
    print(f"  fingerprints:  {t_fp / len(raws) * 1e3:.3f} ms/msg, {t_fp / per10k * 1e3:.3f} ms per 10 KB")

    big = [s.raw for s in campaign(random.Random(3), "big", 300, size_paragraphs=20)]
    big_parsed = [parse_message(r) for r in big]
    size = sum(len(r) for r in big) / len(big)
    t_fp = timed(fingerprints, big_parsed) / len(big)  # type: ignore[arg-type]
    t_parse = timed(parse_message, big) / len(big)  # type: ignore[arg-type]
    print(f"  {size / 1024:.1f} KiB campaign copies: parse {t_parse * 1e3:.3f} ms, fingerprints {t_fp * 1e3:.3f} ms "
          f"({t_fp * 1e3 / (size / 10240):.3f} ms per 10 KB)")
    if args.against:
        theirs, ours = compare(args.against, big_parsed, sum(len(r) for r in big))
        print(f"  same copies, alternating: {args.against} {theirs:.3f}, this tree {ours:.3f} ms per 10 KB "
              f"({ours / theirs:.2f} x)")


if __name__ == "__main__":
    main()
