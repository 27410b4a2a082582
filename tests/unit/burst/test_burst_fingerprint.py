"""Fingerprints: one campaign with hash-busters shares keys; distinct mail does not."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from queueguard.burst.fingerprint import (
    BANDS,
    body_keys,
    fingerprints,
    fold,
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


def _spell(text: str, every: int, swap: dict[str, str]) -> str:
    """Every `every`-th word of `text` with its letters swapped as given."""
    words = text.split(" ")
    return " ".join("".join(swap.get(c, c) for c in w) if i % every == 0 else w for i, w in enumerate(words))


@pytest.mark.parametrize("disguise", [
    {c: c + "\u200b" for c in "aeiou"},  # zero-width spaces inside words
    {"e": "\u00ade", "o": "o\u2060"},  # soft hyphens, word joiners
    {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441"},  # Cyrillic look-alikes
    {"o": "\u03bf", "i": "\u03b9"},  # Greek look-alikes
    {c: chr(ord(c) + 0xFEE0) for c in "abcdefghijklmnopqrstuvwxyz"},  # fullwidth letters
    {"e": "\u00e9", "a": "a\u0301"},  # accents, precomposed and combining
])
def test_letters_disguised_per_copy_read_as_the_same_words(disguise: dict[str, str]) -> None:
    """Each copy disguised differently (every 2nd, 3rd or 5th word) is still the same text."""
    for every in (2, 3, 5):
        assert shared_bands(BODY, _spell(BODY, every, disguise)) == BANDS, (disguise, every)


def test_a_word_spelled_out_is_the_word() -> None:
    spaced = BODY.replace("exclusive", "e x c l u s i v e").replace("harbour", "h.a.r.b.o.u.r")
    assert shared_bands(BODY, spaced) == BANDS
    assert fold("I am a b c fine, J. R. R. Tolkien in the U.S.A.") == "I am a b c fine, J. R. R. Tolkien in the U.S.A."
