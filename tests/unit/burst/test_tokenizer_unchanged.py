"""The body tokenizer was made faster (`\\w+` on the text with '_' as NUL, for `[^\\W_]+`): every
host of a cluster must keep computing the same fingerprints across the upgrade, so the shingles
must be exactly what the old tokenizer gave, for any text."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from queueguard.burst import fingerprint as fp
from tests.unit.burst.test_fingerprint_keys_unchanged import (
    REF_DROP,
    REF_K1,
    REF_K2,
    REF_K3,
    REF_MASK64,
    ref_fold,
    ref_token_value,
)

OLD_TOKEN_RE = re.compile(r"(?:https?://|www\.)\S+|[^\W_]+(?:['\u2019][^\W_]+)?|[.!?]+(?=\s|$)|\n[^\S\n]*\n")
"""The tokenizer as it was before, verbatim."""


def old_shingle_hashes(text: str) -> set[int]:
    hs = [h for h in map(ref_token_value, OLD_TOKEN_RE.findall(ref_fold(text))) if h != REF_DROP]
    return {
        (a * REF_K1 + b * REF_K2 + c * REF_K3) & REF_MASK64
        for a, b, c in zip(hs, hs[1:], hs[2:], strict=False)
        if (a | b | c) >= 0 and not (a & b & c & 1)
    }


# What decides a token's bounds, often: '_' and NUL, apostrophes, sentence ends, space and blank
# lines, URL starts; words made of letters and digits in several scripts.
pieces = st.sampled_from([
    "_", "\0", "'", "\u2019", ".", "!", "?", " ", "\t", "\n", "\n\n", "\n \n", "http://", "https://", "www.",
    "a_b", "l'été", "don't", "x'_y", "__", "word", "Über", "Schön", "мир", "数字", "42", "٣", "e\u0301", "_x_",
])
texts = st.lists(pieces | st.text(max_size=5), max_size=40).map("".join)


@settings(max_examples=1000, deadline=None, database=None)
@given(texts)
def test_shingles_are_the_old_tokenizers(text: str) -> None:
    assert fp.shingle_hashes(text) == old_shingle_hashes(text)


def test_words_joined_by_underscores_are_still_split_there() -> None:
    text = "please_click_here now to claim_your_prize today, really_do it. " * 3
    assert fp.shingle_hashes(text) == old_shingle_hashes(text) != set()
