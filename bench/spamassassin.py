"""Real mail for burst detection: the development split of the SpamAssassin public corpus, its spam
campaigns, and waves built from them.

The corpus (spam-2, easy-ham-2, hard-ham-1) is fetched by `../shared/corpus/fetch-dev-corpus.sh`
into a cache outside the repository (the messages are never committed). The blind split of the
same corpus (spam-1, easy-ham-1) is not used here.

How campaigns are found (reproducible, and independent of the detector under test): every spam
message is decoded with the stdlib `email` package (text/* parts; HTML tags, scripts and styles
removed, entities unescaped), lower-cased and cut into words of letters; its shingles are the
distinct runs of 5 consecutive words. Two messages are near-duplicate variants when the Jaccard
similarity of their shingle sets is at least 0.5; campaigns are the connected components of that
relation (single linkage) with at least 5 members. On spam-2 this gives 38 campaigns of 5 to 17
variants (280 messages). None of queueguard's normalisation, hashing or MinHash is involved.

A wave is what one spammer sends: `copies` copies cycling through the campaign's variants in file
order, each with its own Message-ID, To (and envelope recipient) and a line of random letter tokens
at the top of its first text part; with `extra_headers`, each copy also carries List-Unsubscribe,
List-Id, In-Reply-To and/or References (values per copy). Waves and ham are interleaved by
`schedule`, each wave keeping its own order.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import hashlib
import html
import json
import os
import quopri
import random
import re
import string
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FETCH = REPO.parent / "shared" / "corpus" / "fetch-dev-corpus.sh"
SHINGLE_WORDS = 5
VARIANT_JACCARD = 0.5
MIN_VARIANTS = 5
EXEMPTION_HEADERS = ("List-Unsubscribe", "List-Id", "In-Reply-To", "References")
"""The headers a sender writes itself and that used to exempt a message from burst rules."""

_TAG = re.compile(r"<[^>]*>", re.S)
_SCRIPT = re.compile(r"(?is)<(script|style)\b[^>]*>.*?</\1\s*>")
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Mail:
    """One corpus message as an MTA would receive it: CRLF line ends, no mbox `From ` line."""

    name: str
    raw: bytes


@dataclass(frozen=True)
class Send:
    """One message to send: envelope and bytes; `wave` is the campaign index (None for ham)."""

    sender: str
    recipient: str
    raw: bytes
    wave: int | None
    copy: int = 0


def corpus_dir() -> Path:
    """Fetch the development split if needed (the script is idempotent) and return its directory.

    Raises RuntimeError with the script's output when it cannot: a test on real mail must fail
    loudly, never pass on nothing.
    """
    if not FETCH.is_file():
        raise RuntimeError(f"{FETCH} is missing: the corpus script lives in shared/ beside the repository")
    res = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=600)
    lines = res.stdout.strip().splitlines()
    if res.returncode or not lines:
        raise RuntimeError(f"fetching the SpamAssassin dev corpus failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    path = Path(lines[-1])
    if not (path / ".complete").exists():
        raise RuntimeError(f"{path} is not a complete corpus")
    return path


def canonical(raw: bytes) -> bytes:
    """Without the mbox `From ` line, with CRLF line ends (what arrives over SMTP)."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def smtp_safe(raw: bytes) -> bytes:
    """The message as a sending MTA would have to pass it on: parts with lines over 998 octets
    (SMTP's limit; a few corpus messages have them) re-encoded as quoted-printable, content unchanged."""
    if all(len(line) <= 998 for line in raw.split(b"\r\n")):
        return raw
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in msg.walk():
        payload = part.get_payload()
        if part.is_multipart() or not isinstance(payload, str) or all(len(x) <= 998 for x in payload.splitlines()):
            continue
        data = part.get_payload(decode=True)
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(quopri.encodestring(data if isinstance(data, bytes) else b"").decode("ascii"))
    return canonical(msg.as_bytes(policy=email.policy.compat32))


def load(directory: Path, kind: str) -> list[Mail]:
    """`kind` is 'spam' or 'ham'; messages in file-name order, each as an MTA could send it (smtp_safe)."""
    return [Mail(p.name, smtp_safe(canonical(p.read_bytes()))) for p in sorted((directory / kind).iterdir())]


# --- campaigns: the ground truth ----------------------------------------------------------------


def plain_text(raw: bytes) -> str:
    """Decoded text/* parts, HTML reduced to its text: the clustering's own view of a message."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    out = []
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        try:
            text = data.decode(part.get_content_charset() or "latin-1", "replace")
        except LookupError:
            text = data.decode("latin-1")
        if part.get_content_subtype() == "html":
            text = html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", text)))
        out.append(text)
    return " ".join(out)


def word_shingles(text: str, n: int = SHINGLE_WORDS) -> frozenset[str]:
    words = _WORD.findall(text.lower())
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def find_campaigns(spam: Sequence[Mail], threshold: float = VARIANT_JACCARD,
                   min_variants: int = MIN_VARIANTS) -> list[list[Mail]]:
    """Connected components of 'Jaccard over word 5-shingles >= threshold' with >= min_variants
    members, largest first (ties by first file name); members in file-name order."""
    sets = [word_shingles(plain_text(m.raw)) for m in spam]
    parent = list(range(len(spam)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = sorted((i for i, s in enumerate(sets) if s), key=lambda i: len(sets[i]))
    for x, i in enumerate(order):
        for j in order[x + 1 :]:
            if len(sets[i]) < threshold * len(sets[j]):
                break  # sorted by size: J <= |small| / |large| only falls from here on
            if jaccard(sets[i], sets[j]) >= threshold:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(spam)):
        groups.setdefault(root(i), []).append(i)
    found = [sorted(g) for g in groups.values() if len(g) >= min_variants]
    found.sort(key=lambda g: (-len(g), spam[g[0]].name))
    return [[spam[i] for i in g] for g in found]


def campaigns(directory: Path, spam: Sequence[Mail]) -> list[list[Mail]]:
    """find_campaigns, cached beside the corpus (keyed by the file names and the procedure's parameters)."""
    names = [m.name for m in spam]
    key = hashlib.sha256(json.dumps([names, SHINGLE_WORDS, VARIANT_JACCARD, MIN_VARIANTS]).encode()).hexdigest()[:16]
    cache = directory / f"campaigns-{key}.json"
    by_name = {m.name: m for m in spam}
    if cache.exists():
        return [[by_name[n] for n in group] for group in json.loads(cache.read_text())]
    found = find_campaigns(spam)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps([[m.name for m in g] for g in found]))
    tmp.replace(cache)
    return found


# --- waves ----------------------------------------------------------------------------------------


def _token_line(rng: random.Random) -> str:
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 9))) for _ in range(4))


def _prepend_text(part: email.message.Message, line: str) -> None:
    """Put `line` at the top of a text part, keeping its transfer encoding."""
    data = part.get_payload(decode=True)
    body = (line + "\n").encode() + (data if isinstance(data, bytes) else b"")
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte == "base64":
        part.set_payload(base64.encodebytes(body).decode("ascii"))
    elif cte == "quoted-printable":
        part.set_payload(quopri.encodestring(body).decode("ascii"))
    else:
        part.set_payload(body.decode("ascii", "surrogateescape"))


def _replace(msg: email.message.Message, name: str, value: str) -> None:
    del msg[name]
    msg[name] = value


def make_copy(mail: Mail, rng: random.Random, recipient: str, extra_headers: Iterable[str] = ()) -> bytes:
    """One copy of a variant: its own Message-ID, To, a random token line; optional exemption headers."""
    msg = email.message_from_bytes(mail.raw, policy=email.policy.compat32)
    tag = "".join(rng.choices(string.ascii_lowercase + string.digits, k=16))
    _replace(msg, "Message-ID", f"<{tag}@{rng.choice(['mx', 'smtp', 'mail'])}.sender.example>")
    _replace(msg, "To", recipient)
    for name in extra_headers:
        ref = "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))
        values = {
            "List-Unsubscribe": f"<mailto:unsubscribe-{ref}@offers.example>, <http://offers.example/u/{ref}>",
            "List-Id": "Special offers <offers.lists.example>",
            "In-Reply-To": f"<{ref}@mail.example.net>",
            "References": f"<{ref}@mail.example.net>",
        }
        _replace(msg, name, values[name])
    leaf = next((p for p in msg.walk() if not p.is_multipart() and p.get_content_maintype() == "text"), None)
    if leaf is not None:
        _prepend_text(leaf, _token_line(rng))
    return smtp_safe(canonical(msg.as_bytes(policy=email.policy.compat32)))


def with_header(mail: Mail, name: str, value: str) -> Mail:
    """The message with every `name` header replaced by one with `value`."""
    msg = email.message_from_bytes(mail.raw, policy=email.policy.compat32)
    _replace(msg, name, value)
    return Mail(mail.name, canonical(msg.as_bytes(policy=email.policy.compat32)))


def envelope_sender(mail: Mail) -> str:
    msg = email.message_from_bytes(mail.raw[:65536], policy=email.policy.compat32)
    found = re.search(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", str(msg.get("Return-Path") or msg.get("From") or ""))
    return found.group() if found else "sender@spam.example"


def wave(variants: Sequence[Mail], index: int, rng: random.Random, copies: int = 100,
         extra_headers: Iterable[str] = ()) -> list[Send]:
    extra = tuple(extra_headers)
    out = []
    for i in range(copies):
        variant = variants[i % len(variants)]
        recipient = f"user{index:02d}-{i:03d}@example.org"
        out.append(Send(envelope_sender(variant), recipient, make_copy(variant, rng, recipient, extra), index, i))
    return out


def ham_sends(ham: Sequence[Mail]) -> list[Send]:
    """Each ham message once, to its own recipient (so per-recipient rate limits stay out of the way)."""
    return [Send(envelope_sender(m), f"reader{i:04d}@example.org", m.raw, None) for i, m in enumerate(ham)]


def schedule(streams: Sequence[Sequence[Send]], rng: random.Random) -> list[Send]:
    """All streams merged in a random order that keeps each stream's own order."""
    slots = [k for k, s in enumerate(streams) for _ in s]
    rng.shuffle(slots)
    positions = [0] * len(streams)
    out = []
    for k in slots:
        out.append(streams[k][positions[k]])
        positions[k] += 1
    return out


# --- through the real proxy -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    send: Send
    code: int
    reply: str

    @property
    def held(self) -> bool:
        return self.code == 250 and "quarantined as" in self.reply


def send_all(port: int, sends: Sequence[Send], timeout: float = 60.0) -> list[Outcome]:
    """Each message in its own transaction on one reused connection; the DATA reply (or the
    refusal at MAIL/RCPT) is the outcome."""
    import smtplib

    out = []
    client = smtplib.SMTP("127.0.0.1", port, timeout=timeout)
    client.ehlo("client.test")
    try:
        for s in sends:
            code, text = client.mail(s.sender)
            if code == 250:
                code, text = client.rcpt(s.recipient)
            if code == 250:
                code, text = client.data(s.raw)
            else:
                client.rset()
            out.append(Outcome(s, code, text.decode(errors="replace")))
    finally:
        client.quit()
    return out
