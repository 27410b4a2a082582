"""A wave through the real SMTP proxy: copies below the threshold are delivered, the rest are quarantined
with 250 and an id; the CLI releases one to the real downstream and purges the rest."""

from __future__ import annotations

import random
import re
import smtplib
import subprocess
import sys
from pathlib import Path

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from queueguard.quarantine import QuarantineStore
from queueguard.replay.corpus import campaign, distinct

REPO = Path(__file__).resolve().parents[2]
POLICY = """
bursts:
  - name: same-message-wave
    fingerprint: body
    threshold: 5 in 10m
    action: quarantine
"""


def quarantine_cli(guard: Guard, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "queueguard.cli",
        "quarantine",
        args[0],
        "--settings",
        str(guard.settings_path),
        *args[1:],
    ]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)


def test_wave_through_proxy_then_release_and_purge(tmp_path: Path) -> None:
    wave = campaign(random.Random(11), "mini-cooper", 12)
    legit = distinct(random.Random(12), 6)
    with (
        RecordingSink() as sink,
        Guard(
            {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]}, {"bursts.yaml": POLICY}, workdir=tmp_path
        ) as guard,
    ):
        replies = []
        with guard.smtp() as c:
            for i, sample in enumerate(wave):
                code, _ = c.mail(sample.sender)
                assert code == 250
                assert c.rcpt("info@example.org")[0] == 250
                code, text = c.data(sample.raw)
                replies.append(f"{code} {text.decode()}")
                if i % 2:  # distinct mail interleaved is not part of the wave
                    m = legit[i // 2]
                    c.sendmail(m.sender, [m.recipient], m.raw)
        assert all(r.startswith("250") for r in replies), replies
        delivered = [r for r in replies if "quarantined" not in r]
        held = [r for r in replies if "quarantined" in r]
        assert len(delivered) == 5 and replies[:5] == delivered
        ids = [re.search(r"quarantined as (\w+)", r).group(1) for r in held]  # type: ignore[union-attr]
        assert len(ids) == 7
        assert len(sink.messages) == 5 + 6

        store = QuarantineStore(tmp_path / "quarantine")
        entry = store.get(ids[0])
        assert entry is not None and entry.rule == "same-message-wave"
        assert entry.meta["fingerprints"]["burst"] in entry.meta["fingerprints"]["body"].split()
        assert store.raw(ids[0]) == wave[5].raw
        assert guard.metric("queueguard_quarantined_total", rule="same-message-wave") == 7

        out = quarantine_cli(guard, "release", ids[0])
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(sink.messages) == 12 and sink.messages[-1].rcpt_tos == ["info@example.org"]
        assert sink.messages[-1].mail_from == wave[5].sender

        out = quarantine_cli(guard, "purge", "--older-than", "0s", "--rule", "same-message-wave", "--dry-run")
        assert "7 message(s) would be purged; nothing changed" in out.stdout
        assert len(store.list()) == 7
        out = quarantine_cli(guard, "purge", "--older-than", "0s", "--rule", "same-message-wave")
        assert "purged 7 message(s)" in out.stdout
        assert store.list() == []


def test_a_wave_forging_a_bulk_sender_or_a_trusted_list_is_held() -> None:
    """The shipped policy exempts its bulk senders and trusted lists from same-body-wave only from
    their own networks (here the list server is 127.0.0.2). The same envelope sender or List-Id
    written into a wave that comes from anywhere else is what a spammer forges: counted and held."""
    shipped = (REPO / "policies" / "default.yaml").read_text()
    assert "    - 192.0.2.0/24\n" in shipped
    policy = shipped.replace("    - 192.0.2.0/24\n", "    - 127.0.0.2/32\n")
    copies, threshold = 50, 40
    list_id = b"List-Id: News <news.lists.example.org>\r\n"
    waves = {
        "real bulk sender": ("127.0.0.2", "news@lists.example.org", b""),
        "real trusted list": ("127.0.0.2", "news@mailer.example.net", list_id),
        "forged bulk sender": ("127.0.0.3", "news@lists.example.org", b""),
        "forged trusted List-Id": ("127.0.0.3", "news@mailer.example.net", list_id),
    }
    held: dict[str, int] = {}
    with RecordingSink() as sink, Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]},
                                        {"default.yaml": policy}) as guard:
        for seed, (what, (source, sender, header)) in enumerate(waves.items()):
            held[what] = 0
            with smtplib.SMTP("127.0.0.1", guard.port, timeout=30, source_address=(source, 0)) as c:
                c.ehlo("client.test")
                for i, sample in enumerate(campaign(random.Random(100 + seed), f"wave-{seed}", copies)):
                    # one recipient each: the flood-to-one-address limit is not what this is about
                    assert c.mail(sender)[0] == 250 and c.rcpt(f"user{i}@example.org")[0] == 250
                    code, text = c.data(header + sample.raw)
                    assert code == 250, text
                    held[what] += b"quarantined as" in text
    assert held == {"real bulk sender": 0, "real trusted list": 0, "forged bulk sender": copies - threshold,
                    "forged trusted List-Id": copies - threshold}, held
