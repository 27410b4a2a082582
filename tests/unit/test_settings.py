"""Daemon settings: validated at start with clear errors; flags override the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueguard.cli import build_parser, settings_from_args
from queueguard.settings import SettingsError, host_problems, load_settings, split_hostport
from queueguard.webauth import hash_password


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:2525", ("127.0.0.1", 2525)), ("[::1]:25", ("::1", 25)), ("mx.example", ("mx.example", 25)),
    (":2526", ("127.0.0.1", 2526)), ("::1", ("::1", 25)),
])
def test_split_hostport(text: str, expected: tuple[str, int]) -> None:
    assert split_hostport(text) == expected


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    f = tmp_path / "queueguard.yaml"
    f.write_text("smtp:\n  listen: 127.0.0.1:x\n  max_message_size: 10 parsecs\nstate: mongodb://x\nbogus: 1\n")
    with pytest.raises(SettingsError) as e:
        load_settings(f)
    text = str(e.value)
    assert f"{f}: smtp.max_message_size: " in text and "bad size" in text
    assert f"{f}: state: " in text and "redis://" in text
    assert f"{f}: bogus: Extra inputs are not permitted" in text


def test_unreadable_or_non_mapping_file(tmp_path: Path) -> None:
    f = tmp_path / "q.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(SettingsError, match="top level must be a mapping"):
        load_settings(f)
    with pytest.raises(SettingsError, match="No such file"):
        load_settings(tmp_path / "missing.yaml")


def test_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "q.yaml"
    f.write_text("smtp: {listen: 0.0.0.0:25, max_message_size: 1MiB}\ndownstreams: [{address: 10.0.0.1:25}]\n"
                 "state: memory\n")
    args = build_parser().parse_args([
        "serve", "--settings", str(f), "--listen", "127.0.0.1:2525", "--downstream", "127.0.0.1:2526",
        "--downstream", "127.0.0.1:2527", "--proxy-protocol", "v2", "--metrics", "127.0.0.1:9999",
        "--policies", "pol", "--quarantine", "qdir", "--state", "redis://127.0.0.1:6390/0",
    ])
    s = settings_from_args(args)
    assert s.smtp.listen == "127.0.0.1:2525" and s.smtp.max_message_size == 1024 * 1024
    assert [(d.address, d.proxy_protocol) for d in s.downstreams] == [("127.0.0.1:2526", "v2"),
                                                                        ("127.0.0.1:2527", "v2")]
    assert s.metrics == "127.0.0.1:9999" and str(s.policies) == "pol"
    assert str(s.quarantine.directory) == "qdir" and s.state == "redis://127.0.0.1:6390/0"


def test_shipped_settings_file_is_valid() -> None:
    s = load_settings(Path(__file__).resolve().parents[2] / "queueguard.yaml")
    assert s.state == "memory" and s.smtp.listen == "127.0.0.1:2525"


@pytest.mark.parametrize(("override", "message"), [
    ({"smtp.listen": "nonsense"}, "give an IP address and port"),
    ({"smtp.listen": "127.0.0.1:99999"}, "port must be 0-65535"),
    ({"metrics": "0.0.0.0:x"}, "port must be a number"),
    ({"downstreams": []}, "at least 1 item"),
    ({"downstreams": [{"address": "mx example:25"}]}, "no spaces"),
])
def test_settings_serve_could_not_use_are_refused_by_check(override: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(None, override)


def test_listen_accepts_ip_literals_and_localhost() -> None:
    s = load_settings(None, {"smtp.listen": "[::]:25", "metrics": "localhost:9925"})
    assert s.smtp.listen == "[::]:25"


def test_missing_tls_files_are_host_problems() -> None:
    s = load_settings(None, {"smtp.tls_cert": "/nonexistent/cert.pem"})
    assert host_problems(s) == ["smtp.tls_cert: /nonexistent/cert.pem: no such file"]


def test_require_tls_without_a_certificate_is_refused() -> None:
    """Without a certificate STARTTLS is not offered, so requiring it would refuse every sender."""
    with pytest.raises(SettingsError, match="require_tls needs tls_cert"):
        load_settings(None, {"smtp.require_tls": "true"})
    assert load_settings(None, {"smtp.require_tls": "true", "smtp.tls_cert": "/c.pem"}).smtp.require_tls


def test_yaml_syntax_error_has_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "q.yaml"
    f.write_text("smtp:\n\tlisten: 127.0.0.1:25\n")
    with pytest.raises(SettingsError, match=rf"^{f}:2: found character '\\t'"):
        load_settings(f)


NO_CREDENTIALS = ("metrics: {} is not a loopback address and the status page shows recipients: "
                  "set status.password_hash (queueguard passwd) or status.token_file")


@pytest.mark.parametrize("metrics", ["0.0.0.0:9925", "[::]:9925", "192.0.2.7:9925", "[::ffff:127.0.0.1]:9925"])
def test_status_page_off_loopback_needs_credentials(metrics: str, tmp_path: Path) -> None:
    assert host_problems(load_settings(None, {"metrics": metrics})) == [NO_CREDENTIALS.format(metrics)]
    password_hash = hash_password("x" * 12, 10)
    assert host_problems(load_settings(None, {"metrics": metrics, "status.password_hash": password_hash})) == []
    token = tmp_path / "token"
    token.write_text("t" * 32)
    assert host_problems(load_settings(None, {"metrics": metrics, "status.token_file": str(token)})) == []


@pytest.mark.parametrize("metrics", ["127.0.0.1:9925", "127.0.0.2:9925", "[::1]:9925", "localhost:9925"])
def test_status_page_on_loopback_may_stay_open(metrics: str) -> None:
    assert host_problems(load_settings(None, {"metrics": metrics})) == []


def test_token_files_are_host_problems(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    s = load_settings(None, {
        "status.token_file": str(tmp_path / "missing"),
        "routes": {"tickets": {"downstreams": [{"address": "127.0.0.1:25"}], "pressure": {
            "source": "http", "url": "http://127.0.0.1:9925/status.json", "token_file": str(short)}}},
    })
    assert host_problems(s) == [
        f"status.token_file: {tmp_path / 'missing'}: No such file or directory",
        f"routes.tickets.pressure.token_file: {short}: the token must be one word of at least 32 characters "
        "(`openssl rand -hex 32`)",
    ]


def test_bad_password_hash_and_route_name_are_settings_errors() -> None:
    with pytest.raises(SettingsError, match=r"status.password_hash: Value error, password_hash must look like"):
        load_settings(None, {"status.password_hash": "hunter2"})
    for name in ("info@example.org", "tickets\n"):
        with pytest.raises(SettingsError, match=r"route name .*: only letters"):
            load_settings(None, {"routes": {name: {"downstreams": [{"address": "127.0.0.1:25"}]}}})
