"""Campaigns: copies that are each similar to some earlier copy add up to one wave.

Real spam campaigns send several variants (reworded paragraphs, another subject, other links) and
vary every copy (hash-busters), so counting exact LSH band hits splits a wave into small counts.
Here every message of a `body` rule is linked to the campaign of the earlier messages it resembles,
and the rule counts the campaign.

A message is a *sighting*: its 64-bin MinHash signature (16 bits a bin) and its keys. Candidate
earlier messages come from 32 LSH bands of 2 bins (two messages with Jaccard J share one with
probability 1-(1-J^2)^32: 99.6 % at J=0.4, so even loose variants meet), and each candidate is
verified on the whole signature:
- similarity >= SAME (0.7): the same *variant* (a copy with hash-busters); it joins that variant;
- similarity >= SIMILAR (0.4): another variant of the same campaign, linked only when both this
  message's variant and the candidate's were each seen at least twice (REPEATS).
A resemblance seen before both sides repeated is remembered by the variant (up to PENDING) and
takes effect once both have: link keys point at the last LINK_DEPTH variants that carried them,
so the early evidence may not be found again.

The repeat rule is what keeps ham out: a campaign repeats each variant, while distinct mail
that shares boilerplate (a mailing list's footer under short posts, a quoted thread, a company
disclaimer) never repeats, so it cannot chain into a wave however much it resembles its
neighbours. Measured on the SpamAssassin dev corpus (docs/benchmarks.md): without the repeat
rule footers chain list posts into groups of 72 and 43 and 21 ham messages join spam campaigns;
with it the largest group of ham is 9 (a daily newsletter), none joins spam, and every campaign
links whole.

Signals a campaign keeps constant link variants the same way (as SIMILAR evidence, under the
repeat rule): an identical attachment, and the same subject skeleton with the same set of linked
registrable domains. A message with too little text for a signature (image spam, an attachment
and a line) is one variant per exact (subject skeleton, link domains, attachments) shape, if it
has links or attachments at all.

When a message links several campaigns they merge into the earliest (its id and first-seen time
stay; counts add up). The id is assigned on first sight, so the quarantine can name the campaign
and delete it in one command. The functions here are pure; window.py keeps the state, in memory
and in Redis (campaign.lua, which applies the same rules atomically).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from queueguard.burst.fingerprint import Fingerprints, registrable_domain

LINK_BANDS = 32
SAME = 0.7
SIMILAR = 0.4
REPEATS = 2
PENDING = 4
"""Resemblances a variant remembers from before it repeated (so a link found early is not lost)."""
LINK_DEPTH = 3
"""Variants a link key remembers, newest first: variants of one campaign share most band keys, so
with one a borderline copy could only ever meet the variant that wrote the key last."""
"""Resemblances a variant remembers from before it repeated (so a link found early is not lost)."""
SIGNATURE_BYTES = 128
"""64 bins x 16 bits: enough to estimate Jaccard (a false equal bin has probability 2^-16)."""

TEXT, SIMILAR_TEXT, SHAPE, ATTACHMENT, SUBJECT_LINKS = "text", "similar-text", "shape", "attachment", "subject+links"
SIGNALS = (TEXT, SIMILAR_TEXT, SHAPE, ATTACHMENT, SUBJECT_LINKS)


@dataclass(frozen=True)
class Sighting:
    """What the campaign store needs of one message.

    `variant_keys` find earlier copies of the same variant (band keys, verified on the signature;
    or one exact shape key when there is no signature); `signal_keys` (name, key) find other
    variants by a constant signal.
    """

    signature: bytes
    variant_keys: tuple[str, ...]
    signal_keys: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.variant_keys)


@dataclass(frozen=True)
class Campaign:
    """A campaign as the store knows it after counting one more message."""

    id: str
    first_seen: float
    count: int
    variants: int
    signals: tuple[str, ...]

    def as_dict(self) -> dict[str, str]:
        """Flat form for ctx.fingerprints (the quarantine turns it back into a mapping)."""
        return {"campaign": self.id, "campaign_first_seen": f"{self.first_seen:.3f}",
                "campaign_count": str(self.count), "campaign_variants": str(self.variants),
                "campaign_signals": " ".join(self.signals)}


def link_keys(signature: bytes) -> tuple[str, ...]:
    """'lNN:xxxxyyyy': band NN holds bins NN and NN+32 (bins far apart: densified bins rarely pair)."""
    if not signature:
        return ()
    h = signature.hex()
    return tuple(f"l{b:02d}:{h[4 * b:4 * b + 4]}{h[4 * (b + LINK_BANDS):4 * (b + LINK_BANDS) + 4]}"
                 for b in range(LINK_BANDS))


def similarity(a: bytes, b: bytes) -> float:
    """Share of equal bins: an estimate of the Jaccard similarity of the two shingle sets."""
    if not a or len(a) != len(b):
        return 0.0
    va, vb = memoryview(a).cast("H"), memoryview(b).cast("H")
    return sum(map(int.__eq__, va, vb)) / len(va)


def _short(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def sighting(fps: Fingerprints, subject_skeleton: str, url_hosts: Iterable[str]) -> Sighting:
    """The sighting of a message for a `body` rule; falsy when it has nothing to link by."""
    domains = " ".join(sorted({registrable_domain(h) for h in url_hosts if h}))
    attachments = [k for k in fps.attachment]
    signals: list[tuple[str, str]] = [(ATTACHMENT, k) for k in attachments]
    if subject_skeleton and domains:
        signals.append((SUBJECT_LINKS, f"sl:{_short(subject_skeleton + '|' + domains)}"))
    if fps.signature:
        return Sighting(fps.signature, link_keys(fps.signature), tuple(signals))
    if not (domains or attachments):
        return Sighting(b"", ())  # a subject alone is too common among short notes to count by
    shape = f"x:{_short('|'.join([subject_skeleton, domains, *attachments]))}"
    return Sighting(b"", (shape,), tuple(signals))


def verdict(signature: bytes, candidate: bytes) -> str | None:
    """TEXT (same variant), SIMILAR_TEXT (another variant), or None, for a band-key candidate.
    Without signatures on both sides the key itself was exact: the same shape."""
    if not signature and not candidate:
        return SHAPE
    j = similarity(signature, candidate)
    if j >= SAME:
        return TEXT
    if j >= SIMILAR:
        return SIMILAR_TEXT
    return None


def may_link(own_copies: int, their_copies: int) -> bool:
    """Variants link by similarity or a constant signal only once each was seen REPEATS times."""
    return own_copies >= REPEATS and their_copies >= REPEATS
