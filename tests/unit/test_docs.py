"""The admin docs cannot drift from the code.

- docs/policy.md: every ```yaml block is a policy file that the real `queueguard check`
  accepts (with exactly the warnings of a ```text block that follows, if one does), or, after
  `<!-- expect-error -->`, refuses with exactly the ```text block that follows; every key of
  every model in the policy JSON Schema is in a reference table (`<!-- schema: Model ... -->`
  before it) with its real default and every allowed value.
- docs/settings.md: the same against Settings.model_json_schema(), examples through
  load_settings.
- docs/cli.md: every subcommand's --help runs and every flag it lists is in the doc.
- docs/operations.md: every reason label the code gives a verdict is in the replies table.

Tables are checked against the models, not generated from them: the meaning column is
prose an admin needs and the schema does not carry.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from queueguard import cli
from queueguard import settings as settings_module
from queueguard.check import schema_json
from queueguard.pipeline import End
from queueguard.policy import schema as policy_schema
from queueguard.policy.units import parse_duration, parse_size
from queueguard.resolve import CONNECTION_TEXTS, PRESSURE_TEXTS
from queueguard.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
POLICY_MD = DOCS / "policy.md"
SETTINGS_MD = DOCS / "settings.md"
CLI_MD = DOCS / "cli.md"
OPERATIONS_MD = DOCS / "operations.md"

EXPECT_ERROR = "<!-- expect-error -->"
SCHEMA_TAG = re.compile(r"^<!-- schema: ([A-Za-z0-9_ ]+) -->$")


# --- markdown parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int
    expect_error: bool
    expected_output: str | None


def fenced_blocks(path: Path) -> list[Block]:
    """Fenced code blocks in order; an `expect-error` marker binds to the next block, and the
    ```text block right after that one holds the expected output."""
    lines = path.read_text(encoding="utf-8").splitlines()
    raw: list[tuple[str, str, int, bool]] = []
    marker = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == EXPECT_ERROR:
            marker = True
        elif line.startswith("```"):
            lang, start = line[3:].strip(), i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            raw.append((lang, "\n".join(lines[start:i]) + "\n", start + 1, marker))
            marker = False
        i += 1
    blocks = []
    for n, (lang, text, line_no, expect) in enumerate(raw):
        following = raw[n + 1] if n + 1 < len(raw) and raw[n + 1][0] == "text" else None
        blocks.append(Block(lang, text, line_no, expect, following[1] if following else None))
    return blocks


def yaml_blocks(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path) if b.lang == "yaml"]


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    line: int


def schema_tables(path: Path) -> dict[str, list[Row]]:
    """Model name -> rows of every table tagged `<!-- schema: Model ... -->`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tables: dict[str, list[Row]] = {}
    for i, line in enumerate(lines):
        m = SCHEMA_TAG.match(line.strip())
        if not m:
            continue
        rows: list[Row] = []
        j = i + 3  # tag, header, separator
        assert lines[i + 1].startswith("|") and lines[i + 2].startswith("|---"), f"{path}:{i + 1}: no table"
        while j < len(lines) and lines[j].startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[j].strip())[1:-1]]
            key = re.fullmatch(r"`([A-Za-z0-9_]+)`", cells[0])
            assert key, f"{path}:{j + 1}: first cell must be a `key`"
            rows.append(Row(key.group(1), cells[1], cells[2], j + 1))
            j += 1
        for name in m.group(1).split():
            tables.setdefault(name, []).extend(rows)
    return tables


# --- schema helpers -----------------------------------------------------------------------------------


def model_properties(schema: dict[str, Any], top_name: str) -> dict[str, dict[str, Any]]:
    """Model name -> its JSON Schema properties, for the top level and every $defs model."""
    out = {top_name: schema["properties"]}
    for name, d in schema.get("$defs", {}).items():
        if "properties" in d:
            out[name] = d["properties"]
    return out


def enum_values(prop: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    values: list[str] = []
    if "$ref" in prop:
        values += enum_values(defs[prop["$ref"].rsplit("/", 1)[1]], defs)
    for sub in prop.get("anyOf", []) + prop.get("allOf", []):
        values += enum_values(sub, defs)
    values += [str(v) for v in prop.get("enum", []) if v is not None]
    return values


def plain(value: Any) -> Any:
    """A model default in the form YAML would write it."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def literal_matches(literal: str, default: Any) -> bool:
    if literal == str(default):
        return True
    with contextlib.suppress(yaml.YAMLError):
        if yaml.safe_load(literal) == default:
            return True
    for parse in (parse_duration, parse_size):
        with contextlib.suppress(ValueError, TypeError):
            if not isinstance(default, bool) and parse(literal) == default:
                return True
    return False


def check_tables(doc: Path, schema: dict[str, Any], top_name: str, module: Any) -> list[str]:
    """Every problem between a doc's tagged tables and the models; empty when in step."""
    problems: list[str] = []
    tables = schema_tables(doc)
    models = model_properties(schema, top_name)
    defs = schema.get("$defs", {})
    for name in sorted(set(tables) - set(models)):
        problems.append(f"{doc.name}: table tagged {name!r}, which is not a model in the schema")
    for name, props in sorted(models.items()):
        rows = tables.get(name, [])
        documented = {r.key for r in rows}
        for key in sorted(set(props) - documented):
            problems.append(f"{doc.name}: {name}.{key} is not documented (add a row to its table)")
        for r in rows:
            if r.key not in props:
                problems.append(f"{doc.name}:{r.line}: {name}.{r.key} is documented but not in the schema")
        cls = getattr(module, name)
        for r in rows:
            if r.key not in props:
                continue
            for value in enum_values(props[r.key], defs):
                if f"`{value}`" not in r.type:
                    problems.append(f"{doc.name}:{r.line}: {name}.{r.key}: allowed value `{value}` missing")
            problems += _default_problems(doc, name, r, cls.model_fields[r.key])
    return problems


def _default_problems(doc: Path, model: str, row: Row, field: Any) -> list[str]:
    where = f"{doc.name}:{row.line}: {model}.{row.key}"
    literal = re.match(r"`([^`]*)`", row.default)
    if field.is_required():
        return [] if row.default.startswith("required") else [f"{where}: is required; say so"]
    default = plain(field.get_default(call_default_factory=True))
    if literal:
        if default is None:
            return [f"{where}: has no default, the doc gives `{literal.group(1)}`"]
        if not literal_matches(literal.group(1), default):
            return [f"{where}: doc default `{literal.group(1)}`, code default {default!r}"]
        return []
    if default is None or (isinstance(default, dict | list) and default):
        return []  # prose: "none", "the rate's count", "see below"
    return [f"{where}: give the default as a `literal` (it is {default!r})"]


# --- policy.md ----------------------------------------------------------------------------------------


def _policy_blocks() -> list[Block]:
    return yaml_blocks(POLICY_MD)


def run_check(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `queueguard check`, as a subprocess in `tmp_path`, on `policies/policy.yaml`."""
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "policy.yaml").write_text(text, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "queueguard.cli", "check", "--policies", "policies", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("block", _policy_blocks(), ids=lambda b: f"policy.md:{b.line}")
def test_policy_example_is_checked(block: Block, tmp_path: Path) -> None:
    result = run_check(tmp_path, block.text)
    if not block.expect_error:
        assert result.returncode == 0, f"docs/policy.md:{block.line}: check refused it:\n{result.stdout}{result.stderr}"
        *warnings, summary = result.stdout.splitlines()
        assert summary.startswith("policies/: 1 file, ")
        # a policy that loads may still be warned about: then the ```text block after it shows exactly that
        assert warnings == (block.expected_output or "").splitlines()
        return
    assert block.expected_output is not None, f"docs/policy.md:{block.line}: expect-error needs a ```text block after"
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == block.expected_output.splitlines()


def test_policy_has_an_example_per_section() -> None:
    sections: set[str] = set()
    for block in _policy_blocks():
        if not block.expect_error:
            sections |= set(yaml.safe_load(block.text) or {})
    assert sections >= set(policy_schema.Policy.model_fields)


def test_policy_reference_matches_schema() -> None:
    problems = check_tables(POLICY_MD, json.loads(schema_json()), "Policy", policy_schema)
    assert not problems, "\n".join(problems)


def test_policy_examples_shown_by_errors_are_real_errors() -> None:
    """An expect-error block must be followed by its output, and only those blocks are marked."""
    marked = [b for b in _policy_blocks() if b.expect_error]
    assert marked, "docs/policy.md shows no check errors"
    assert all(b.expected_output for b in marked)


# --- settings.md --------------------------------------------------------------------------------------


def _settings_blocks() -> list[Block]:
    return yaml_blocks(SETTINGS_MD)


@pytest.mark.parametrize("block", _settings_blocks(), ids=lambda b: f"settings.md:{b.line}")
def test_settings_example_loads(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "queueguard.yaml"
    path.write_text(block.text, encoding="utf-8")
    if not block.expect_error:
        load_settings(path)
        return
    assert block.expected_output is not None, f"docs/settings.md:{block.line}: expect-error needs a ```text block"
    with pytest.raises(SettingsError) as e:
        load_settings(path)
    shown = str(e.value).replace(str(path), "queueguard.yaml")
    assert sorted(shown.splitlines()) == sorted(block.expected_output.splitlines())


def test_settings_reference_matches_model() -> None:
    problems = check_tables(SETTINGS_MD, Settings.model_json_schema(), "Settings", settings_module)
    assert not problems, "\n".join(problems)


# --- cli.md -------------------------------------------------------------------------------------------


def command_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command path (('quarantine', 'list'), ...) and its parser, found by walking argparse."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk((*path, name), sub)

    walk((), cli.build_parser())
    return found


def help_text(path: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0, f"queueguard {' '.join(path)} --help exited {e.value.code}"
    return out.getvalue()


@pytest.mark.parametrize("path", sorted(command_parsers()), ids=lambda p: " ".join(p) or "queueguard")
def test_cli_help_runs_and_every_flag_is_documented(path: tuple[str, ...]) -> None:
    doc = CLI_MD.read_text(encoding="utf-8")
    text = help_text(path)
    assert text.startswith("usage: queueguard")
    if path:
        assert " ".join(path) in doc, f"docs/cli.md does not mention `queueguard {' '.join(path)}`"
    parser = command_parsers()[path]
    flags = {f for a in parser._actions if a.help != argparse.SUPPRESS
             for f in a.option_strings if f.startswith("--")} - {"--help"}
    assert all(f in text for f in flags)
    missing = sorted(f for f in flags if not re.search(rf"{re.escape(f)}(?![\w-])", doc))
    assert not missing, f"queueguard {' '.join(path)}: flags not in docs/cli.md: {missing}"
    for action in parser._actions:
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            absent = [str(c) for c in action.choices if f"`{c}`" not in doc and f"{c}\\|" not in doc
                      and f"\\|{c}`" not in doc]
            assert not absent, f"queueguard {' '.join(path)} {action.dest}: choices not in docs/cli.md: {absent}"


# --- operations.md ------------------------------------------------------------------------------------

PACKAGE = ROOT / "queueguard"

# Every non-literal `reason=` expression in the code, and how its labels are found. A new form
# fails test_every_reason_form_is_understood: teach code_reason_labels about it.
DYNAMIC_REASONS = {
    "hit.rule": "resolve.py: scan hits, named by scan/check.py _defer(LABEL, ...)",
    "rule": "resolve.py: pressure hits, named by the keys of resolve.PRESSURE_TEXTS",
    "f'route_{why}'": "resolve.py: route hits, named by routing.py _defer(route, LABEL, ...)",
    "kind": "resolve.py: rule kinds (ratelimit, burst, pattern)",
    "hit.kind": "rule kinds that quarantine",
    "f'downstream_{stage}'": "pipeline/session.py from_downstream(reply, STAGE)",
    "verdict.reason": "the pipeline passing a verdict's reason on",
    "reason": "verdict.py: the verdict makers passing their argument on",
    "f'connection_{rule}'": "resolve.py: connection limits, named by the keys of resolve.CONNECTION_TEXTS",
}
VERDICT_MAKERS = ("tempfail", "reject", "quarantine", "Verdict")
RULE_KINDS = ("ratelimit", "burst", "pattern")


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _const(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def reason_expressions() -> list[tuple[str, ast.expr]]:
    """(file, expression) for the reason of every verdict the code makes."""
    found: list[tuple[str, ast.expr]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _calls(path):
            if _name(call) in VERDICT_MAKERS:
                found += [(path.name, k.value) for k in call.keywords if k.arg == "reason"]
            if _name(call) == "Verdict" and len(call.args) >= 6:
                found.append((path.name, call.args[5]))
    return found


def code_reason_labels() -> set[str]:
    """Every reason label a verdict can carry, read from the source."""
    labels = {v for _, e in reason_expressions() if (v := _const(e)) is not None}
    for call in _calls(PACKAGE / "scan" / "check.py"):
        if _name(call) == "_defer" and call.args:
            first = call.args[0]
            if (label := _const(first)) is not None:
                labels.add(label)
            elif isinstance(first, ast.BinOp) and (prefix := _const(first.left)) is not None:
                # "clamd_" + err.reason, "busy_" + e.reason: the codes of ScanError / GateBusy
                source = {"clamd_": ("clamd.py", "ScanError"), "busy_": ("gate.py", "GateBusy")}[prefix]
                for c in _calls(PACKAGE / "scan" / source[0]):
                    permanent = any(k.arg == "permanent" for k in c.keywords)
                    if _name(c) == source[1] and c.args and (code := _const(c.args[0])) and not permanent:
                        labels.add(prefix + code)
    for call in _calls(PACKAGE / "routing.py"):
        if _name(call) == "_defer" and len(call.args) >= 2 and (label := _const(call.args[1])):
            labels.add(f"route_{label}")
    for call in _calls(PACKAGE / "pipeline" / "session.py"):
        if _name(call) == "from_downstream" and len(call.args) >= 2 and (stage := _const(call.args[1])):
            labels.add(f"downstream_{stage}")
    return (labels | set(RULE_KINDS) | set(PRESSURE_TEXTS) | {why.value for why in End}
            | {f"connection_{why}" for why in CONNECTION_TEXTS})


def documented_reasons() -> set[str]:
    """Backticked labels in the reason column of the tables after `<!-- replies -->`."""
    lines = OPERATIONS_MD.read_text(encoding="utf-8").splitlines()
    out: set[str] = set()
    for i, line in enumerate(lines):
        if line.strip() != "<!-- replies -->":
            continue
        header = [c.strip() for c in lines[i + 1].strip().strip("|").split("|")]
        col = header.index("reason")
        j = i + 3
        while j < len(lines) and lines[j].startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[j].strip())[1:-1]]
            out |= set(re.findall(r"`([a-z0-9_]+)`", cells[col]))
            j += 1
    return out


def test_every_reason_form_is_understood() -> None:
    unknown = sorted({f"{f}: {ast.unparse(e)}" for f, e in reason_expressions()
                      if _const(e) is None and ast.unparse(e) not in DYNAMIC_REASONS})
    assert not unknown, f"new kinds of reason= expressions; teach code_reason_labels: {unknown}"


def test_every_reason_label_is_in_the_replies_table() -> None:
    code, doc = code_reason_labels(), documented_reasons()
    assert {"ratelimit", "shed", "clamd_timeout", "busy_wait_timeout", "route_split", "downstream_data"} <= code
    assert not code - doc, f"reasons missing from docs/operations.md replies tables: {sorted(code - doc)}"
    assert not doc - code, f"docs/operations.md lists reasons the code no longer uses: {sorted(doc - code)}"


def test_log_line_fields_are_documented() -> None:
    from queueguard.logging_setup import MESSAGE_FIELDS

    doc = OPERATIONS_MD.read_text(encoding="utf-8")
    missing = [f for f in MESSAGE_FIELDS if f"`{f}`" not in doc]
    assert not missing, f"message log fields missing from docs/operations.md: {missing}"


def test_policy_documents_every_rate_limit_key_part() -> None:
    from queueguard.policy.keys import KINDS

    doc = POLICY_MD.read_text(encoding="utf-8")
    missing = [k for k in KINDS if f"| `{k}` |" not in doc]
    assert not missing, f"rate-limit key parts missing from docs/policy.md: {missing}"


@pytest.mark.parametrize("doc", [POLICY_MD, SETTINGS_MD, CLI_MD, OPERATIONS_MD], ids=lambda p: p.name)
def test_links_resolve(doc: Path) -> None:
    """Relative links point at files that exist and at headings that exist in them."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file) if file else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower-case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
