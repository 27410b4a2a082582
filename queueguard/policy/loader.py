"""Load the policy directory into one Policy, or say exactly what is wrong where.

Every `*.yaml`/`*.yml` file directly in the directory is read (name order;
hidden files and subdirectories such as `examples/` are not), with PyYAML's
safe loader. Each file is validated on its own, so pydantic's error paths map
onto that file's YAML nodes and every error gets a `file:line`. Then the
files are merged: `lists` by name (a name defined twice is an error), rule
lists concatenate in file order, rule names are unique across all files and
kinds, `scan`, `pressure`, `connections` and `state` may appear in one file only. Cross-checks that need
the whole policy (list names exist, CIDRs parse, RE2 regexes compile,
rate-limit keys parse) run last and also point at lines.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2
import yaml
from pydantic import BaseModel, ValidationError

from queueguard.policy.keys import parse_key
from queueguard.policy.match import compiled, parse_network
from queueguard.policy.schema import BurstRule, Condition, PatternRule, Policy, RateLimitRule, RuleBase

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
"""Nesting a policy may have (it needs 6): deeper is refused before Python's recursion limit is."""
RULE_SECTIONS = ("ratelimits", "bursts", "patterns")
SINGLE_SECTIONS = ("scan", "pressure", "connections", "state", "addresses")
ADDRESS_FIELDS = ("sender_in", "recipient_in", "helo_in", "list_id_in")
MESSAGE_FIELDS = ("list_traffic", "reply", "list_id_in")
"""Condition keys that look at the message: a rate limit (decided at RCPT) cannot use them."""

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class PolicyIssue:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class PolicyError(Exception):
    """The policy cannot be used; `.issues` lists every problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


def policy_files(path: Path) -> list[Path]:
    """The policy files of a directory; a symbolic link among them that leads nowhere is one too
    (reading it fails, and says so), not silently a policy without its rules."""
    return sorted(
        p for p in path.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and (p.is_file() or p.is_symlink())
    )


def load_policy_dir(path: Path) -> Policy:
    """Read, validate and merge every policy file in `path`; PolicyError lists all problems."""
    return load_policy_dir_warned(path)[0]


def load_policy_dir_warned(path: Path) -> tuple[Policy, list[PolicyIssue]]:
    """load_policy_dir, plus the warnings: what loads but is probably not what the admin wants."""
    if not path.is_dir():
        raise PolicyError([PolicyIssue(str(path), 0, "not a directory")])
    files = policy_files(path)
    if not files:
        raise PolicyError([PolicyIssue(str(path), 0, "no policy files (*.yaml, *.yml) in this directory")])
    issues: list[PolicyIssue] = []
    docs = [doc for f in files if (doc := _read(f, issues)) is not None]
    for doc in docs:
        try:
            doc.policy = Policy.model_validate(doc.data)
            doc.rules = list(_rules(doc.policy))
        except ValidationError as e:
            issues.extend(_pydantic_issues(doc, e))
            doc.rules = _valid_rules(doc.data)
    issues.extend(_cross_check(docs))
    if issues:
        raise PolicyError(issues)
    policy = _merge(docs)
    compiled(policy).warm(policy)
    return policy, [w for doc in docs for w in _warnings(doc)]


@dataclass
class _Doc:
    file: str
    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)
    policy: Policy | None = None
    rules: list[tuple[Loc, RuleBase]] = field(default_factory=list)

    def line(self, loc: Loc) -> int:
        """The line of `loc`, or of its nearest parent that has one."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return 1

    def issue(self, loc: Loc, message: str) -> PolicyIssue:
        return PolicyIssue(self.file, self.line(loc), message)


def _read(path: Path, issues: list[PolicyIssue]) -> _Doc | None:
    name = str(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            issues.append(PolicyIssue(name, 0, f"file larger than {MAX_FILE_BYTES} bytes"))
            return None
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        issues.append(PolicyIssue(name, 0, f"not UTF-8 text: {e.reason} at byte {e.start}"))
        return None
    except OSError as e:
        issues.append(PolicyIssue(name, 0, f"cannot read: {e.strerror}"))
        return None
    loader = yaml.SafeLoader(text)
    doc = _Doc(name, {})
    try:
        node = loader.get_single_node()
        if node is not None:
            before = len(issues)
            _walk(node, (), doc, issues, set())
            if len(issues) > before:
                return None
            data = loader.construct_document(node)
        else:
            data = {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(x for x in (e.context, e.problem) if x)
        issues.append(PolicyIssue(name, mark.line + 1 if mark else 0, f"YAML syntax: {what}"))
        return None
    except yaml.YAMLError as e:
        issues.append(PolicyIssue(name, 0, f"YAML: {e}"))
        return None
    except RecursionError:  # the YAML composer recurses per level: thousands of `[[[` end here
        issues.append(PolicyIssue(name, 0, f"nested deeper than {MAX_DEPTH} levels"))
        return None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        issues.append(PolicyIssue(name, 1, "the top level must be a mapping (lists:, ratelimits:, ...)"))
        return None
    doc.data = data
    return doc


def _walk(node: yaml.Node, loc: Loc, doc: _Doc, issues: list[PolicyIssue], seen: set[int]) -> None:
    """Record the line of every key and item; refuse duplicate keys (YAML would keep the last silently).
    Each node is visited once, so aliases cannot blow up the walk."""
    if id(node) in seen:
        return
    seen.add(id(node))
    doc.lines.setdefault(loc, node.start_mark.line + 1)
    if len(loc) > MAX_DEPTH:
        issues.append(doc.issue(loc, f"nested deeper than {MAX_DEPTH} levels"))
        return
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first:
                issues.append(PolicyIssue(
                    doc.file, line, f"duplicate key {key!r} (first at line {first[key]})"))
                continue
            first[key] = line
            doc.lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), doc, issues, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.lines[(*loc, i)] = item.start_mark.line + 1
            _walk(item, (*loc, i), doc, issues, seen)


# --- pydantic errors → file:line ------------------------------------------------------------------

def _real_loc(data: Any, loc: Loc) -> tuple[Loc, bool]:
    """The parts of `loc` present in the data, and whether any were skipped: pydantic puts
    union-branch and validator tags ('str', 'list[str]') into the path."""
    cur, real, skipped = data, [], False
    for part in loc:
        in_dict = isinstance(cur, dict) and isinstance(part, str) and part in cur
        in_list = isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        if in_dict or in_list:
            cur = cur[part]
            real.append(part)
        else:
            skipped = True
    return tuple(real), skipped


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional/unions down to the model class, if there is one."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return tp


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class whose keys are valid at `loc` (for 'did you mean')."""
    tp: Any = Policy
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            info = tp.model_fields.get(part)
            if info is None:
                return None
            tp = info.annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _describe(err: Any, real: Loc) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        key = str(real[-1])
        model = _model_at(real[:-1])
        if model is None:
            return f"unknown key {key!r}"
        known = list(model.model_fields)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {key!r} ({hint}allowed: {', '.join(known)})"
    if kind == "missing":
        return f"missing required key {err['loc'][-1]!r}"
    msg = str(msg).removeprefix("Value error, ")
    if kind.endswith(("_type", "_parsing", "literal_error")) and not isinstance(value, dict | list):
        msg += f", got {value!r}"[:120]
    return msg


def _pydantic_issues(doc: _Doc, error: ValidationError) -> list[PolicyIssue]:
    found: list[tuple[Loc, bool, str]] = []
    for err in error.errors():
        real, skipped = _real_loc(doc.data, tuple(err["loc"]))
        found.append((real, skipped and err["type"] != "missing", _describe(err, real)))
    # A union (list name | list of entries) reports one error per branch: keep the branch
    # that got furthest into the data, so the admin sees the error that is really there.
    deeper = {real for real, tagged, _ in found if tagged}
    out: dict[tuple[Loc, str], PolicyIssue] = {}
    for real, tagged, msg in found:
        if tagged and any(d[: len(real)] == real and len(d) > len(real) for d in deeper):
            continue
        where = _path(real) if real else "top level"
        out.setdefault((real, msg), doc.issue(real, f"{where}: {msg}"))
    merged: dict[Loc, list[PolicyIssue]] = {}
    for (real, _), issue in out.items():
        merged.setdefault(real, []).append(issue)
    result = []
    for real, group in merged.items():
        if len(group) == 1:
            result.append(group[0])
        else:  # several union branches failed at the same place: one line, alternatives joined
            msgs = [i.message.split(": ", 1)[1] for i in group]
            if any("valid string" in m for m in msgs) and any("valid list" in m for m in msgs):
                msgs = ["expected a list name or a list of entries"]
            result.append(doc.issue(real, f"{_path(real)}: {' or '.join(msgs)}"))
    return result


# --- whole-policy checks ----------------------------------------------------------------------------

def _rules(policy: Policy) -> Iterator[tuple[Loc, RuleBase]]:
    for section in RULE_SECTIONS:
        for i, rule in enumerate(getattr(policy, section)):
            yield (section, i), rule


_RULE_MODELS: dict[str, type[RuleBase]] = {
    "ratelimits": RateLimitRule, "bursts": BurstRule, "patterns": PatternRule,
}


def _valid_rules(data: dict[str, Any]) -> list[tuple[Loc, RuleBase]]:
    """The rules of a file that failed validation which are valid on their own, so the
    cross-checks still report their problems in the same run."""
    out: list[tuple[Loc, RuleBase]] = []
    for section, model in _RULE_MODELS.items():
        items = data.get(section)
        for i, item in enumerate(items if isinstance(items, list) else []):
            try:
                out.append(((section, i), model.model_validate(item)))
            except ValidationError:
                continue
    return out


def _cross_check(docs: list[_Doc]) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    lists: dict[str, tuple[_Doc, list[Any]]] = {}
    for doc in docs:
        raw_lists = doc.data.get("lists")
        for name, entries in (raw_lists.items() if isinstance(raw_lists, dict) else ()):
            if name in lists:
                first = lists[name][0]
                issues.append(doc.issue(("lists", name), f"list {name!r} is already defined in "
                                        f"{first.file}:{first.line(('lists', name))}"))
            else:
                lists[name] = (doc, entries if isinstance(entries, list) else [])
    for section in SINGLE_SECTIONS:
        owners = [d for d in docs if section in d.data]
        for doc in owners[1:]:
            issues.append(doc.issue((section,), f"section {section!r} may appear in one file only; "
                                    f"it is already in {owners[0].file}:{owners[0].line((section,))}"))
    names: dict[str, str] = {}
    checked_lists: dict[tuple[str, str], bool] = {}
    for doc in docs:
        connections = doc.policy.connections if doc.policy is not None and "connections" in doc.data else None
        if connections is not None and connections.unless is not None:
            cloc: Loc = ("connections", "unless")
            issues.extend(_check_condition(doc, cloc, connections.unless, lists, checked_lists))
            issues.extend(doc.issue((*cloc, f), f"{_path((*cloc, f))}: only client_in is known when a client "
                                                "connects")
                          for f in Condition.model_fields
                          if f != "client_in" and getattr(connections.unless, f) is not None)
        for loc, rule in doc.rules:
            where = f"{doc.file}:{doc.line((*loc, 'name'))}"
            if rule.name in names:
                issues.append(doc.issue((*loc, "name"), f"rule name {rule.name!r} is already used at "
                                                        f"{names[rule.name]}"))
            else:
                names[rule.name] = where
            for cloc, cond in _conditions(loc, rule):
                issues.extend(_check_condition(doc, cloc, cond, lists, checked_lists))
                if isinstance(rule, RateLimitRule):
                    issues.extend(_data_stage_only(doc, cloc, cond))
            if isinstance(rule, RateLimitRule):
                try:
                    parse_key(rule.key)
                except ValueError as e:
                    issues.append(doc.issue((*loc, "key"), f"{_path((*loc, 'key'))}: {e}"))
            if isinstance(rule, PatternRule):
                issues.extend(_check_pattern(doc, loc, rule))
    return issues


def _conditions(loc: Loc, rule: RuleBase) -> list[tuple[Loc, Condition]]:
    """Every condition of a rule with its place: `only`, `unless`, or each item of an `unless` list."""
    found: list[tuple[Loc, Condition]] = [((*loc, "only"), rule.only)] if rule.only is not None else []
    if isinstance(rule.unless, list):
        found += [((*loc, "unless", i), c) for i, c in enumerate(rule.unless)]
    elif rule.unless is not None:
        found.append(((*loc, "unless"), rule.unless))
    return found


HEADER_ONLY = ("any sender can write that header, so a wave carrying it would pass uncounted; exempt "
               "configured senders from their own networks instead ({sender_in: bulk_senders, "
               "client_in: bulk_networks}, authenticated)")
FORGEABLE = ("alone exempts mail by what its sender writes (an envelope sender, a HELO name or a List-Id, "
             "which anyone can forge), so a wave forging one passes uncounted; add client_in (the networks "
             "that mail comes from) or authenticated: true to the same condition")


def _warnings(doc: _Doc) -> list[PolicyIssue]:
    """Burst and rate-limit rules that ask for an exemption a sender can buy by writing a header
    or an envelope sender (docs/policy.md#bursts says why)."""
    out = []
    for loc, rule in doc.rules:
        if not isinstance(rule, BurstRule | RateLimitRule):
            continue
        for flag, what in (("exempt_list_traffic", "List-Id/List-Unsubscribe"),
                           ("exempt_replies", "In-Reply-To/References")):
            if getattr(rule, flag, False):
                out.append(doc.issue((*loc, flag), f"warning: {_path((*loc, flag))}: true exempts every message "
                                                   f"with {what}: {HEADER_ONLY}"))
        for cloc, cond in _conditions(loc, rule):
            skips_when = cloc[len(loc)] == "unless"
            for key in ("list_traffic", "reply"):
                value = getattr(cond, key)
                if value is not None and value == skips_when:
                    out.append(doc.issue((*cloc, key), f"warning: {_path((*cloc, key))}: {str(value).lower()} "
                                                       f"exempts messages by a header: {HEADER_ONLY}"))
            vouched = any(c is not None and (c.client_in is not None or c.authenticated is True)
                          for c in (cond, rule.only))
            if skips_when and not vouched:
                out.extend(doc.issue((*cloc, key), f"warning: {_path((*cloc, key))} {FORGEABLE}")
                           for key in ("sender_in", "helo_in", "list_id_in", "null_sender")
                           if getattr(cond, key) is not None and getattr(cond, key) is not False)
    return out


def _check_condition(
    doc: _Doc, loc: Loc, cond: Condition, lists: dict[str, tuple[_Doc, list[Any]]],
    checked: dict[tuple[str, str], bool],
) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    if all(getattr(cond, f) is None for f in Condition.model_fields):
        issues.append(doc.issue(loc, f"{_path(loc)}: empty condition (give at least one of "
                                     f"{', '.join(Condition.model_fields)})"))
    for fname in (*ADDRESS_FIELDS, "client_in"):
        ref = getattr(cond, fname)
        if ref is None:
            continue
        floc = (*loc, fname)
        kind = "net" if fname == "client_in" else "name"
        if isinstance(ref, str):
            if ref not in lists:
                known = ", ".join(sorted(lists)) or "none defined"
                issues.append(doc.issue(floc, f"{_path(floc)}: unknown list {ref!r} (lists: {known})"))
                continue
            if (ref, kind) in checked:
                continue
            checked[(ref, kind)] = True
            owner, entries = lists[ref]
            issues.extend(_check_entries(owner, ("lists", ref), entries, kind))
        else:
            issues.extend(_check_entries(doc, floc, ref, kind))
    return issues


def _data_stage_only(doc: _Doc, loc: Loc, cond: Condition) -> list[PolicyIssue]:
    """Rate limits are decided at RCPT, before the message exists: a condition on its headers
    would silently never match there, so it is refused instead."""
    return [doc.issue((*loc, f), f"{_path((*loc, f))}: '{f}' looks at the message, which a rate limit "
                                 "(checked at RCPT) has not seen yet; use it in bursts or patterns")
            for f in MESSAGE_FIELDS if getattr(cond, f) is not None]


def _check_entries(doc: _Doc, loc: Loc, entries: list[Any], kind: str) -> list[PolicyIssue]:
    issues = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):  # validation said so already; str() of an alias bomb is gigabytes
            continue
        text = entry
        if kind == "net":
            try:
                parse_network(text)
            except ValueError as e:
                issues.append(doc.issue((*loc, i), f"{_path((*loc, i))}: {e}"))
        elif not text.strip() or any(c.isspace() for c in text.strip()):
            issues.append(doc.issue((*loc, i), f"{_path((*loc, i))}: invalid entry {text!r} "
                                               "(an address glob, a domain or @domain; no spaces)"))
    return issues


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
MAX_PROGRAM_SIZE = 5000
"""RE2's compiled size of a pattern with large counted repetitions, at most. Matching is linear in
the text, but such a pattern outgrows RE2's DFA memory and falls back to a slower engine:
`.{0,1000}X.{0,1000}Y` (18,006) took 4.5 s over a 200 KB message any sender can write, holding
every session; `.{0,200}X.{0,200}Y` (3,606) 5 ms. A long alternation of words is as large, but
its DFA stays small: it is not refused."""
_COUNTED = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


def compile_regex(pattern: str) -> re2._Regexp[str]:
    """Compile under RE2 (linear-time matching: no catastrophic backtracking on hostile mail)."""
    return re2.compile(pattern, options=_RE2_OPTIONS)


def _check_pattern(doc: _Doc, loc: Loc, rule: PatternRule) -> list[PolicyIssue]:
    issues = []
    fields: list[tuple[Loc, str]] = [
        ((*loc, f), getattr(rule, f)) for f in ("subject", "body", "sender", "recipient") if getattr(rule, f)
    ]
    fields += [((*loc, "headers", h), p) for h, p in rule.headers.items()]
    if not fields:
        issues.append(doc.issue(loc, f"{_path(loc)}: a pattern rule needs at least one of "
                                     "subject, body, sender, recipient, headers"))
    for floc, pattern in fields:
        if floc[-2] == "headers" and not str(floc[-1]).replace("-", "").isalnum():
            issues.append(doc.issue(floc, f"{_path(floc)}: {floc[-1]!r} is not a header name"))
        try:
            size = compile_regex(pattern).programsize
        except re2.error as e:
            why = str(e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else e)
            issues.append(doc.issue(floc, f"{_path(floc)}: regex does not compile under RE2: {why}"))
            continue
        if size > MAX_PROGRAM_SIZE and max((int(b or a) for a, b in _COUNTED.findall(pattern)), default=0) >= 100:
            issues.append(doc.issue(floc, f"{_path(floc)}: regex too costly to run on every message (RE2 "
                                          f"program size {size}, at most {MAX_PROGRAM_SIZE}): use smaller "
                                          "counted repetitions such as .{0,200} instead of .{0,1000}"))
    return issues


def _merge(docs: list[_Doc]) -> Policy:
    merged: dict[str, Any] = {"lists": {}, "ratelimits": [], "bursts": [], "patterns": []}
    for doc in docs:
        policy = doc.policy
        assert policy is not None, "merge runs only when every file validated"
        merged["lists"].update(policy.lists)
        for section in RULE_SECTIONS:
            merged[section].extend(getattr(policy, section))
        for section in SINGLE_SECTIONS:
            if section in doc.data:
                merged[section] = getattr(policy, section)
    return Policy.model_validate(merged)
