"""Files queueguard ships for operators, kept here so an installed wheel has them too.

The harness (`queueguard.harness`) includes the Exim snippets verbatim, the
replays evaluate the alert rules and start from the default policy, so these
are the only copies: `contrib/exim/*.conf`, `contrib/prometheus/queueguard-alerts.yml`
and `policies/default.yaml` in the source tree are symlinks to them.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent
EXIM_SNIPPETS = SHIPPED / "exim"
"""proxy-deployment.conf and readsocket-acl.conf (installation: contrib/exim/README.md)."""
ALERT_RULES = SHIPPED / "prometheus" / "queueguard-alerts.yml"
DEFAULT_POLICY = SHIPPED / "policies" / "default.yaml"
