"""The shortcut QueueguardSMTP/ProxyHandler.__dir__ gives aiosmtpd must yield exactly the
command and hook tables a full dir() would (guards against an aiosmtpd upgrade), and no AUTH
mechanism: the proxy authenticates nobody."""

from __future__ import annotations

import asyncio

from queueguard.frontends.smtp_proxy import ProxyHandler, QueueguardSMTP
from queueguard.settings import SmtpSettings


async def test_tables_match_full_introspection() -> None:
    handler = ProxyHandler(None, SmtpSettings())  # type: ignore[arg-type]
    proto = QueueguardSMTP(handler, data_size_limit=1000, enable_SMTPUTF8=True, hostname="x")
    full_self = object.__dir__(proto)
    full_handler = object.__dir__(handler)
    assert set(proto._smtp_methods) == {m[5:] for m in full_self if m.startswith("smtp_")}
    assert set(proto._handle_hooks) == {m[7:] for m in full_handler if m.startswith("handle_")}
    assert proto._auth_methods == {}
    assert {"DATA", "RCPT", "MAIL", "EHLO", "PROXY", "RSET", "exception"} <= set(proto._handle_hooks)
    await asyncio.sleep(0)
