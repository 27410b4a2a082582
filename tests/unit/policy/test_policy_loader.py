"""Policy files: every error class reports file:line, merging across files, shipped policies load."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from queueguard.check import run_check, schema_json
from queueguard.model import Connection, Transaction
from queueguard.policy.loader import PolicyError, PolicyIssue, compile_regex, load_policy_dir, load_policy_dir_warned
from queueguard.policy.match import rule_applies

REPO = Path(__file__).resolve().parents[3]


def write(d: Path, **files: str) -> Path:
    for name, text in files.items():
        (d / name.replace("_yaml", ".yaml").replace("_yml", ".yml")).write_text(textwrap.dedent(text))
    return d


def issues_of(d: Path) -> list[PolicyIssue]:
    with pytest.raises(PolicyError) as e:
        load_policy_dir(d)
    return e.value.issues


def one_issue(d: Path) -> PolicyIssue:
    found = issues_of(d)
    assert len(found) == 1, [str(i) for i in found]
    return found[0]


RULE = """\
ratelimits:
  - name: r1
    key: recipient
    rate: 10/1m
"""


def test_bad_rate_syntax(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE.replace("10/1m", "60/10x"))
    issue = one_issue(tmp_path)
    assert (issue.file, issue.line) == (str(tmp_path / "a.yaml"), 4)
    assert "ratelimits[0].rate" in issue.message and "'60/10x'" in issue.message
    assert str(issue) == f"{tmp_path / 'a.yaml'}:4: {issue.message}"


@pytest.mark.parametrize("rate", ["99999999999999999999/1s", "10/400d", "0/1m"])
def test_rates_out_of_range_are_refused(tmp_path: Path, rate: str) -> None:
    write(tmp_path, a_yaml=RULE.replace("10/1m", rate))
    issue = one_issue(tmp_path)
    assert issue.line == 4 and f"bad rate '{rate}'" in issue.message


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    bursst: 5\n")
    issue = one_issue(tmp_path)
    assert issue.line == 5
    assert "unknown key 'bursst'" in issue.message and "did you mean 'burst'" in issue.message


def test_unknown_top_level_section(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="lists: {}\nratelimit: []\n")
    issue = one_issue(tmp_path)
    assert issue.line == 2 and "unknown key 'ratelimit'" in issue.message


def test_wrong_type(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    burst: lots\n")
    issue = one_issue(tmp_path)
    assert issue.line == 5 and "valid integer" in issue.message and "'lots'" in issue.message


def test_wrong_type_for_a_list_reference(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    only: {sender_in: 5}\n")
    issue = one_issue(tmp_path)
    assert issue.line == 5 and "expected a list name or a list of entries" in issue.message


def test_wrong_type_inside_an_inline_list(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    only:\n      sender_in:\n        - a@b.example\n        - 7\n")
    issue = one_issue(tmp_path)
    assert issue.line == 8 and "sender_in[1]" in issue.message


def test_missing_required_key(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="ratelimits:\n  - name: r1\n    key: recipient\n")
    issue = one_issue(tmp_path)
    assert issue.line == 2 and "missing required key 'rate'" in issue.message


def test_bad_literal(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    action: defer\n")
    issue = one_issue(tmp_path)
    assert issue.line == 5 and "'tempfail'" in issue.message and "'defer'" in issue.message


def test_unknown_list_name(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="lists:\n  bulk: [a.example]\n" + RULE + "    unless: {sender_in: bulkk}\n")
    issue = one_issue(tmp_path)
    assert issue.line == 7 and "unknown list 'bulkk'" in issue.message and "bulk" in issue.message


def test_invalid_cidr_in_a_named_list_points_at_the_entry(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="""\
        lists:
          nets:
            - 192.0.2.0/24
            - 10.1.2.3/24
            - 2001:db8::/129
            - not-an-ip
        ratelimits:
          - name: r1
            key: client_ip
            rate: 10/1m
            only: {client_in: nets}
        """)
    found = issues_of(tmp_path)
    assert [(i.line, i.message.split(":")[0]) for i in found] == [
        (4, "lists.nets[1]"), (5, "lists.nets[2]"), (6, "lists.nets[3]")]
    assert "host bits set (did you mean 10.1.2.0/24?)" in found[0].message


def test_invalid_ip_inline(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    unless:\n      client_in: [\"::1\", 300.1.1.1]\n")
    issue = one_issue(tmp_path)
    assert issue.line == 6 and "invalid IP or CIDR '300.1.1.1'" in issue.message


def test_regex_that_re2_refuses(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="patterns:\n  - name: p\n    subject: 'ok'\n    body: '(?<=x)y'\n")
    issue = one_issue(tmp_path)
    assert issue.line == 4 and "patterns[0].body: regex does not compile under RE2" in issue.message


def test_a_regex_too_costly_for_every_message_is_refused(tmp_path: Path) -> None:
    """RE2 is linear, but `.{0,1000}X.{0,1000}Y` outgrows its DFA memory: 4.5 s for one 200 KB
    message any sender can write, with every session waiting. Refused, saying what to write."""
    write(tmp_path, a_yaml="patterns:\n  - name: p\n    body: '.{0,1000}X.{0,1000}Y'\n")
    issue = one_issue(tmp_path)
    assert issue.line == 3 and "patterns[0].body: regex too costly" in issue.message
    assert "program size 18006" in issue.message
    write(tmp_path, a_yaml="patterns:\n  - name: p\n    body: '(?i)\\b(free|win)\\b.{0,200}\\bprize'\n")
    assert load_policy_dir(tmp_path).patterns[0].name == "p"
    # a long list of words is as large a program, but cheap to run: it loads as it did before
    words = "|".join(hashlib.sha256(b"%d" % i).hexdigest()[:10].translate(str.maketrans("0123456789", "ghijklmnop"))
                     for i in range(600))
    write(tmp_path, a_yaml=f"patterns:\n  - name: p\n    body: '(?i)\\b({words})\\b'\n")
    assert compile_regex(load_policy_dir(tmp_path).patterns[0].body or "").programsize > 5000


def test_catastrophic_backtracking_pattern_loads_and_matches_in_linear_time(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="patterns:\n  - name: p\n    subject: '(a+)+$'\n")
    policy = load_policy_dir(tmp_path)
    rx = compile_regex(policy.patterns[0].subject or "")
    # A backtracking engine needs ~2^50 steps here; RE2 is linear, so this returns at once
    # (no timing assertion: a regression would hit the pytest timeout).
    assert rx.search("a" * 50 + "!") is None
    assert rx.search("a" * 100_000) is not None


def test_bad_ratelimit_key(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE.replace("key: recipient", "key: sender+recipent"))
    issue = one_issue(tmp_path)
    assert issue.line == 3 and "'recipent' is not one of" in issue.message
    write(tmp_path, a_yaml=RULE.replace("key: recipient", "key: client_net/33"))
    assert "client_net/N" in one_issue(tmp_path).message


def test_yaml_syntax_error(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="ratelimits:\n  - name: r1\n    key: [recipient\n    rate: 1/1m\n")
    issue = one_issue(tmp_path)
    assert issue.message.startswith("YAML syntax") and issue.line == 4


def test_duplicate_key_in_a_mapping(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    rate: 20/1m\n")
    issue = one_issue(tmp_path)
    assert issue.line == 5 and "duplicate key 'rate' (first at line 4)" in issue.message


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="lists: !!python/object/apply:os.system ['true']\n")
    assert one_issue(tmp_path).message.startswith("YAML syntax")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="- just\n- a list\n")
    assert "top level must be a mapping" in one_issue(tmp_path).message


def test_empty_condition_is_refused(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    unless: {}\n")
    issue = one_issue(tmp_path)
    assert issue.line == 5 and "empty condition" in issue.message


def test_pattern_without_matchers_and_bad_header_name(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="patterns:\n  - name: p\n  - name: q\n    headers: {'X Bad': 'x'}\n")
    assert [i.line for i in issues_of(tmp_path)] == [2, 4]


def test_empty_and_missing_directory(tmp_path: Path) -> None:
    assert "no policy files" in one_issue(tmp_path).message
    assert "not a directory" in one_issue(tmp_path / "nope").message


def test_all_errors_of_all_files_are_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE.replace("10/1m", "1/1y"), b_yaml=RULE.replace("r1", "r2") + "    only: {helo_in: x}\n")
    assert [(Path(i.file).name, i.line) for i in issues_of(tmp_path)] == [("a.yaml", 4), ("b.yaml", 5)]


# --- merging -----------------------------------------------------------------------------------------

def test_merge_across_files(tmp_path: Path) -> None:
    write(tmp_path,
          a_yaml="lists:\n  bulk: ['*@lists.example.org']\n" + RULE + "    unless: {sender_in: ours}\n",
          b_yml="lists:\n  ours: [example.net]\n" + RULE.replace("r1", "r2") + "    unless: {sender_in: bulk}\n"
                "scan: {max_concurrent: 2}\n")
    policy = load_policy_dir(tmp_path)
    assert sorted(policy.lists) == ["bulk", "ours"]
    assert [r.name for r in policy.ratelimits] == ["r1", "r2"]  # file-name order
    assert policy.scan.max_concurrent == 2
    txn = Transaction(Connection(None), "a@lists.example.org")
    assert rule_applies(policy.ratelimits[0], policy, txn, "x@y.example")
    assert not rule_applies(policy.ratelimits[1], policy, txn, "x@y.example")


def test_hidden_files_and_subdirectories_are_not_read(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE)
    (tmp_path / ".#a.yaml").write_text("broken: [")
    (tmp_path / "examples").mkdir()
    write(tmp_path / "examples", x_yaml="broken: [")
    assert [r.name for r in load_policy_dir(tmp_path).ratelimits] == ["r1"]


def test_duplicate_list_across_files(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="lists:\n  bulk: [a.example]\n", b_yaml="\n\nlists:\n  bulk: [b.example]\n")
    issue = one_issue(tmp_path)
    assert (Path(issue.file).name, issue.line) == ("b.yaml", 4)
    assert f"already defined in {tmp_path / 'a.yaml'}:2" in issue.message


def test_duplicate_rule_name_across_files_and_kinds(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE, b_yaml="patterns:\n  - name: r1\n    subject: x\n")
    issue = one_issue(tmp_path)
    assert (Path(issue.file).name, issue.line) == ("b.yaml", 2) and "already used at" in issue.message


def test_scan_section_in_two_files(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="scan: {max_concurrent: 2}\n", b_yaml="lists: {}\nscan: {max_concurrent: 3}\n")
    issue = one_issue(tmp_path)
    assert (Path(issue.file).name, issue.line) == ("b.yaml", 2) and "one file only" in issue.message


# --- shipped policies, check and schema ------------------------------------------------------------

def test_shipped_default_policy_loads() -> None:
    policy = load_policy_dir(REPO / "policies")
    assert {r.name for r in policy.ratelimits} >= {"flood-to-one-address", "per-client-network"}
    assert policy.bursts and policy.patterns


def test_examples_load_alongside_the_default(tmp_path: Path) -> None:
    for f in [REPO / "policies" / "default.yaml", *sorted((REPO / "policies" / "examples").glob("*.yaml"))]:
        (tmp_path / f.name).write_text(f.read_text())
    assert len(load_policy_dir(tmp_path).ratelimits) > 3


def test_check_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, a_yaml="lists:\n  l: [a.example]\n" + RULE, b_yaml="patterns:\n  - name: p\n    subject: x\n")
    settings = tmp_path / "settings.yml.txt"
    settings.write_text("state: memory\n")
    assert run_check(settings, tmp_path) == 0
    assert capsys.readouterr().out == f"{tmp_path}/: 2 files, 1 list, 1 ratelimit, 0 bursts, 1 pattern; settings ok\n"


def test_check_prints_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, a_yaml=RULE.replace("10/1m", "60/10x") + "    extra: 1\n")
    settings = tmp_path / "settings.txt"
    settings.write_text("state: mysql://x\n")
    assert run_check(settings, tmp_path) == 1
    out = capsys.readouterr().out.splitlines()
    assert any("state must be 'memory', a redis://" in line for line in out)
    assert f"{tmp_path / 'a.yaml'}:4: ratelimits[0].rate: bad rate '60/10x'" in "\n".join(out)
    assert any(line.startswith(f"{tmp_path / 'a.yaml'}:5: ") for line in out)


def test_schema_is_json_schema_of_the_policy() -> None:
    import json

    schema = json.loads(schema_json())
    assert set(schema["properties"]) == {"lists", "ratelimits", "bursts", "patterns", "scan", "pressure",
                                         "connections", "state", "addresses"}
    rate = schema["$defs"]["RateLimitRule"]["properties"]["rate"]
    assert rate["type"] == "string"
    assert schema["$defs"]["RateLimitRule"]["additionalProperties"] is False


def test_message_conditions_refused_on_rate_limits(tmp_path: Path) -> None:
    """list_traffic/reply would never match at RCPT time: refused, not silently ignored."""
    write(tmp_path, a_yaml=RULE + "    unless:\n      list_traffic: true\n")
    issue = one_issue(tmp_path)
    assert issue.line == 6 and "ratelimits[0].unless.list_traffic" in issue.message
    assert "bursts or patterns" in issue.message


BURST = """\
bursts:
  - name: wave
    threshold: 40 in 10m
"""


def test_header_only_exemptions_load_with_a_warning_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, a_yaml=BURST + "    exempt_list_traffic: true\n    exempt_replies: true\n"
                                   "    unless:\n      - {list_traffic: true}\n      - {sender_in: [x.example]}\n"
                                   "    only: {reply: false}\n")
    _, warnings = load_policy_dir_warned(tmp_path)
    where = [(w.line, w.message.split(":")[1].strip().split()[0]) for w in warnings]
    assert where == [(4, "bursts[0].exempt_list_traffic"), (5, "bursts[0].exempt_replies"),
                     (9, "bursts[0].only.reply"), (7, "bursts[0].unless[0].list_traffic"),
                     (8, "bursts[0].unless[1].sender_in")]
    assert all(w.message.startswith("warning: ") and "any sender can write that header" in w.message
               for w in warnings[:4])
    assert run_check(None, tmp_path) == 0  # still a valid policy: check warns, exits 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[-1].endswith("1 burst, 0 patterns, 5 warnings; settings: defaults (no --settings)")


@pytest.mark.parametrize(("kind", "unless", "only", "warned"), [
    ("burst", "{sender_in: [x.example]}", None, ["sender_in"]),
    ("burst", "{list_id_in: [lists.x.example]}", None, ["list_id_in"]),
    ("burst", "{sender_in: [x.example], list_id_in: [lists.x.example]}", None, ["sender_in", "list_id_in"]),
    ("burst", "{sender_in: [x.example], client_in: [192.0.2.0/24]}", None, []),
    ("burst", "{list_id_in: [lists.x.example], authenticated: true}", None, []),
    ("burst", "{sender_in: [x.example], authenticated: false}", None, ["sender_in"]),
    ("rate", "{sender_in: [x.example]}", None, ["sender_in"]),
    ("rate", "{sender_in: [x.example]}", "{authenticated: true}", []),
    ("rate", "{sender_in: [x.example]}", "{client_in: [10.0.0.0/8]}", []),
    ("burst", "{helo_in: [mx.x.example]}", None, ["helo_in"]),
    ("burst", "{null_sender: true}", None, ["null_sender"]),
    ("burst", "{null_sender: false}", None, []),
])
def test_exemptions_a_sender_can_forge_warn(tmp_path: Path, kind: str, unless: str, only: str | None,
                                            warned: list[str]) -> None:
    """An envelope sender or a List-Id is what the spammer writes: an exemption by either alone hands
    a wave that forges it a free pass, unless the client (its network, its authentication) vouches."""
    write(tmp_path, a_yaml=(BURST if kind == "burst" else RULE) + f"    unless: {unless}\n"
          + (f"    only: {only}\n" if only else ""))
    _, warnings = load_policy_dir_warned(tmp_path)
    assert [w.message.split(":")[1].split()[0].rpartition(".")[2] for w in warnings] == warned
    assert all("anyone can forge" in w.message for w in warnings)


def test_configured_exemptions_and_header_conditions_that_judge_nothing_away_do_not_warn(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="lists:\n  trusted: [lists.example.org]\n" + BURST
          + "    unless: [{list_id_in: trusted, client_in: [192.0.2.0/24]}, {authenticated: true}]\n"
          + "    only: {list_traffic: true}\n")
    assert load_policy_dir_warned(tmp_path)[1] == []


def test_unless_list_items_are_checked_with_their_lines(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=BURST + "    unless:\n      - {sender_in: bulk}\n      - {list_id_in: [\"a b\"]}\n")
    found = sorted((i.line, i.message.split(":")[0]) for i in issues_of(tmp_path))
    assert found == [(5, "bursts[0].unless[0].sender_in"), (6, "bursts[0].unless[1].list_id_in[0]")]


def test_list_id_in_is_refused_on_rate_limits(tmp_path: Path) -> None:
    write(tmp_path, a_yaml=RULE + "    unless:\n      list_id_in: [lists.example.org]\n")
    issue = one_issue(tmp_path)
    assert issue.line == 6 and "ratelimits[0].unless.list_id_in" in issue.message


def test_every_policy_section_survives_the_merge(tmp_path: Path) -> None:
    """A section the merge forgot would load without error and silently fall back to defaults."""
    from queueguard.policy.loader import RULE_SECTIONS, SINGLE_SECTIONS

    assert set(policy_schema_fields()) == {"lists", *RULE_SECTIONS, *SINGLE_SECTIONS}


def policy_schema_fields() -> list[str]:
    from queueguard.policy.schema import Policy

    return list(Policy.model_fields)


def test_a_bad_address_delimiter_is_refused_with_its_line(tmp_path: Path) -> None:
    write(tmp_path, a_yaml="addresses:\n  recipient_delimiter: 'a+'\n")
    issue = one_issue(tmp_path)
    assert issue.line == 2 and "punctuation characters only" in issue.message


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """Nine lists of nine aliases, eight deep, in 500 bytes: as text it is 9**8 entries (writing
    them out took 46 s and 3 GiB before MemoryError). It is a validation error, at once."""
    levels = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, 9)]
    text = "x:\n" + "".join(f"  {line}\n" for line in levels)
    text += "lists:\n  bomb: *l8\nratelimits:\n  - name: r\n    key: recipient\n    rate: 1/1m\n"
    text += "    only: {sender_in: bomb}\n"
    write(tmp_path, a_yaml=text)
    import time
    started = time.monotonic()
    found = issues_of(tmp_path)
    assert time.monotonic() - started < 5
    assert any("lists.bomb" in str(i) for i in found), [str(i) for i in found]


def test_a_policy_file_link_that_leads_nowhere_is_an_error(tmp_path: Path) -> None:
    """A deployment that links 20-rules.yaml to a file it has not rolled out yet (or a link loop)
    loaded as a policy without those rules, silently."""
    write(tmp_path, a_yaml=RULE)
    (tmp_path / "20-rules.yaml").symlink_to(tmp_path / "missing" / "rules.yaml")
    issue = one_issue(tmp_path)
    assert issue.file.endswith("20-rules.yaml") and "No such file or directory" in issue.message
    (tmp_path / "20-rules.yaml").unlink()
    (tmp_path / "30-loop.yaml").symlink_to(tmp_path / "30-loop.yaml")
    assert "Too many levels of symbolic links" in one_issue(tmp_path).message
