"""Campaign linking (campaign.py's rules in MemoryWindow.link_now; test_burst_redis.py checks Redis does the
same): copies join their variant, variants link once both repeated, unique look-alikes never chain.

Signatures are built directly (a share of equal bins is the similarity the rules look at), so each
case states the similarity it tests; tests/integration/test_burst_real.py does the same on real mail.
"""

from __future__ import annotations

import random

from queueguard.burst.campaign import (
    ATTACHMENT,
    SAME,
    SHAPE,
    SIMILAR,
    SIMILAR_TEXT,
    TEXT,
    Sighting,
    link_keys,
    sighting,
    similarity,
)
from queueguard.burst.fingerprint import Fingerprints
from queueguard.burst.window import MemoryWindow

BINS = 64


def signature(rng: random.Random) -> list[int]:
    return [rng.getrandbits(16) for _ in range(BINS)]


def like(base: list[int], share: float, rng: random.Random) -> list[int]:
    """A signature with `share` of its bins equal to base's (the rest new)."""
    keep = set(rng.sample(range(BINS), round(share * BINS)))
    return [b if i in keep else (b + 1 + rng.getrandbits(15)) & 0xFFFF for i, b in enumerate(base)]


def seen(bins: list[int], *signals: tuple[str, str]) -> Sighting:
    raw = b"".join(b.to_bytes(2, "big") for b in bins)
    return Sighting(raw, link_keys(raw), signals)


def test_similarity_is_the_share_of_equal_bins() -> None:
    rng = random.Random(1)
    base = signature(rng)
    assert similarity(seen(base).signature, seen(like(base, 0.5, rng)).signature) == 0.5
    assert similarity(b"", b"") == 0.0


def test_copies_of_one_variant_are_one_campaign() -> None:
    rng = random.Random(2)
    base, w = signature(rng), MemoryWindow()
    results = [w.link_now("r:", seen(like(base, 0.9, rng)), 600, 1000.0 + i) for i in range(12)]
    assert [c.count for c in results] == list(range(1, 13))
    assert len({c.id for c in results}) == 1 and results[-1].variants == 1 and results[-1].signals == (TEXT,)


def test_variants_link_once_both_were_seen_twice_and_keep_the_first_id() -> None:
    rng = random.Random(3)
    a = signature(rng)
    b = like(a, 0.5, rng)  # another variant: between SIMILAR and SAME
    assert SIMILAR <= 0.5 < SAME
    w = MemoryWindow()
    first = w.link_now("r:", seen(a), 600, 1000.0)
    second = w.link_now("r:", seen(b), 600, 1001.0)
    assert first.id != second.id and second.count == 1  # each seen once: not linked yet
    w.link_now("r:", seen(like(a, 0.95, rng)), 600, 1002.0)
    merged = w.link_now("r:", seen(like(b, 0.95, rng)), 600, 1003.0)
    assert merged.id == first.id and merged.count == 4 and merged.variants == 2
    assert merged.first_seen == 1000.0 and set(merged.signals) == {TEXT, SIMILAR_TEXT}


def test_unique_look_alikes_never_chain() -> None:
    """Distinct posts that share a footer: each resembles the others (similarity 0.5) but none repeats."""
    rng = random.Random(4)
    footer, w = signature(rng), MemoryWindow()
    counts = [w.link_now("r:", seen(like(footer, 0.5, rng)), 600, 1000.0 + i).count for i in range(200)]
    assert max(counts) == 1


def test_a_copy_on_the_edge_of_its_variant_is_not_lost() -> None:
    """A copy just under SAME to the variant's first copy starts a variant of its own; the resemblance
    is remembered, so once that variant repeats it rejoins the campaign."""
    rng = random.Random(5)
    base, w = signature(rng), MemoryWindow()
    for i in range(5):
        camp = w.link_now("r:", seen(like(base, 0.95, rng)), 600, 1000.0 + i)
    edge = like(base, 0.66, rng)
    assert w.link_now("r:", seen(edge), 600, 1010.0).id != camp.id
    again = w.link_now("r:", seen(like(edge, 0.97, rng)), 600, 1011.0)
    assert again.id == camp.id and again.count == 7


def test_the_window_forgets() -> None:
    rng = random.Random(6)
    base, w = signature(rng), MemoryWindow()
    for i in range(5):
        w.link_now("r:", seen(base), 600, 1000.0 + i)
    later = w.link_now("r:", seen(base), 600, 1000.0 + 700)
    assert later.count == 1


def test_messages_without_text_count_by_shape_and_constant_signals_link_variants() -> None:
    fps = Fingerprints(body=(), subject=(), url_hosts=(), attachment=("a:" + "ab" * 16,))
    image = sighting(fps, "cheap meds", ["img.pharma.example", "www.pharma.example"])
    assert image.variant_keys and image.variant_keys[0].startswith("x:") and not image.signature
    assert not sighting(Fingerprints((), (), (), ()), "lunch today", [])  # a subject alone is not enough
    w = MemoryWindow()
    counts = [w.link_now("r:", image, 600, 1000.0 + i) for i in range(3)]
    assert [c.count for c in counts] == [1, 2, 3] and counts[-1].signals == (SHAPE,)
    # a text variant carrying the same attachment links to the shape's campaign once it repeated
    rng = random.Random(7)
    text = signature(rng)
    with_attachment = [seen(like(text, 0.95, rng), (ATTACHMENT, "a:" + "ab" * 16)) for _ in range(2)]
    linked = [w.link_now("r:", s, 600, 1010.0 + i) for i, s in enumerate(with_attachment)]
    assert linked[-1].id == counts[0].id and linked[-1].count == 5 and ATTACHMENT in linked[-1].signals


def test_rules_keep_their_own_campaigns() -> None:
    rng = random.Random(8)
    base, w = signature(rng), MemoryWindow()
    for i in range(3):
        w.link_now("a:", seen(base), 600, 1000.0 + i)
    assert w.link_now("b:", seen(base), 600, 1003.0).count == 1
