"""Fingerprints: one campaign with hash-busters shares keys; distinct mail does not."""

from __future__ import annotations

import random
from collections import Counter

from queueguard.burst.fingerprint import (
    BANDS,
    body_keys,
    fingerprints,
    registrable_domain,
    subject_skeleton,
    url_host_keys,
)
from queueguard.mime import parse_message
from queueguard.replay.corpus import campaign, distinct

BODY = (
    "Congratulations, you have been selected for our exclusive reward programme. "
    "Your brand new mini cooper is waiting at the harbour depot for collection. "
    "To claim the car you only need to confirm your shipping address and pay the small handling fee. "
    "The offer expires at midnight and cannot be extended for any reason whatsoever. "
    "Thousands of happy winners have already collected their prizes this season."
)


def shared_bands(a: str, b: str) -> int:
    return len(set(body_keys(a)) & set(body_keys(b)))


def test_identical_bodies_share_every_band() -> None:
    assert len(body_keys(BODY)) == BANDS
    assert shared_bands(BODY, BODY) == BANDS


def test_numbers_random_tokens_and_names_do_not_matter() -> None:
    busted = (
        "Dear Xk7Pq2, "
        + BODY.replace("midnight", "midnight 23:59 ref 88412")
        + " qzxwvb 1a2b3c4d5e6f7a8b9c0d zzzkkkxxx"
    )
    assert shared_bands(BODY, busted) >= BANDS // 2


def test_reordered_sentences_and_paragraphs_match() -> None:
    sentences = [s.strip() + "." for s in BODY.split(".") if s.strip()]
    rng = random.Random(5)
    rng.shuffle(sentences)
    assert shared_bands(BODY, "\n\n".join(sentences)) == BANDS


def test_html_and_wrapped_text_versions_match() -> None:
    import textwrap

    html = "<html><body>" + "".join(f"<p>{s}.</p>" for s in BODY.split(".") if s.strip()) + "</body></html>"
    text_raw = ("Content-Type: text/plain\n\n" + textwrap.fill(BODY, 60)).encode()
    html_raw = ("Content-Type: text/html\n\n" + html).encode()
    a, b = fingerprints(parse_message(text_raw)), fingerprints(parse_message(html_raw))
    assert len(set(a.body) & set(b.body)) >= BANDS - 2


def test_generated_campaign_is_one_cluster() -> None:
    copies = campaign(random.Random(7), "c", 80)
    counts = Counter(k for s in copies for k in fingerprints(parse_message(s.raw)).body)
    # the most shared band key is carried by (nearly) every copy
    assert counts.most_common(1)[0][1] >= 76


def test_distinct_messages_share_no_band() -> None:
    mails = distinct(random.Random(8), 400)
    counts = Counter(k for s in mails for k in fingerprints(parse_message(s.raw)).body)
    assert counts.most_common(1)[0][1] <= 2


def test_short_body_has_no_body_fingerprint() -> None:
    assert body_keys("Thanks, see you tomorrow.") == ()
    assert body_keys("") == ()


def test_subject_skeleton_drops_prefixes_numbers_and_tokens() -> None:
    assert subject_skeleton("Re: FWD: Your Mini Cooper #48213 is waiting xK9q2") == "your mini cooper is waiting"
    assert subject_skeleton("12345") == ""


def test_url_hosts_collapse_random_subdomains() -> None:
    assert registrable_domain("a8f3.track.spam.example") == "spam.example"
    assert registrable_domain("shop.example.co.uk") == "example.co.uk"
    assert url_host_keys(["x1.spam.example", "y2.spam.example"]) == url_host_keys(["spam.example"])
    assert url_host_keys([]) == ()


def test_fingerprints_are_stable_across_processes() -> None:
    """Band keys use crc32/blake2b, never Python's salted hash(): MX hosts sharing Redis must agree."""
    import subprocess
    import sys

    code = "from queueguard.burst.fingerprint import body_keys; import sys; print(body_keys(sys.argv[1])[0])"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code, BODY], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {body_keys(BODY)[0] + "\n"}
