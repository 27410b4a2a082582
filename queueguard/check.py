"""`queueguard check` and `queueguard schema`: validate before you reload."""

from __future__ import annotations

import json
from pathlib import Path

from queueguard.policy.holder import describe
from queueguard.policy.loader import PolicyError, PolicyIssue, load_policy_dir_warned, policy_files
from queueguard.policy.schema import Policy
from queueguard.settings import SettingsError, host_problems, load_settings


def run_check(settings_path: Path | None, policies: Path | None) -> int:
    """Print every error (`file:line: message`) and return 1, or the warnings (`file:line: warning: ...`)
    and a one-line summary and return 0: a warning is a policy that loads but probably does not do
    what the admin meant.

    The policy directory is `policies`, else the settings' `policies`, else ./policies.
    """
    errors: list[str] = []
    settings_note = "settings: defaults (no --settings)"
    directory = policies
    if settings_path is not None:
        try:
            settings = load_settings(settings_path)
            settings_note = "settings ok"
            directory = directory or settings.policies
            errors.extend(f"{settings_path}: {p}" for p in host_problems(settings))
        except SettingsError as e:
            errors.extend(str(e).splitlines())
    directory = directory or Path("policies")
    warnings: list[PolicyIssue] = []
    try:
        policy, warnings = load_policy_dir_warned(directory)
    except PolicyError as e:
        errors.extend(str(i) for i in e.issues)
    if errors:
        for line in errors:
            print(line)
        return 1
    for warning in warnings:
        print(warning)
    files = len(policy_files(directory))
    name = f"{directory}/" if not str(directory).endswith("/") else str(directory)
    noted = f", {len(warnings)} warning{'' if len(warnings) == 1 else 's'}" if warnings else ""
    print(f"{name}: {files} file{'' if files == 1 else 's'}, {describe(policy)}{noted}; {settings_note}")
    return 0


def schema_json() -> str:
    """JSON Schema of the policy files, for editors (yaml-language-server) and CI."""
    schema = Policy.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "queueguard policy file"
    return json.dumps(schema, indent=2, sort_keys=True)
