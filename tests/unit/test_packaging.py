"""What an installed wheel needs is in the package, once.

The shipped files live in `queueguard/shipped/` (package data); the paths
operators and docs know (`contrib/...`, `policies/default.yaml`) are symlinks
to them, so a copy that drifts cannot exist.
"""

from __future__ import annotations

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
