"""`queueguard` command line: serve | check | schema | passwd | quarantine … | queue … | replay."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path

from queueguard import __version__
from queueguard.settings import Settings, SettingsError, load_settings


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=Path, help="settings file (queueguard.yaml); default: embedded defaults")
    p.add_argument("--policies", type=Path, help="policy directory (overrides settings)")
    p.add_argument("--quarantine", type=Path, help="quarantine directory (overrides settings)")
    p.add_argument("--state", help="'memory' or a redis:// URL (overrides settings)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings file (if any) with the command-line flags laid over it."""
    overrides: dict[str, object] = {}
    if getattr(args, "listen", None):
        overrides["smtp.listen"] = args.listen
    if getattr(args, "downstream", None):
        overrides["downstreams"] = [
            {"address": a, "proxy_protocol": getattr(args, "proxy_protocol", None) or "none"} for a in args.downstream
        ]
    if getattr(args, "metrics", None):
        overrides["metrics"] = args.metrics
    if getattr(args, "policies", None):
        overrides["policies"] = str(args.policies)
    if getattr(args, "quarantine", None):
        overrides["quarantine.directory"] = str(args.quarantine)
    if getattr(args, "state", None):
        overrides["state"] = args.state
    return load_settings(getattr(args, "settings", None), overrides)


def _serve(args: argparse.Namespace) -> int:
    from queueguard.app import StartupError, serve

    try:
        return asyncio.run(serve(settings_from_args(args)))
    except StartupError as e:
        print(f"queueguard: {e}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    from queueguard.check import run_check

    return run_check(args.settings, args.policies)


def _schema(args: argparse.Namespace) -> int:
    from queueguard.check import schema_json

    print(schema_json())
    return 0


MIN_PASSWORD = 12


def _passwd(args: argparse.Namespace) -> int:
    """The settings store only a hash; this makes it without the password touching a file or the shell history."""
    from queueguard.webauth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("status page password: ")
        if getpass.getpass("again: ") != password:
            print("queueguard: the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        print(f"queueguard: use a password of at least {MIN_PASSWORD} characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="queueguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"queueguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the SMTP proxy (and milter, policy socket, queue watch, metrics)")
    add_settings_flags(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="SMTP listen address")
    serve.add_argument("--downstream", metavar="HOST:PORT", action="append",
                       help="downstream MTA; repeat for failover order")
    serve.add_argument("--proxy-protocol", choices=["none", "v1", "v2"],
                       help="send a PROXY header to the --downstream MTAs (Exim hosts_proxy)")
    serve.add_argument("--metrics", metavar="HOST:PORT", help="metrics and status page listen address")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check", help="validate settings and policies; print file:line errors")
    check.add_argument("--settings", type=Path, help="settings file to validate (and to find the policy directory)")
    check.add_argument("--policies", type=Path, help="policy directory (default: the one the settings name)")
    check.set_defaults(func=_check)

    schema = sub.add_parser("schema", help="print the JSON Schema of policy files (for editors)")
    schema.set_defaults(func=_schema)

    passwd = sub.add_parser("passwd", help="read a password, print the status.password_hash line for the settings")
    passwd.set_defaults(func=_passwd)

    for module in ("queueguard.quarantine.commands", "queueguard.queuewatch.commands", "queueguard.replay"):
        register = __import__(module, fromlist=["register"]).register
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except SettingsError as e:
        print(f"queueguard: settings error:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `queueguard schema | head`
        sys.stderr.close()
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
