"""A generated mail corpus for burst detection: campaigns with hash-busters, legitimate bulk, distinct mail.

Deterministic for a seed, so the benchmark and the tests see the same
messages. Campaign copies vary the way spam tools vary them: random tokens,
changing numbers and names, shuffled sentences and paragraphs, varied
subjects, HTML or wrapped text (or both), per-copy tracking URLs.
Legitimate mail: distinct personal messages built from the same vocabulary
(so they share stock phrases), mailing-list posts (List-Id, one footer),
notification mail from one sender (one template, a different comment each),
and a newsletter sent to many recipients as identical copies.
"""

from __future__ import annotations

import random
import string
import textwrap
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP

NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Erik",
    "Fatima",
    "Georg",
    "Hanna",
    "Ivan",
    "Julia",
    "Karl",
    "Lena",
    "Marco",
    "Nora",
    "Oskar",
    "Paula",
    "Quentin",
    "Rosa",
    "Stefan",
    "Tina",
    "Ulrich",
    "Vera",
    "Walter",
    "Xenia",
    "Yusuf",
    "Zoe",
    "Amir",
    "Bettina",
    "Chen",
    "Dana",
    "Elif",
    "Frank",
    "Greta",
    "Hugo",
    "Ines",
]
ADJ = [
    "new",
    "old",
    "quick",
    "slow",
    "bright",
    "dark",
    "small",
    "large",
    "quiet",
    "busy",
    "simple",
    "complex",
    "early",
    "late",
    "local",
    "remote",
    "public",
    "private",
    "careful",
    "useful",
    "broken",
    "stable",
    "final",
    "rough",
    "clean",
    "strange",
    "common",
    "rare",
    "warm",
    "cold",
    "open",
    "closed",
    "fresh",
    "heavy",
    "light",
    "strong",
    "weak",
    "happy",
    "tired",
    "formal",
    "friendly",
    "detailed",
    "brief",
    "urgent",
    "minor",
    "major",
    "regular",
    "special",
]
NOUN = [
    "report",
    "meeting",
    "server",
    "garden",
    "project",
    "budget",
    "draft",
    "library",
    "station",
    "concert",
    "kitchen",
    "article",
    "picture",
    "schedule",
    "contract",
    "window",
    "bicycle",
    "holiday",
    "question",
    "answer",
    "invoice",
    "printer",
    "network",
    "office",
    "river",
    "mountain",
    "coffee",
    "teacher",
    "student",
    "museum",
    "package",
    "letter",
    "weekend",
    "dinner",
    "journey",
    "proposal",
    "review",
    "manual",
    "bridge",
    "festival",
    "hospital",
    "market",
    "planet",
    "recipe",
    "software",
    "database",
    "keyboard",
    "camera",
    "village",
    "harbour",
    "chapter",
    "translation",
    "conference",
    "workshop",
]
VERB = [
    "needs",
    "changes",
    "finds",
    "moves",
    "helps",
    "starts",
    "stops",
    "opens",
    "closes",
    "checks",
    "follows",
    "builds",
    "shows",
    "brings",
    "carries",
    "writes",
    "reads",
    "sends",
    "keeps",
    "leaves",
    "covers",
    "reaches",
    "improves",
    "explains",
    "describes",
    "supports",
    "replaces",
    "repairs",
    "collects",
    "prepares",
    "reviews",
    "mentions",
]
ADV = [
    "today",
    "tomorrow",
    "again",
    "soon",
    "later",
    "quickly",
    "slowly",
    "carefully",
    "finally",
    "honestly",
    "really",
    "certainly",
]
STOCK = (
    "Let me know if you have any questions.",
    "Thanks in advance.",
    "Best regards.",
    "Hope you are well.",
    "See you soon.",
    "Thank you for your help.",
)


def sentence(rng: random.Random) -> str:
    parts = [
        rng.choice(("The", "Our", "Your", "This", "That", "Every")),
        rng.choice(ADJ),
        rng.choice(NOUN),
        rng.choice(VERB),
        rng.choice(("the", "a", "our", "your", "my")),
        rng.choice(ADJ),
        rng.choice(NOUN),
    ]
    if rng.random() < 0.6:
        parts += [rng.choice(("near", "for", "with", "after", "before", "about")), "the", rng.choice(NOUN)]
    if rng.random() < 0.4:
        parts.append(rng.choice(ADV))
    return " ".join(parts) + rng.choice((".", ".", ".", "!", "?"))


def paragraphs(rng: random.Random, n: int, per: tuple[int, int] = (2, 5)) -> list[list[str]]:
    return [[sentence(rng) for _ in range(rng.randint(*per))] for _ in range(n)]


def random_token(rng: random.Random) -> str:
    alphabet = rng.choice((string.ascii_letters + string.digits, string.ascii_lowercase, string.hexdigits))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 14)))


@dataclass(frozen=True)
class Sample:
    kind: str
    """'spam' (campaign copy), 'distinct', 'list', 'notification' or 'newsletter'."""
    group: str
    """Campaign or bulk stream name; a unique name for distinct mail."""
    sender: str
    recipient: str
    raw: bytes


def _message(
    sender: str,
    recipient: str,
    subject: str,
    text: str | None,
    html: str | None,
    headers: dict[str, str] | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    for name, value in (headers or {}).items():
        msg[name] = value
    if text is not None:
        msg.set_content(text, cte=random.Random(subject).choice(("quoted-printable", "base64")))
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=SMTP)


def campaign(rng: random.Random, name: str, copies: int, size_paragraphs: int = 4) -> list[Sample]:
    """Copies of one spam body with per-copy hash-busters."""
    base = paragraphs(rng, size_paragraphs, (3, 6))
    offer = f"Claim your {rng.choice(ADJ)} {rng.choice(NOUN)} worth {rng.randint(100, 999)} dollars now."
    domain = f"{rng.choice(NOUN)}-{rng.choice(ADJ)}.example"
    subjects = [f"{rng.choice(ADJ).title()} {rng.choice(NOUN)} for you", f"Re: your {rng.choice(NOUN)}"]
    samples = []
    for _ in range(copies):
        name_ = rng.choice(NAMES)
        paras = [list(p) for p in base]
        for p in paras:
            rng.shuffle(p)
            for _ in range(rng.randint(0, 2)):
                p.insert(rng.randrange(len(p) + 1), random_token(rng))
        rng.shuffle(paras)
        offer_i = offer.replace("dollars", f"dollars (only {rng.randint(2, 97)} left)")
        url = f"https://{random_token(rng).lower()}.{domain}/c/{random_token(rng)}?id={rng.randint(1, 10**9)}"
        blocks = [f"Dear {name_},", *(" ".join(p) for p in paras), offer_i, url, random_token(rng)]
        subject = f"{rng.choice(subjects)} {random_token(rng)} #{rng.randint(1000, 99999)}"
        style = rng.choice(("text", "html", "both"))
        text = "\n\n".join(textwrap.fill(b, 72) for b in blocks) if style != "html" else None
        html = (
            "<html><body>"
            + "".join(f"<p>{b}</p>" for b in blocks[:-2])
            + f'<p><a href="{url}">Click here</a></p><div style="display:none">{blocks[-1]}</div></body></html>'
            if style != "text"
            else None
        )
        sender = f"{random_token(rng).lower()}@{rng.choice(NOUN)}{rng.randint(1, 99)}.example"
        samples.append(
            Sample("spam", name, sender, "info@example.org", _message(sender, "info@example.org", subject, text, html))
        )
    return samples


def distinct(rng: random.Random, n: int) -> list[Sample]:
    """Personal mail: each body written from scratch, sharing vocabulary and stock phrases."""
    out = []
    for i in range(n):
        who, to = rng.choice(NAMES), rng.choice(NAMES)
        paras = paragraphs(rng, rng.randint(1, 4))
        body = f"Hi {to},\n\n" + "\n\n".join(" ".join(p) for p in paras)
        body += f"\n\n{rng.choice(STOCK)}\n{rng.choice(STOCK)}\n{who}\n"
        subject = f"{rng.choice(ADJ).title()} {rng.choice(NOUN)}"
        sender = f"{who.lower()}@{rng.choice(NOUN)}.example"
        out.append(
            Sample(
                "distinct",
                f"distinct-{i}",
                sender,
                f"{to.lower()}@example.org",
                _message(sender, f"{to.lower()}@example.org", subject, body, None),
            )
        )
    return out


def mailing_list(rng: random.Random, n: int) -> list[Sample]:
    """A busy list: distinct posts, one footer, List-Id; half are replies in threads."""
    footer = (
        "_______________________________________________\nTeam mailing list\n"
        "team@lists.example.org\nhttps://lists.example.org/mailman/listinfo/team"
    )
    out = []
    for i in range(n):
        body = "\n\n".join(" ".join(p) for p in paragraphs(rng, rng.randint(1, 2), (1, 3))) + "\n\n" + footer
        headers = {
            "List-Id": "Team <team.lists.example.org>",
            "List-Unsubscribe": "<mailto:team-leave@lists.example.org>",
        }
        subject = f"[Team] {rng.choice(ADJ)} {rng.choice(NOUN)}"
        if i % 2:
            headers["In-Reply-To"] = f"<thread-{i // 4}@lists.example.org>"
            subject = "Re: " + subject
        out.append(
            Sample(
                "list",
                "team-list",
                "team-bounces@lists.example.org",
                "member@example.org",
                _message("team@lists.example.org", "member@example.org", subject, body, None, headers),
            )
        )
    return out


def notifications(rng: random.Random, n: int) -> list[Sample]:
    """A tracker's notifications: one template, a short different comment each."""
    out = []
    for _ in range(n):
        task = rng.randint(100000, 400000)
        comment = " ".join(sentence(rng) for _ in range(rng.randint(1, 2)))
        body = (
            f"{rng.choice(NAMES)} added a comment to task T{task}.\n\n{comment}\n\n"
            f"TASK DETAIL\n  https://phabricator.example.org/T{task}\n\n"
            "EMAIL PREFERENCES\n  https://phabricator.example.org/settings/panel/emailpreferences/\n\n"
            "To: the task subscribers\nCc: the project members\n"
        )
        out.append(
            Sample(
                "notification",
                "phabricator",
                "no-reply@phabricator.example.org",
                "dev@example.org",
                _message(
                    "no-reply@phabricator.example.org",
                    "dev@example.org",
                    f"[Maniphest] [Commented On] T{task}: {rng.choice(ADJ)} {rng.choice(NOUN)}",
                    body,
                    None,
                ),
            )
        )
    return out


def newsletter(rng: random.Random, n: int) -> list[Sample]:
    """The same newsletter to n recipients, one message each, with List-Unsubscribe."""
    text = "\n\n".join(" ".join(p) for p in paragraphs(rng, 5))
    out = []
    for i in range(n):
        to = f"reader{i}@example.org"
        out.append(
            Sample(
                "newsletter",
                "newsletter",
                "news@news.example.com",
                to,
                _message(
                    "news@news.example.com",
                    to,
                    "Monthly news",
                    text,
                    None,
                    {"List-Unsubscribe": f"<https://news.example.com/u/{i}>"},
                ),
            )
        )
    return out


def corpus(
    seed: int = 1,
    campaigns: int = 5,
    copies: int = 200,
    distinct_n: int = 2000,
    list_n: int = 200,
    notification_n: int = 200,
    newsletter_n: int = 200,
) -> list[Sample]:
    """Everything, shuffled into one arrival order."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    for c in range(campaigns):
        samples += campaign(rng, f"campaign-{c}", copies)
    samples += distinct(rng, distinct_n) + mailing_list(rng, list_n)
    samples += notifications(rng, notification_n) + newsletter(rng, newsletter_n)
    rng.shuffle(samples)
    return samples
