"""Burst detection on real spam campaigns and real ham, through the real proxy with the shipped policy.

    .venv/bin/python -m bench.burst_real [--waves N] [--ham N] [--json out.json]

The development split of the SpamAssassin public corpus (bench/spamassassin.py says how it is
fetched and how campaigns are found) is sent through `queueguard serve` (the shipped `policies/`,
in-process state) to Postfix's smtp-sink, in two runs with a fresh guard each:
- as sent: every campaign of >= 5 variants as a wave of 100 copies (own Message-ID, To, a random
  token line each), all dev ham interleaved, in one random order;
- with headers: the same, every wave copy also carrying List-Unsubscribe, List-Id, In-Reply-To
  and References (the headers that used to buy an exemption).
Then legitimate waves: 100 copies of a real newsletter from a configured bulk sender, and 100
carrying a List-Id from the policy's trusted list.

Reported per wave: copies held of the 60 past the threshold (copies held before the 41st count
too: two campaigns that share text add up); ham held; the legitimate waves' held counts; and the
CPU cost, in this process, of fingerprints() and of linking in memory over the as-sent stream.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import spamassassin as sa
from queueguard.burst.campaign import sighting
from queueguard.burst.fingerprint import fingerprints, subject_skeleton
from queueguard.burst.window import MemoryWindow
from queueguard.harness.guard import Guard
from queueguard.harness.sink import SmtpSink
from queueguard.mime import parse_message

REPO = Path(__file__).resolve().parents[1]
COPIES = 100


def shipped_policies() -> dict[str, str]:
    """As shipped, with the bulk senders' network where this bench's legitimate waves come from:
    loopback, like every message here (the spam waves forge no bulk sender or trusted List-Id;
    tests/integration/test_burst_proxy.py holds waves that do)."""
    return {p.name: p.read_text().replace("    - 192.0.2.0/24\n", "    - 127.0.0.1/32\n")
            for p in sorted((REPO / "policies").glob("*.yaml"))}


def threshold() -> int:
    doc = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())
    return int(str(doc["bursts"][0]["threshold"]).split()[0].split("/")[0])


def run_guard(sends: list[sa.Send]) -> tuple[list[sa.Outcome], float]:
    """A fresh guard (its own work dir, removed afterwards) and sink for one run."""
    workdir = Path(tempfile.mkdtemp(prefix="qg-burst-real-"))
    try:
        with SmtpSink() as sink, Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]},
                                       shipped_policies(), workdir=workdir) as guard:
            started = time.monotonic()
            outcomes = sa.send_all(guard.port, sends)
            return outcomes, time.monotonic() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summarise(outcomes: list[sa.Outcome], n_waves: int, limit: int) -> dict[str, Any]:
    held = [0] * n_waves
    for o in outcomes:
        if o.send.wave is not None and o.held:
            held[o.send.wave] += 1
    ham = [o for o in outcomes if o.send.wave is None]
    catchable = COPIES - limit
    return {
        "waves": n_waves,
        "held": sum(held), "catchable": catchable * n_waves,
        "per_wave": held,
        "waves_below_90pct": sum(h < 0.9 * catchable for h in held),
        "waves_below_half": sum(h < 0.5 * catchable for h in held),
        "worst_wave": min(held) if held else 0,
        "ham_sent": len(ham), "ham_held": sum(o.held for o in ham),
        "ham_deferred": sum(400 <= o.code < 500 for o in ham),
        "ham_refused_line_too_long": sum(o.code == 500 and "Line too long" in o.reply for o in ham),
    }


def cost(sends: list[sa.Send]) -> dict[str, float]:
    """Median CPU ms (of 3 passes) per 10 KB for fingerprints(), and per message for in-memory linking."""
    parsed = [parse_message(s.raw) for s in sends]
    per10k = sum(len(s.raw) for s in sends) / 10240
    fp_runs, link_runs = [], []
    for _ in range(3):
        start = time.process_time()
        fps = [fingerprints(p) for p in parsed]
        fp_runs.append((time.process_time() - start) / per10k * 1e3)
        seen = [sighting(f, subject_skeleton(p.subject), p.url_hosts) for f, p in zip(fps, parsed, strict=True)]
        window, start = MemoryWindow(), time.process_time()
        for i, one in enumerate(seen):
            if one:
                window.link_now("r:", one, 600, 1000.0 + i * 0.01)
        link_runs.append((time.process_time() - start) / len(sends) * 1e3)
    return {"fingerprints_ms_per_10kb": round(statistics.median(fp_runs), 3),
            "link_ms_per_message": round(statistics.median(link_runs), 3),
            "mean_kib": round(per10k * 10 / len(sends), 1)}


def legit_waves(ham: list[sa.Mail], rng: random.Random) -> list[sa.Send]:
    """A real newsletter (the first dev ham message with List-Unsubscribe) sent as 100 copies by a
    configured bulk sender, and 100 copies with a trusted List-Id from another sender."""
    doc = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())
    bulk = next(e for e in doc["lists"]["bulk_senders"] if e.startswith("*@")).replace("*", "news")
    trusted = doc["lists"].get("trusted_list_ids", ["news.example.org"])[0]
    letter = next(m for m in ham if b"\nList-Unsubscribe:" in m.raw)
    first = [sa.Send(bulk, s.recipient, s.raw, -1, s.copy) for s in sa.wave([letter], 90, rng, COPIES)]
    tagged = sa.with_header(letter, "List-Id", f"News <{trusted}>")
    second = [sa.Send("news@mailer.example.net", s.recipient, s.raw, -2, s.copy)
              for s in sa.wave([tagged], 91, rng, COPIES)]
    return first + second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waves", type=int, default=0, help="only the first N campaigns (default: all)")
    ap.add_argument("--ham", type=int, default=0, help="only N ham messages, spread over the corpus (default: all)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    directory = sa.corpus_dir()
    spam, ham = sa.load(directory, "spam"), sa.load(directory, "ham")
    found = sa.campaigns(directory, spam)
    chosen = found[: args.waves] if args.waves else found
    ham_used = ham[:: max(1, len(ham) // args.ham)][: args.ham] if args.ham else ham
    limit = threshold()
    print(f"corpus {directory}: {len(spam)} spam, {len(ham)} ham; {len(found)} campaigns of >= {sa.MIN_VARIANTS} "
          f"variants ({sum(map(len, found))} messages); using {len(chosen)} waves x {COPIES}, {len(ham_used)} ham; "
          f"threshold {limit}")
    results: dict[str, Any] = {}
    for label, extra in (("as_sent", ()), ("with_headers", sa.EXEMPTION_HEADERS)):
        rng = random.Random(args.seed)
        waves = [sa.wave(c, i, rng, COPIES, extra) for i, c in enumerate(chosen)]
        sends = sa.schedule([*waves, sa.ham_sends(ham_used)], rng)
        outcomes, seconds = run_guard(sends)
        results[label] = {**summarise(outcomes, len(chosen), limit), "messages": len(sends),
                          "seconds": round(seconds, 1)}
        r = results[label]
        print(f"\n[{label}] {r['messages']} messages in {r['seconds']} s")
        print(f"  held {r['held']} of {r['catchable']} copies past the threshold "
              f"({r['held'] / r['catchable']:.1%}); waves under 90 %: {r['waves_below_90pct']}, under half: "
              f"{r['waves_below_half']}; worst wave {r['worst_wave']}")
        print(f"  per wave: {r['per_wave']}")
        print(f"  ham held {r['ham_held']} of {r['ham_sent']} (deferred {r['ham_deferred']}; refused by SMTP for "
              f"lines over 1000 octets {r['ham_refused_line_too_long']})")
        if label == "as_sent":
            results["cost"] = cost(sends)
            c = results["cost"]
            print(f"  cost in this process, {c['mean_kib']} KiB mean: fingerprints() "
                  f"{c['fingerprints_ms_per_10kb']} ms per 10 KB; linking (memory) {c['link_ms_per_message']} ms "
                  "per message")
    outcomes, _ = run_guard(legit_waves(ham, random.Random(args.seed)))
    results["legit"] = {
        "bulk_sender_held": sum(o.held for o in outcomes if o.send.wave == -1),
        "trusted_list_id_held": sum(o.held for o in outcomes if o.send.wave == -2),
        "copies_each": COPIES,
    }
    print(f"\n[legit] held: bulk sender {results['legit']['bulk_sender_held']} of {COPIES}, "
          f"trusted List-Id {results['legit']['trusted_list_id_held']} of {COPIES}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
