"""Probes against real daemons: Exim's banner with and without PROXY, clamd PING/STATS, a closed port."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prometheus_client import REGISTRY

from queueguard.harness.clamd import Clamd
from queueguard.harness.exim import Exim
from queueguard.harness.ports import free_port
from queueguard.queuewatch.probes import probe_clamd, probe_smtp
from queueguard.queuewatch.service import QueueWatch
from queueguard.scan.clamd import ClamdClient
from queueguard.settings import Downstream, QueueWatchSettings


async def test_banner_probe_plain_exim() -> None:
    with Exim() as exim:
        result = await probe_smtp(f"127.0.0.1:{exim.port}")
        assert result.up, result.detail
        assert result.detail.startswith("220 ")
        # the probe said QUIT: Exim logs a clean close, not a lost connection
        exim.wait_log(r"SMTP connection from \[127\.0\.0\.1\].* closed by QUIT", timeout=5)


async def test_banner_probe_through_proxy_protocol() -> None:
    """Exim with hosts_proxy: v2 LOCAL and v1 headers get the banner; a bare connection is dropped."""
    with Exim(proxy=True) as exim:
        versions: tuple[Literal["v2", "v1"], ...] = ("v2", "v1")
        for version in versions:
            result = await probe_smtp(f"127.0.0.1:{exim.port}", version)
            assert result.up, f"{version}: {result.detail}"
        bare = await probe_smtp(f"127.0.0.1:{exim.port}", "none", within=1.0)
        assert not bare.up
        assert bare.detail.startswith("banner: TimeoutError")


async def test_banner_probe_closed_port() -> None:
    result = await probe_smtp(f"127.0.0.1:{free_port()}", within=2.0)
    assert not result.up and result.detail.startswith("connect: ConnectionRefusedError")


async def test_clamd_probe_and_queuewatch_metrics(tmp_path: Path) -> None:
    with Exim() as exim, Clamd(tmp_path / "clamd", max_threads=3) as clamd:
        client = ClamdClient(str(clamd.socket), connect_timeout=1.0, timeout=3.0)
        result = await probe_clamd(client)
        assert result.up and result.detail == "PONG"
        assert result.stats["threads_max"] == 3 and result.stats["queue_items"] == 0

        dead = f"127.0.0.1:{free_port()}"
        watch = QueueWatch(QueueWatchSettings(filesystems=[tmp_path]), clamd=client,
                           downstreams=[Downstream(address=f"127.0.0.1:{exim.port}"), Downstream(address=dead)])
        await watch.collect()
        assert REGISTRY.get_sample_value("queueguard_clamd_up") == 1
        assert REGISTRY.get_sample_value("queueguard_clamd_threads", {"state": "max"}) == 3
        assert REGISTRY.get_sample_value("queueguard_downstream_reachable",
                                         {"downstream": f"127.0.0.1:{exim.port}"}) == 1
        assert REGISTRY.get_sample_value("queueguard_downstream_reachable", {"downstream": dead}) == 0

        clamd.kill9()
        down = await probe_clamd(client)
        assert not down.up and down.detail.startswith(("connect", "reset"))
        await watch.collect()
        assert REGISTRY.get_sample_value("queueguard_clamd_up") == 0
        snap = watch.snapshot()
        assert snap["clamd"] == {"up": False, "detail": down.detail}
