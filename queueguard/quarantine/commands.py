"""`queueguard quarantine list | show | release | delete | purge | stats`.

Every subcommand takes `--settings FILE` (downstreams for release, the
quarantine directory) and `--quarantine DIR` (overrides the directory).
Selections: ids, or filters (`--rule`, `--sender`, `--recipient`, `--since`,
`--until`, `--fingerprint`, `--campaign`); bulk commands print progress on stderr and a
final count on stdout. Deleting a whole wave is one command, e.g.
`queueguard quarantine delete --campaign ID` (the id `show` and `stats` name).
Exit codes: 0 done, 1 some message failed (release), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from queueguard.logging_setup import visible
from queueguard.mime import parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.units import parse_duration
from queueguard.quarantine.protocol import QuarantineError
from queueguard.quarantine.store import Entry, Filter, InvalidId, QuarantineStore, iso
from queueguard.settings import Settings, load_settings

if TYPE_CHECKING:
    from queueguard.relay import Relay

PROGRESS_EVERY = 100


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("quarantine", help="list, show, release, delete and purge quarantined mail")
    qs = q.add_subparsers(dest="quarantine_command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = qs.add_parser(name, help=help_)
        p.add_argument("--settings", type=Path, help="settings file (downstreams, quarantine directory)")
        p.add_argument("--quarantine", type=Path, help="quarantine directory (overrides settings)")
        return p

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rule", help="rule that caught the message")
        p.add_argument("--sender", help="envelope sender, a glob like '*@spam.example'")
        p.add_argument("--recipient", help="an envelope recipient, a glob")
        p.add_argument("--since", help="quarantined at or after: ISO time or an age like '2h'")
        p.add_argument("--until", help="quarantined before: ISO time or an age like '30m'")
        p.add_argument("--fingerprint", help="a fingerprint key (or its first characters) from show/stats")
        p.add_argument("--campaign", help="the burst campaign id that show/stats name (held by one wave)")

    p = command("list", "list quarantined messages, oldest first")
    filters(p)
    p.add_argument("--json", action="store_true", help="one JSON array of metadata")
    p.set_defaults(func=_list)

    p = command("show", "metadata and a readable summary of one message")
    p.add_argument("id")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--raw", action="store_true", help="write the message bytes exactly as received")
    shown.add_argument("--json", action="store_true", help="metadata and the decoded summary as one JSON object")
    p.set_defaults(func=_show)

    p = command("release", "deliver messages through the downstreams with their original envelope")
    p.add_argument("ids", nargs="*", metavar="ID")
    filters(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be released, change nothing")
    p.set_defaults(func=_release)

    p = command("delete", "delete messages by id or filter")
    p.add_argument("ids", nargs="*", metavar="ID")
    filters(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, change nothing")
    p.set_defaults(func=_delete)

    p = command("purge", "delete messages older than an age (and matching any filters)")
    p.add_argument("--older-than", required=True, help="age like '30d' or '12h'")
    filters(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be purged, change nothing")
    p.set_defaults(func=_purge)

    p = command("stats", "counts by rule and fingerprint, bytes and inodes used")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_stats)


# --- plumbing ---------------------------------------------------------------------------


class UsageError(Exception):
    """Bad command-line input; printed, exit code 2."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] | None = {"quarantine.directory": str(args.quarantine)} if args.quarantine else None
    return load_settings(args.settings, overrides)


def _store(args: argparse.Namespace) -> QuarantineStore:
    """The configured store; a directory without a quarantine in it (a typo, `/etc`) is refused,
    never turned into an empty store."""
    s = _settings(args).quarantine
    if not s.directory.is_dir():
        raise UsageError(f"quarantine directory {s.directory} does not exist")
    if not (s.directory / "index.sqlite").exists() and not (s.directory / "msg").is_dir():
        raise UsageError(f"{s.directory} is not a quarantine (no index.sqlite, no msg/): check --quarantine "
                         "or the settings' quarantine.directory")
    return QuarantineStore(s.directory, s.min_free_bytes, s.min_free_inodes)


def parse_when(text: str, now: float) -> float:
    """An ISO date/time (UTC unless it says otherwise) or an age ('2h' = two hours ago)."""
    from datetime import UTC, datetime

    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"bad time {text!r}: expected ISO time like 2024-05-01T12:00 or an age like 2h") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _filter(args: argparse.Namespace, *, held_only: bool = False, until: float | None = None) -> Filter:
    now = time.time()
    since = parse_when(args.since, now) if args.since else None
    until_arg = parse_when(args.until, now) if args.until else None
    if until is not None:
        until_arg = until if until_arg is None else min(until, until_arg)
    return Filter(rule=args.rule, sender=args.sender, recipient=args.recipient, since=since, until=until_arg,
                  fingerprint=args.fingerprint, campaign=args.campaign, held_only=held_only)


def _has_filter(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) for k in ("rule", "sender", "recipient", "since", "until", "fingerprint", "campaign"))


def _select(store: QuarantineStore, args: argparse.Namespace, *, held_only: bool = False) -> list[Entry]:
    """Entries named by ids (each must exist) or matched by filters; one of the two is required."""
    if args.ids and _has_filter(args):
        raise UsageError("give ids or filters, not both")
    if args.ids:
        entries = []
        for qid in args.ids:
            entry = store.get(qid)
            if entry is None:
                raise UsageError(f"no quarantined message {qid}")
            entries.append(entry)
        return entries
    if not _has_filter(args):
        raise UsageError("name messages by id or select them with --rule/--sender/--recipient/--since/"
                         "--until/--fingerprint/--campaign")
    store.recover()
    return store.list(_filter(args, held_only=held_only))


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        result: int = func(args)
    except (UsageError, InvalidId) as e:
        print(f"queueguard quarantine: {e}", file=sys.stderr)
        return 2
    except QuarantineError as e:
        print(f"queueguard quarantine: {e}", file=sys.stderr)
        return 1
    return result


def _progress(done: int, total: int, verb: str) -> None:
    if done % PROGRESS_EVERY == 0 or done == total:
        print(f"{verb} {done}/{total}", file=sys.stderr, flush=True)


def say(line: str = "") -> None:
    """One line of human output: what senders wrote (subjects, addresses, file names, text)
    cannot move the cursor, clear a line, retitle the window or fill the clipboard of the
    admin reading it, nor fake a row (`--json` escapes by itself, `--raw` is the bytes)."""
    print(visible(line))


def _line(e: Entry) -> str:
    rcpts = e.recipients
    to = (rcpts[0] if rcpts else "") + (f" (+{len(rcpts) - 1})" if len(rcpts) > 1 else "")
    subject = str(e.meta.get("headers", {}).get("subject", ""))[:50]
    status = "released" if e.released is not None else "held"
    return f"{e.id}  {iso(e.time)}  {status:8}  {e.rule or '-':20}  {e.size:>8}  <{e.sender}>  {to}  {subject}"


# --- subcommands ---------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        store = _store(args)
        store.recover()
        entries = store.list(_filter(args))
        if args.json:
            print(json.dumps([e.meta for e in entries], indent=1))
            return 0
        for e in entries:
            say(_line(e))
        say(f"{len(entries)} message(s)")
        return 0

    return _run(run, args)


def _show(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        store = _store(args)
        entry = store.get(args.id)
        if entry is None:
            raise UsageError(f"no quarantined message {args.id}")
        if args.raw:
            sys.stdout.buffer.write(store.raw(args.id))
            sys.stdout.buffer.flush()
            return 0
        parsed = parse_message(store.raw(args.id), max_text=2000)
        m = entry.meta
        if args.json:
            summary = {
                "headers": {name: parsed.header(name) for name in ("From", "Subject", "Date", "Message-ID")},
                "attachments": [vars(a) for a in parsed.attachments],
                "url_hosts": parsed.url_hosts,
                "text": parsed.text[:1500],
                "defects": parsed.defects,
            }
            print(json.dumps({**m, "status": "released" if m.get("released") else "held", "summary": summary},
                             indent=1))
            return 0
        env, client = m["envelope"], m["client"]
        released = m.get("released")
        say(f"id:           {entry.id}")
        say(f"quarantined:  {iso(entry.time)}  reason={m.get('reason')} rule={m.get('rule')}")
        say(f"status:       {'released ' + iso(released['time']) + ' ' + released['reply'] if released else 'held'}")
        say(f"client:       {client.get('name') or 'unknown'}[{client.get('ip')}] helo={m.get('helo')} "
              f"tls={client.get('tls')} auth={client.get('authenticated') or '-'}")
        say(f"sender:       <{env['sender']}>")
        say(f"recipients:   {', '.join(env['recipients'])}")
        say(f"size:         {m['size']} bytes  sha256={m['sha256']}")
        for h in m.get("hits", []):
            say(f"hit:          {h['kind']}:{h['rule']} action={h['action']}"
                  f"{' (shadow)' if h.get('shadow') else ''} {h.get('detail', '')}")
        if camp := m.get("campaign"):
            say(f"campaign:     {camp['id']}  first seen {camp['first_seen_iso']}, {camp['copies']} copies in the "
                  f"window when held, {camp['variants']} variant(s), linked by: "
                  f"{', '.join(camp['signals']) or 'identical copies'}")
            say(f"              all of it: queueguard quarantine delete --campaign {camp['id']} --dry-run")
        for kind, value in m.get("fingerprints", {}).items():
            say(f"fingerprint:  {kind} {value}")
        for name in ("From", "Subject", "Date", "Message-ID"):
            say(f"{name + ':':14}{parsed.header(name) or ''}")
        if parsed.attachments:
            for a in parsed.attachments:
                say(f"attachment:   {a.filename or '(unnamed)'} {a.content_type} {a.size} bytes sha256={a.sha256}")
        if parsed.url_hosts:
            say(f"url hosts:    {', '.join(parsed.url_hosts[:20])}")
        say()
        shown = 0
        for line in parsed.text.splitlines():
            if line.strip() and shown < 1500:
                say(line[:1500 - shown])
                shown += len(line) + 1
        return 0

    return _run(run, args)


def _release(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        if args.settings is None and not args.dry_run:
            raise UsageError("release needs --settings: the downstreams (and routes) to deliver to come from it")
        settings = _settings(args)
        store = _store(args)
        entries = _select(store, args, held_only=True)
        todo = [e for e in entries if e.released is None]
        for e in entries:
            if e.released is not None:
                say(f"{e.id}: already released {iso(e.released)}, skipped")
        if args.dry_run:
            for e in todo:
                say(f"would release {_line(e)}")
            say(f"{len(todo)} message(s) would be released")
            return 0
        ok, failed = asyncio.run(_deliver_all(settings, store, todo))
        say(f"released {ok} of {len(todo)} message(s); {failed} failed and stay in quarantine")
        return 1 if failed else 0

    return _run(run, args)


async def _deliver_all(settings: Settings, store: QuarantineStore, entries: list[Entry]) -> tuple[int, int]:
    from queueguard.relay import Relay

    relay = Relay.from_settings(settings)
    ok = failed = 0
    try:
        for i, e in enumerate(entries, 1):
            try:
                with store.claimed(e.id) as mine:
                    outcome = await _deliver_one(relay, store, e.id) if mine else None
                    if not mine:
                        say(f"{e.id}: being released by another command, skipped")
                    elif outcome is not None:
                        ok, failed = ok + outcome, failed + (not outcome)
            except (OSError, QuarantineError) as exc:  # this entry only; the others are still tried
                failed += 1
                say(f"{e.id}: NOT released: {exc}")
            _progress(i, len(entries), "released")
    finally:
        relay.close()
    return ok, failed


async def _deliver_one(relay: Relay, store: QuarantineStore, qid: str) -> bool | None:
    """Deliver one claimed entry as its metadata file has it now (it may have been released or
    deleted since it was selected): True when released; None when there was nothing to do;
    False when it stays in quarantine, or was delivered but could not be marked released (which
    must not go unsaid: releasing it again delivers it again)."""
    entry = store.get(qid)
    if entry is None:
        say(f"{qid}: deleted meanwhile, skipped")
        return None
    if entry.released is not None:
        say(f"{qid}: already released {iso(entry.released)}, skipped")
        return None
    txn = _transaction(entry)
    try:
        result = await relay.deliver(txn.connection, txn.sender, txn.recipients, store.raw(qid), txn.route,
                                     txn.mail_options, txn.rcpt_options)
        success, reply, downstream = result.ok, result.reply, result.downstream
    except Exception as exc:  # any failure keeps the message; say why
        success, reply, downstream = False, f"{type(exc).__name__}: {exc}", ""
    if not success:
        store.count_failed_release()
        say(f"{qid}: NOT released, kept in quarantine: {reply}")
        return False
    try:
        store.mark_released(qid, reply, downstream)
    except (OSError, QuarantineError) as exc:
        say(f"{qid}: DELIVERED via {downstream} ({reply}) but not marked released: {exc}; "
            f"do not release it again (delete it once the quarantine can be written)")
        return False
    say(f"{qid}: released via {downstream}: {reply}")
    return True


def _transaction(e: Entry) -> Transaction:
    """The original envelope and client, as the downstream first saw them."""
    m = e.meta
    client = m.get("client", {})
    conn = Connection(parse_ip(client.get("ip")), client_port=int(client.get("port") or 0),
                      client_name=client.get("name") or "", helo=m.get("helo") or "",
                      tls=bool(client.get("tls")), authenticated=client.get("authenticated"))
    env = m["envelope"]
    txn = Transaction(conn, env["sender"], recipients=list(env["recipients"]),
                      mail_options=tuple(env.get("mail_options", ())),
                      rcpt_options={r: tuple(o) for r, o in env.get("rcpt_options", {}).items()})
    txn.route = m.get("route")
    return txn


def _remove(store: QuarantineStore, entries: list[Entry], dry_run: bool, verb: str) -> int:
    if dry_run:
        for e in entries:
            say(f"would {verb} {_line(e)}")
        say(f"{len(entries)} message(s) would be {verb}d; nothing changed")
        return 0
    removed = 0
    for i, e in enumerate(entries, 1):
        removed += store.delete(e.id)
        _progress(i, len(entries), f"{verb}d")
    say(f"{verb}d {removed} message(s)")
    return 0


def _delete(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        store = _store(args)
        return _remove(store, _select(store, args), args.dry_run, "delete")

    return _run(run, args)


def _purge(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        if args.older_than.strip().replace(".", "", 1).isdigit():
            raise UsageError(f"--older-than {args.older_than}: give a unit (30d, 12h, 90m): a bare number "
                             "would be seconds, and purge everything")
        try:
            age = parse_duration(args.older_than)
        except ValueError as e:
            raise UsageError(str(e)) from None
        store = _store(args)
        store.recover()
        entries = store.list(_filter(args, until=time.time() - age))
        return _remove(store, entries, args.dry_run, "purge")

    return _run(run, args)


def _stats(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        store = _store(args)
        store.recover()
        entries = store.list()
        by_rule: Counter[str] = Counter()
        bytes_by_rule: Counter[str] = Counter()
        by_fp: Counter[str] = Counter()
        by_campaign: Counter[str] = Counter()
        for e in entries:
            if e.campaign:
                by_campaign[e.campaign] += 1
            by_rule[e.rule or "-"] += 1
            bytes_by_rule[e.rule or "-"] += e.size
            fps = e.meta.get("fingerprints", {})
            by_fp[str(fps.get("burst") or fps.get("subject") or "-")] += 1
        stats: dict[str, Any] = {
            "messages": len(entries), "held": sum(e.released is None for e in entries),
            "released": sum(e.released is not None for e in entries), "bytes": sum(e.size for e in entries),
            "oldest": iso(entries[0].time) if entries else None, "newest": iso(entries[-1].time) if entries else None,
            "by_rule": {r: {"messages": n, "bytes": bytes_by_rule[r]} for r, n in by_rule.most_common()},
            "by_fingerprint": dict(by_fp.most_common(20)),
            "by_campaign": dict(by_campaign.most_common(20)),
            **store.usage(), "filesystem": store.filesystem(), "counters": store.counters(),
        }
        if args.json:
            print(json.dumps(stats, indent=1))
            return 0
        say(f"messages: {stats['messages']} (held {stats['held']}, released {stats['released']}), "
              f"{stats['bytes']} bytes of mail, {stats['disk_bytes']} bytes on disk, {stats['inodes']} inodes")
        say(f"oldest: {stats['oldest']}  newest: {stats['newest']}")
        fs = store.filesystem()
        say(f"filesystem: {fs['free_bytes']} bytes free of {fs['size_bytes']}, "
              f"{fs['free_inodes']} inodes free of {fs['inodes']}")
        say("by rule:")
        for r, n in by_rule.most_common():
            say(f"  {n:>8}  {bytes_by_rule[r]:>12} bytes  {r}")
        say("by campaign (top 20; delete one with --campaign ID):")
        for cid, n in by_campaign.most_common(20):
            say(f"  {n:>8}  {cid}")
        say("by fingerprint (top 20):")
        for fp, n in by_fp.most_common(20):
            say(f"  {n:>8}  {fp}")
        return 0

    return _run(run, args)
