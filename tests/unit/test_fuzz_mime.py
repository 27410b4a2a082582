"""Fuzz: the MIME parser and the fingerprints never raise on mutated real-shaped messages.

queueguard/mime.py promises that nothing in it raises (spam is malformed on purpose), and the
burst check fingerprints every message it parses; an exception there would cost the sender a
451 for a message that is merely odd. Seeds and mutations: tests/fuzzcases.py. The number of
inputs is bounded (FUZZ_EXAMPLES, ~10 s) and recorded in docs/reliability.md; `QG_FUZZ_EXAMPLES`
raises it for a longer local run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings

from queueguard.burst.fingerprint import fingerprint_dict, fingerprints
from queueguard.mime import parse_message
from tests.fuzzcases import SEEDS, mutated

FUZZ_EXAMPLES = int(os.environ.get("QG_FUZZ_EXAMPLES", "2000"))
TRIED: list[int] = []


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_parse_and_fingerprint_never_raise(raw: bytes) -> None:
    TRIED.append(len(raw))
    parsed = parse_message(raw, max_text=50_000, max_parts=50)
    keys = fingerprints(parsed)
    flat = fingerprint_dict(parsed)
    assert set(flat) <= {"body", "subject", "url_hosts", "attachment"}
    assert all(isinstance(k, str) for kind in ("body", "subject", "url_hosts", "attachment") for k in keys.keys(kind))


def test_the_fuzzer_ran_and_the_seeds_parse() -> None:
    """The property above ran its inputs (not skipped, not all trivially short), and every
    unmutated seed yields text, an attachment or a named defect: the fuzzer starts from messages the
    parser makes something of."""
    assert len(TRIED) >= min(FUZZ_EXAMPLES, 1000) and max(TRIED) > 1000, (len(TRIED), max(TRIED, default=0))
    for raw in SEEDS:
        parsed = parse_message(raw)
        assert parsed.text or parsed.attachments or parsed.defects, raw[:200]
