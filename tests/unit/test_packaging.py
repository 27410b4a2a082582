"""What an installed wheel needs is in the package, once, and the package needs nothing else.

The shipped files live in `queueguard/shipped/` (package data); the paths
operators and docs know (`contrib/...`, `policies/default.yaml`) are symlinks
to them, so a copy that drifts cannot exist. Every module of the package
imports without `tests` or `bench` (tests/integration/test_wheel.py runs the
same check in a venv that has only the built wheel).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from queueguard.shipped import ALERT_RULES, DEFAULT_POLICY, EXIM_SNIPPETS

REPO = Path(__file__).resolve().parents[2]
LINKS = {
    REPO / "contrib" / "exim" / "proxy-deployment.conf": EXIM_SNIPPETS / "proxy-deployment.conf",
    REPO / "contrib" / "exim" / "readsocket-acl.conf": EXIM_SNIPPETS / "readsocket-acl.conf",
    REPO / "contrib" / "prometheus" / "queueguard-alerts.yml": ALERT_RULES,
    REPO / "policies" / "default.yaml": DEFAULT_POLICY,
}


@pytest.mark.parametrize("link", list(LINKS), ids=lambda p: str(p.relative_to(REPO)))
def test_source_tree_paths_are_symlinks_to_the_shipped_files(link: Path) -> None:
    target = LINKS[link]
    assert target.is_file() and not target.is_symlink()
    assert link.is_symlink(), f"{link} must stay a symlink to {target} (one copy of each shipped file)"
    assert link.resolve() == target
    assert not Path(link.readlink()).is_absolute()  # valid in any checkout and in `git archive`


def test_every_shipped_file_has_a_source_tree_link() -> None:
    shipped = {p for p in EXIM_SNIPPETS.parent.rglob("*") if p.is_file() and p.suffix in (".conf", ".yml", ".yaml")}
    assert shipped == set(LINKS.values())


IMPORT_ALL = """
import importlib, importlib.abc, json, pkgutil, sys
attempts = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tests", "bench"):
            attempts.append(name)
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, Refuse())
import queueguard
names = ["queueguard"] + [m.name for m in pkgutil.walk_packages(queueguard.__path__, "queueguard.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "files": [sys.modules[n].__file__ for n in names], "attempts": attempts,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("tests", "bench"))}))
"""
"""Imports every module of the installed queueguard; records any attempt to import tests or bench."""


def import_everything(python: str, cwd: Path) -> dict[str, list[str]]:
    """Run IMPORT_ALL isolated (-I: no PYTHONPATH, no cwd on sys.path) in `cwd`, outside the checkout."""
    out = subprocess.run([python, "-I", "-c", IMPORT_ALL], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result: dict[str, list[str]] = json.loads(out.stdout)
    return result


def test_the_package_imports_nothing_from_tests_or_bench(tmp_path: Path) -> None:
    got = import_everything(sys.executable, tmp_path)
    assert got["attempts"] == [] and got["loaded"] == []
    assert {"queueguard.harness.guard", "queueguard.harness.exim", "queueguard.replay.scenarios.vrts_spam_wave",
            "queueguard.replay.corpus", "queueguard.frontends.milter"} <= set(got["modules"])
    assert all(Path(f).is_relative_to(REPO / "queueguard") for f in got["files"])
