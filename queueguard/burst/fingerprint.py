"""Message fingerprints that survive what spammers do to defeat exact hashes.

Body: MinHash with one-permutation hashing over word 3-shingles, cut into
LSH bands. Why MinHash/LSH and not SimHash: it estimates Jaccard similarity
of shingle *sets*, so reordered paragraphs and sentences change nothing
(shingles are taken within sentences), and each band is a plain string key
that can be counted in a sliding window, in memory or in Redis, exactly like
a rate-limit key — near-duplicates share band keys without any pairwise
comparison or index. SimHash needs Hamming-distance lookups (several permuted
tables) to do the same and is less predictable under insertions.
One-permutation hashing (one hash per shingle, bins by the top bits) keeps the
cost at one hash per shingle instead of one per shingle per permutation.

Normalisation before shingling removes hash-busters: text is folded as a
reader sees it (`fold`: invisible characters, accents, look-alike letters,
spaced-out words); everything is lower-cased; tokens with digits (numbers, prices, random ids), tokens longer
than 20 characters, and letter salad without vowels or with inner capitals
are dropped; sentences split at . ! ? and blank lines, not at line wraps, so
an HTML part and a wrapped text/plain part of the same body give the same
sentences. Shingles made only of stop words are dropped so that stock phrases
("let me know if you have any questions") do not tie unrelated mail.

Every function is pure and deterministic across processes and hosts (crc32
and blake2b, never Python's randomised hash) so MX hosts sharing Redis agree.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
import re
import struct
import sys
import unicodedata
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress

import re2

from queueguard.mime import ParsedMessage

BINS = 64
ROWS = 4
BANDS = BINS // ROWS
SHINGLE = 3
MIN_SHINGLES = 8
"""Bodies with fewer distinct shingles have no body fingerprint: too little text to judge."""

_BIN_BITS = 6
_VALUE_MASK = (1 << (64 - _BIN_BITS)) - 1
_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_EMPTY = _VALUE_MASK + 1
_DONORS = tuple(tuple(random.Random(i).sample(range(BINS), BINS)) for i in range(BINS))
"""Per-bin fixed probe order for densification (Shrivastava 2017: random donors, not the neighbour)."""
_K1 = 0xC2B2AE3D27D4EB4F
_K2 = 0x165667B19E3779F9
_K3 = 0x9E3779B97F4A7C15
_SLOT = 16
"""Bytes a token takes in the row shingle_hashes multiplies: its value (under 2**34) little-endian,
then zeros, so that a shingle's a*_K1 + b*_K2 + c*_K3 (under 2**100) never carries into the next."""
_SHINGLE_KERNEL = _K3 | _K2 << (8 * _SLOT) | _K1 << (16 * _SLOT)
"""row * kernel puts a*_K1 + b*_K2 + c*_K3 of the tokens at slots i, i+1, i+2 into slot i+2."""
_SENTENCE_END = 1 << 33
"""A sentence end's value: above every token hash, told apart by byte 4 (a token hash has 0 or 1 there)."""

_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?")
_TOKEN_RE = re.compile(r"(?:https?://|www\.)\S+|\w+(?:['\u2019]\w+)?|[.!?]+(?=\s|$)|\n[^\S\n]*\n")
r"""URLs, words (letters and digits, an apostrophe inside), sentence ends, blank lines. Run on the
text with every '_' made NUL (shingle_hashes), so no word holds '_': what `[^\W_]+` said in place
of `\w+`, at half the cost (a set of categories is tested per character, a category alone is one
test). '_' and NUL are alike to every part of the pattern; a URL keeps a NUL where it had '_',
and URLs are dropped whatever they hold (_keep)."""
_BREAK_CHARS = frozenset(".!?\n")
_DROP = -1
_IS_END = bytes(int(i == _SENTENCE_END >> 32) for i in range(256))
_IS_STOP = bytes(i & 1 for i in range(256))
_IS_ZERO = bytes(int(i == 0) for i in range(256))
"""Byte translations (_shingles): 1 for a sentence end's byte 4, for a stop word's low byte, for 0."""
_ALNUM_OR_SPACE = bytes(i for i in range(128) if chr(i).isalnum() or chr(i).isspace())
_PEEK = 256
"""Characters _wordless looks at before the whole text."""
_VOWEL_RE = re.compile("[aeiouyäöüàáâèéêìíîòóôùúûåæø]", re.I)
_SUBJECT_PREFIX_RE = re.compile(r"^(?:\s*(?:re|fw|fwd|aw|wg|sv|vs|tr)\s*(?:\[\d+\])?\s*:)+", re.I)

STOP_WORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "just",
        "know",
        "let",
        "like",
        "me",
        "more",
        "most",
        "my",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "out",
        "over",
        "own",
        "please",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "thank",
        "thanks",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
    ]
)


@dataclass(frozen=True)
class Fingerprints:
    """All fingerprint keys of one message, each kind a tuple of countable strings."""

    body: tuple[str, ...]
    subject: tuple[str, ...]
    url_hosts: tuple[str, ...]
    attachment: tuple[str, ...]
    signature: bytes = b""
    """The body's MinHash, 16 bits a bin (pack_signature): what campaign linking compares."""

    def keys(self, kind: str) -> tuple[str, ...]:
        """Keys for a BurstRule.fingerprint kind; empty when the message has none of that kind."""
        keys: tuple[str, ...] = getattr(self, kind)
        return keys

    def as_dict(self) -> dict[str, str]:
        """Flat form for quarantine metadata and logs (space-separated keys per kind)."""
        return {
            kind: " ".join(keys) for kind in ("body", "subject", "url_hosts", "attachment") if (keys := self.keys(kind))
        }


def _keep(token: str) -> bool:
    """False for the tokens hash-busters are made of: numbers, ids, letter salad.

    Uses str methods and one regex only: this runs once per distinct word.
    """
    if len(token) > 20 or not token.replace("'", "").replace("\u2019", "").isalpha():
        return False
    if len(token) >= 4 and token.isascii() and not _VOWEL_RE.search(token):
        return False
    rest = token[1:]
    return rest == rest.lower() or token.isupper()


_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
"""Format characters (zero-width spaces and joiners, soft hyphens, direction marks, variation
selectors) and combining marks: inside a word they split it, or make it another word, unseen."""
_LOOKALIKES = str.maketrans(
    "аеорсуххіјѕԁԛԝӏкмнтвАВЕКМНОРСТХУІЈЅαβεικνορτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeopcyxxijsdqwlkmhtbABEKMHOPCTXYIJSabeikvoptuxABEZHIKMNOPTYX")
"""Cyrillic and Greek letters that look like Latin ones, as Latin (a few of UTS #39's confusables)."""
_SPACED = re2.compile(r"\b(?:\pL[ .*_-]){3,}\pL\b")
"""A word written letter by letter (`V i a g r a`, `V.i.a.g.r.a`). RE2: this runs over every
body, and Python's re tries it at every letter (65 µs for a mean corpus message, 10 with RE2)."""


def _unspace(m: re2._Match[str]) -> str:
    return m.group()[::2]


def fold(text: str) -> str:
    """Text as a reader sees its words: look-alike letters, accents, width variants and invisible
    characters a spammer varies per copy all fold to one spelling (NFKD, marks and format
    characters dropped, Cyrillic and Greek look-alikes as Latin), and spaced-out words join.
    Deterministic everywhere (no locale), like everything here; plain ASCII skips the Unicode steps."""
    if not text.isascii():
        text = _INVISIBLE.sub("", unicodedata.normalize("NFKD", text)).translate(_LOOKALIKES)
    return _SPACED.sub(_unspace, text)


def normalise_tokens(text: str) -> list[str]:
    return [t.lower() for t in _WORD_RE.findall(fold(text)) if _keep(t)]


TOKEN_CACHE = 1 << 15
"""Token slots remembered across messages (~6 MB full, measured): words recur from message to message, and
judging a token (_keep) costs more than looking it up; hash-buster tokens are evicted first."""


@functools.lru_cache(maxsize=TOKEN_CACHE)
def _token_slot(token: str) -> bytes:
    """The token's _SLOT bytes in the row shingle_hashes multiplies; b"" drops it from the row."""
    if token[0] in _BREAK_CHARS:
        return _SENTENCE_END.to_bytes(_SLOT, "little")
    h = _token_hash(token)
    return b"" if h == _DROP else h.to_bytes(_SLOT, "little")


def _token_hash(token: str) -> int:
    """crc32 of the lower-cased token shifted left, low bit set for a stop word; _DROP to drop it."""
    if not _keep(token):
        return _DROP
    low = token.lower()
    return (zlib.crc32(low.encode()) << 1) | (low in STOP_WORDS)


def _filler(text: str) -> bool:
    """ASCII letters, digits and white space only (UTF-8 bytes of other characters are never deleted).
    A C loop over bytes: str.isalnum takes 3 ns a character."""
    return not text.encode().translate(None, _ALNUM_OR_SPACE)


def _wordless(text: str) -> bool:
    """True when no token of `text` can be kept, proven without the tokenizer (37 µs for nothing on
    the load generator's 4 KB): ASCII letters, digits and white space only, and _keep drops every
    white-space-separated chunk. Each chunk is then one token (no URL, apostrophe or sentence end),
    and fold changes nothing (a spaced-out word needs a one-letter chunk, and _keep keeps those).
    This costs 9 µs there; real mail fails on its first _PEEK characters (0.7 µs, corpus mean)."""
    return _filler(text[:_PEEK]) and _filler(text) and not any(map(_token_slot, text.split()))


def shingle_hashes(text: str) -> set[int]:
    """64-bit hashes of word 3-shingles taken within sentences.

    One regex pass yields words, URLs (dropped: their tracking parts vary per
    copy) and sentence ends; tokens map through a cache shared by all calls
    (a word is judged and hashed once, not once per message) to byte slots that
    join into one row. Left out: shingles spanning a sentence end, shingles of
    stop words only, and so sentences under three words ("Best regards.").
    """
    if _wordless(text):
        return set()
    return _shingles(b"".join(map(_token_slot, _TOKEN_RE.findall(fold(text).replace("_", "\0")))))


def _shingles(row: bytes) -> set[int]:
    """(a*_K1 + b*_K2 + c*_K3) mod 2**64 of every three consecutive slots of `row` with no
    sentence end and not all stop words. All shingles come from one big-int multiplication and the
    filter from byte strings (C loops); a Python expression per shingle cost more than twice as much
    (99 against 42 µs for a mean corpus message, measured)."""
    n = len(row) // _SLOT
    if n < SHINGLE:
        return set()
    sums = array("Q", (int.from_bytes(row, "little") * _SHINGLE_KERNEL).to_bytes(_SLOT * (n + 2), "little"))
    if sys.byteorder == "big":
        sums.byteswap()
    ends = int.from_bytes(row[4::_SLOT].translate(_IS_END), "little")
    stops = int.from_bytes(row[::_SLOT].translate(_IS_STOP), "little")
    dropped = ends | ends >> 8 | ends >> 16 | (stops & stops >> 8 & stops >> 16)
    kept = dropped.to_bytes(n, "little")[:n - 2].translate(_IS_ZERO)
    return set(compress(sums[4:2 * n:2], kept))


def minhash(hashes: Iterable[int]) -> list[int]:
    """One-permutation MinHash: BINS minima, empty bins filled from a non-empty donor bin.

    The bin is the top bits of a hash, so in sorted order each bin's minimum is
    the first hash at or above the bin's start: BINS bisections instead of a
    Python-level loop over every shingle. Returns [] when there are fewer than
    MIN_SHINGLES items.
    """
    ordered = sorted(hashes)
    if len(ordered) < MIN_SHINGLES:
        return []
    bins = [_EMPTY] * BINS
    shift = 64 - _BIN_BITS
    for b in range(BINS):
        i = bisect.bisect_left(ordered, b << shift)
        if i < len(ordered) and ordered[i] >> shift == b:
            bins[b] = ordered[i] & _VALUE_MASK
    for i in range(BINS):  # densification: an empty bin borrows from a pseudo-random donor
        if bins[i] == _EMPTY:
            for j in _DONORS[i]:
                if bins[j] != _EMPTY:
                    bins[i] = (bins[j] * _MIX + i) & _VALUE_MASK
                    break
    return bins


def band_keys(signature: list[int]) -> tuple[str, ...]:
    """LSH band keys 'bNN:<hex>': two messages share a band with probability about J**ROWS.

    A band takes bins BANDS apart, so bins filled from one donor rarely land in the same band.
    Its rows (MinHash values, already uniform) are folded arithmetically, not through blake2b:
    the same keys on every host at a fifth of the cost.
    """
    return tuple(
        f"b{band:02d}:{(a * _K1 ^ b * _K2 ^ c * _K3 ^ d) & _MASK64:016x}"
        for band, (a, b, c, d) in enumerate(zip(*(signature[r * BANDS:(r + 1) * BANDS] for r in range(ROWS)),
                                                strict=True))
    )


def body_keys(text: str) -> tuple[str, ...]:
    signature = minhash(shingle_hashes(text))
    return band_keys(signature) if signature else ()


def pack_signature(bins: list[int]) -> bytes:
    """The low 16 bits of each MinHash bin, big-endian: the same bytes on every host."""
    return struct.pack(f">{len(bins)}H", *(b & 0xFFFF for b in bins)) if bins else b""


def subject_skeleton(subject: str) -> str:
    """Subject without reply prefixes, numbers, ids, punctuation and case ("" at once for none)."""
    return " ".join(normalise_tokens(_SUBJECT_PREFIX_RE.sub("", subject))) if subject else ""


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def skeleton_keys(skeleton: str) -> tuple[str, ...]:
    return (f"s:{_short_hash(skeleton)}",) if skeleton else ()


def registrable_domain(host: str) -> str:
    """Last two labels (three under a short second-level like co.uk): random subdomains collapse."""
    labels = host.rstrip(".").lower().split(".")
    if len(labels) >= 3 and len(labels[-1]) <= 3 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def url_host_keys(hosts: Iterable[str]) -> tuple[str, ...]:
    domains = sorted({registrable_domain(h) for h in hosts if h})
    return (f"u:{_short_hash(' '.join(domains))}",) if domains else ()


def attachment_keys(parsed: ParsedMessage) -> tuple[str, ...]:
    return tuple(sorted({f"a:{a.sha256[:32]}" for a in parsed.attachments if a.size}))


def fingerprints(parsed: ParsedMessage, skeleton: str | None = None) -> Fingerprints:
    """`skeleton`: subject_skeleton(parsed.subject), when the caller needs it too (BurstCheck)."""
    signature = minhash(shingle_hashes(parsed.text))
    return Fingerprints(
        body=band_keys(signature) if signature else (),
        subject=skeleton_keys(subject_skeleton(parsed.subject) if skeleton is None else skeleton),
        url_hosts=url_host_keys(parsed.url_hosts),
        attachment=attachment_keys(parsed),
        signature=pack_signature(signature),
    )


def fingerprint_dict(parsed: ParsedMessage) -> dict[str, str]:
    """What the pipeline passes to QuarantineStore.put as `fingerprints`."""
    return fingerprints(parsed).as_dict()
