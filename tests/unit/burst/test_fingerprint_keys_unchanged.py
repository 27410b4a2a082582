"""Fingerprinting was made cheaper (shingles from one big-int multiplication, a shortcut for text
without words, the subject skeleton taken once): MX hosts sharing Redis and a rolling upgrade need
every key byte-identical to what the code gave before, so each is compared with the code as it was.

The `ref_*` functions are that code, renamed, bodies verbatim; only the large tables (stop words,
look-alikes, invisible characters, densification donors) are the module's own."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import re
import struct
import unicodedata
import zlib
from collections.abc import Iterable

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import spamassassin as sa
from queueguard.burst import check as check_module
from queueguard.burst import fingerprint as fp
from queueguard.burst import window as window_module
from queueguard.burst.campaign import Sighting, sighting
from queueguard.burst.check import BurstCheck
from queueguard.burst.window import MemoryWindow
from queueguard.mime import ParsedMessage, parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.stage import MessageContext

REF_K1 = 0xC2B2AE3D27D4EB4F
REF_K2 = 0x165667B19E3779F9
REF_K3 = 0x9E3779B97F4A7C15
REF_MASK64 = (1 << 64) - 1
REF_VALUE_MASK = (1 << 58) - 1
REF_EMPTY = REF_VALUE_MASK + 1
REF_MIX = 0x9E3779B97F4A7C15
REF_DROP = -1
REF_BREAK = -2
REF_BREAK_CHARS = frozenset(".!?\n")
REF_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?")
REF_TOKEN_RE = re.compile(r"(?:https?://|www\.)\S+|\w+(?:['\u2019]\w+)?|[.!?]+(?=\s|$)|\n[^\S\n]*\n")
REF_VOWEL_RE = re.compile("[aeiouyäöüàáâèéêìíîòóôùúûåæø]", re.I)
REF_SUBJECT_PREFIX_RE = re.compile(r"^(?:\s*(?:re|fw|fwd|aw|wg|sv|vs|tr)\s*(?:\[\d+\])?\s*:)+", re.I)
REF_SPACED = re2.compile(r"\b(?:\pL[ .*_-]){3,}\pL\b")


def ref_keep(token: str) -> bool:
    if len(token) > 20 or not token.replace("'", "").replace("\u2019", "").isalpha():
        return False
    if len(token) >= 4 and token.isascii() and not REF_VOWEL_RE.search(token):
        return False
    rest = token[1:]
    return rest == rest.lower() or token.isupper()


def ref_unspace(m: re2._Match[str]) -> str:
    return m.group()[::2]


def ref_fold(text: str) -> str:
    if not text.isascii():
        text = fp._INVISIBLE.sub("", unicodedata.normalize("NFKD", text)).translate(fp._LOOKALIKES)
    return REF_SPACED.sub(ref_unspace, text)


def ref_normalise_tokens(text: str) -> list[str]:
    return [t.lower() for t in REF_WORD_RE.findall(ref_fold(text)) if ref_keep(t)]


def ref_token_value(token: str) -> int:
    return REF_BREAK if token[0] in REF_BREAK_CHARS else ref_token_hash(token)


def ref_token_hash(token: str) -> int:
    if not ref_keep(token):
        return REF_DROP
    low = token.lower()
    return (zlib.crc32(low.encode()) << 1) | (low in fp.STOP_WORDS)


def ref_shingle_hashes(text: str) -> set[int]:
    hs = [h for h in map(ref_token_value, REF_TOKEN_RE.findall(ref_fold(text).replace("_", "\0"))) if h != REF_DROP]
    return {
        (a * REF_K1 + b * REF_K2 + c * REF_K3) & REF_MASK64
        for a, b, c in zip(hs, hs[1:], hs[2:], strict=False)
        if (a | b | c) >= 0 and not (a & b & c & 1)
    }


def ref_minhash(hashes: Iterable[int]) -> list[int]:
    ordered = sorted(hashes)
    if len(ordered) < 8:
        return []
    bins = [REF_EMPTY] * 64
    shift = 64 - 6
    for b in range(64):
        i = bisect.bisect_left(ordered, b << shift)
        if i < len(ordered) and ordered[i] >> shift == b:
            bins[b] = ordered[i] & REF_VALUE_MASK
    for i in range(64):
        if bins[i] == REF_EMPTY:
            for j in fp._DONORS[i]:
                if bins[j] != REF_EMPTY:
                    bins[i] = (bins[j] * REF_MIX + i) & REF_VALUE_MASK
                    break
    return bins


def ref_band_keys(signature: list[int]) -> tuple[str, ...]:
    return tuple(
        f"b{band:02d}:{(a * REF_K1 ^ b * REF_K2 ^ c * REF_K3 ^ d) & REF_MASK64:016x}"
        for band, (a, b, c, d) in enumerate(zip(*(signature[r * 16:(r + 1) * 16] for r in range(4)), strict=True))
    )


def ref_pack_signature(bins: list[int]) -> bytes:
    return struct.pack(f">{len(bins)}H", *(b & 0xFFFF for b in bins)) if bins else b""


def ref_subject_skeleton(subject: str) -> str:
    return " ".join(ref_normalise_tokens(REF_SUBJECT_PREFIX_RE.sub("", subject)))


def ref_short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def ref_subject_keys(subject: str) -> tuple[str, ...]:
    skeleton = ref_subject_skeleton(subject)
    return (f"s:{ref_short_hash(skeleton)}",) if skeleton else ()


def ref_registrable_domain(host: str) -> str:
    labels = host.rstrip(".").lower().split(".")
    if len(labels) >= 3 and len(labels[-1]) <= 3 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def ref_url_host_keys(hosts: Iterable[str]) -> tuple[str, ...]:
    domains = sorted({ref_registrable_domain(h) for h in hosts if h})
    return (f"u:{ref_short_hash(' '.join(domains))}",) if domains else ()


def ref_attachment_keys(parsed: ParsedMessage) -> tuple[str, ...]:
    return tuple(sorted({f"a:{a.sha256[:32]}" for a in parsed.attachments if a.size}))


def ref_fingerprints(parsed: ParsedMessage) -> fp.Fingerprints:
    signature = ref_minhash(ref_shingle_hashes(parsed.text))
    return fp.Fingerprints(
        body=ref_band_keys(signature) if signature else (),
        subject=ref_subject_keys(parsed.subject),
        url_hosts=ref_url_host_keys(parsed.url_hosts),
        attachment=ref_attachment_keys(parsed),
        signature=ref_pack_signature(signature),
    )


def load_generator_body(lines: int = 52) -> str:
    """What Postfix's smtp-source sends with -l 4096 (the load the proxy is benchmarked with)."""
    return "".join(f"{i % 10}{'X' * 77}\r\n" for i in range(1, lines)) + "X" * 16 + "\r\n"


@pytest.fixture(scope="module")
def corpus() -> list[ParsedMessage]:
    """The SpamAssassin dev split (bench/spamassassin.py): fails, never skips, without it."""
    directory = sa.corpus_dir()
    mails = sa.load(directory, "spam") + sa.load(directory, "ham")
    assert len(mails) >= 3000
    return [parse_message(m.raw.replace(b"\0", b"")) for m in mails]


def test_every_key_of_real_mail_is_unchanged(corpus: list[ParsedMessage]) -> None:
    with_body = 0
    for parsed in corpus:
        skeleton, ref_skeleton = fp.subject_skeleton(parsed.subject), ref_subject_skeleton(parsed.subject)
        keys, ref_keys = fp.fingerprints(parsed, skeleton), ref_fingerprints(parsed)
        assert (skeleton, keys) == (ref_skeleton, ref_keys), parsed.message_id
        assert fp.fingerprints(parsed) == ref_keys
        assert sighting(keys, skeleton, parsed.url_hosts) == sighting(ref_keys, ref_skeleton, parsed.url_hosts)
        with_body += bool(keys.body)
    assert with_body > 0.9 * len(corpus)


def test_load_generator_message_takes_the_shortcut_and_keeps_its_keys() -> None:
    body = load_generator_body()
    assert fp._wordless(body)
    assert fp.shingle_hashes(body) == ref_shingle_hashes(body) == set()
    raw = ("From: <a@test.example>\r\nTo: <bob@test.example>\r\n\r\n" + body).encode()
    assert fp.fingerprints(parse_message(raw)) == ref_fingerprints(parse_message(raw))
    for word in ("ab", "A", "Xx", "b c d e", "of the", "Ünter", "9,buy,cheap,pills"):  # a word: no shortcut
        assert not fp._wordless(body + word)
    for tail in ("buy cheap pills now and save big money today", "0XX,buy,cheap,pills,now,and,save,big,money",
                 "9,V-i-a-g-r-a,buy,cheap,now,today"):
        worded = body + tail
        assert fp.shingle_hashes(worded) == ref_shingle_hashes(worded) != set()


# Pieces that decide tokens and keys: '_' and NUL, apostrophes, sentence ends, white space and blank
# lines, URLs, spaced-out words, look-alike and accented letters, invisible characters, stop words,
# vowel-less and mixed-case salad, long words, and the load generator's letter-and-digit chunks.
pieces = st.sampled_from([
    "_", "\0", "'", "\u2019", ".", "!", "?", " ", "  ", "\t", "\n", "\r\n", "\n\n", "\r\n\r\n", "\n \n", "\x0b",
    "\x1c", "\u00a0", "\u2028", "http://", "https://ex.example/a_b?c=1 ", "www.", "V i a g r a", "V.i.a.g.r.a",
    "f-r-e-e", "c*a*s*h", "a_b", "l'été", "don't", "x'_y", "word", "Über", "Schön", "мир", "数字", "42", "٣",
    "\u0412\u0456\u0430\u0433\u0440\u0430", "\u0441l\u0456ck", "\uff46\uff55\uff4c\uff4c", "ﬁne",
    "e\u0301", "fr\u200bee", "of\u00adfer", "the", "of the", "let me know", "mini", "cooper", "waiting",
    "xkcdqwrtz", "XXXX", "HELLO", "hELLO", "McDonald", "a" * 21, "1XXXXXXXXX", "X", "x", "7", "0XX9", " a ",
    "A B C D", "1 2 3 4",
])
texts = st.lists(pieces | st.text(max_size=6), max_size=60).map("".join)
filler = st.lists(st.sampled_from(["1XXXXXXXXX", "XXXX", "a9", "99", "X", "ab", " ", "\r\n", "\t", "\x1c",
                                   "\n\n", "Ab", "qqqqq", "Z1"]), max_size=80).map("".join)


@settings(max_examples=1500, deadline=None, database=None)
@given(texts)
def test_shingles_subjects_and_fold_are_unchanged(text: str) -> None:
    assert fp.shingle_hashes(text) == ref_shingle_hashes(text)
    assert fp.subject_skeleton(text) == ref_subject_skeleton(text)
    assert fp.skeleton_keys(fp.subject_skeleton(text)) == ref_subject_keys(text)
    assert fp.fold(text) == ref_fold(text)


@settings(max_examples=1000, deadline=None, database=None)
@given(filler)
def test_text_of_letters_and_digits_only_is_unchanged(text: str) -> None:
    """The texts the shortcut (_wordless) is about, with and without words it must not miss."""
    assert fp.shingle_hashes(text) == ref_shingle_hashes(text)


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.sampled_from(["buy", "cheap", "pills", "now", "the", "of", ".", "\n\n", "x9", "and"]),
                min_size=200, max_size=600).map(" ".join))
def test_long_texts_have_the_same_shingles(text: str) -> None:
    """Hundreds of tokens in one row: no shingle may spill into its neighbour."""
    assert fp.shingle_hashes(text) == ref_shingle_hashes(text)


def ref_check_fingerprints(parsed: ParsedMessage, skeleton: str | None = None) -> fp.Fingerprints:
    return ref_fingerprints(parsed)


async def test_burst_check_results_are_unchanged(corpus: list[ParsedMessage],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """BurstCheck over a stream of real mail, each message sent three times, with body, subject,
    URL and attachment rules: the same hits and the same recorded fingerprints as with the old code."""
    rules = [{"name": f"r-{kind}", "fingerprint": kind, "threshold": "2 in 10m", "exempt_authenticated": False}
             for kind in ("body", "subject", "url_hosts", "attachment")]
    pol = Policy.model_validate({"bursts": rules})
    stream = [p for p in corpus[::7] for _ in range(3)]
    random.Random(3).shuffle(stream)

    def recorded(fps: fp.Fingerprints, skeleton: str, url_hosts: Iterable[str]) -> Sighting:
        seen.append(sighting(fps, skeleton, url_hosts))
        return seen[-1]

    async def run() -> list[tuple[object, ...]]:
        seen.clear()
        ids = itertools.count()
        monkeypatch.setattr(window_module, "new_id", lambda: f"c{next(ids)}")  # ids are random otherwise
        check = BurstCheck(MemoryWindow(), clock=lambda: 1_000_000.0)
        out = []
        for parsed in stream:
            txn = Transaction(Connection(parse_ip("198.51.100.7")), "x@spam.example", recipients=["a@example.org"])
            ctx = MessageContext(txn, b"", pol, parse_message)
            ctx.__dict__["parsed"] = parsed  # parsed once, as the pipeline's cached_property would
            result = await check.on_message(ctx)
            out.append((result.hits, dict(ctx.fingerprints), seen[-1]))
        return out

    seen: list[Sighting] = []
    monkeypatch.setattr(check_module, "sighting", recorded)
    now = await run()
    monkeypatch.setattr(check_module, "fingerprints", ref_check_fingerprints)
    monkeypatch.setattr(check_module, "subject_skeleton", ref_subject_skeleton)
    before = await run()
    assert now == before
    assert sum(len(hits) for hits, _, _ in now) > len(stream) // 3  # (the stream does burst)
