"""Daemon settings: where to listen, where to relay, where state lives.

Validated once at start (pydantic, unknown keys refused); policies — what to
do with mail — live in the policy directory instead, so they can be reloaded.
Command-line flags override the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from queueguard.policy.schema import Duration, Size
from queueguard.redis_client import parse as parse_redis_url
from queueguard.webauth import parse_password_hash, read_token


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def split_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    """'127.0.0.1:2525' / '[::1]:25' / 'host' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if port and not port.isdigit():
        raise ValueError(f"bad address {text!r}: port must be a number")
    number = int(port) if port else default_port
    if not 0 <= number < 65536:
        raise ValueError(f"bad address {text!r}: port must be 0-65535 (0: any free port)")
    if any(c.isspace() for c in host):
        raise ValueError(f"bad address {text!r}: no spaces in a host name")
    return host or "127.0.0.1", number


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_address(text: str, default_port: int) -> str:
    """A listen address must name an address of this host: an IP literal (or localhost), HOST:PORT."""
    host, _ = split_hostport(text, default_port)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"bad listen address {text!r}: give an IP address and port, like "
                             f"127.0.0.1:{default_port} or [::]:{default_port}") from None
    return text


class Downstream(Strict):
    address: str = Field(description="host:port of the MTA we relay to")
    proxy_protocol: Literal["none", "v1", "v2"] = "none"
    max_connections: int = Field(16, ge=1)
    helo: str = ""
    retry_after: Duration = Field(5.0, description="first back-off after a failure; doubles up to 8x")

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        split_hostport(v)
        return v


class RoutePressure(Strict):
    """Where the host behind a route publishes its pressure (docs/routes.md)."""

    source: Literal["redis", "http"] = "redis"
    name: str = Field("", description="redis: the publisher's publish_pressure name")
    url: str = Field("", description="http: the other queueguard's /status.json")
    token_file: Path | None = Field(None, description="http: file with that queueguard's status.token_file token")
    interval: Duration = Field(2.0, gt=0, description="how often to read the report")
    stale_after: Duration = 30.0
    on_missing: Literal["keep", "soften", "shed"] = "keep"

    @model_validator(mode="after")
    def _source(self) -> RoutePressure:
        if self.source == "redis" and not self.name:
            raise ValueError("pressure.source redis needs pressure.name (the publisher's name)")
        if self.source == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError("pressure.source http needs pressure.url (http://host:port/status.json)")
        return self


ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # route names are metric labels: no room for an address


class Route(Strict):
    downstreams: list[Downstream] = Field(min_length=1)
    recipients: list[str] = Field(default_factory=list, description="globs, domains or list names")
    max_concurrent: int | None = Field(None, ge=1)
    max_per_minute: int | None = Field(None, ge=1)
    soften_concurrent: int | None = Field(None, ge=1, description="cap under soften; default half max_concurrent")
    pressure: RoutePressure | None = None

    @model_validator(mode="after")
    def _caps(self) -> Route:
        if self.soften_concurrent and self.max_concurrent and self.soften_concurrent > self.max_concurrent:
            raise ValueError("soften_concurrent must not exceed max_concurrent")
        return self


class PublishPressure(Strict):
    """This host's pressure report for the queueguards that route mail here (docs/routes.md)."""

    name: str = Field("", description="key other hosts read; default: node, else the hostname")
    interval: Duration = Field(5.0, gt=0)
    ttl: Duration | None = Field(None, gt=0, description="report lifetime in Redis; default 3 x interval")
    level_file: Path | None = Field(None, description="file holding normal|soften|shed: publish at least that")


class SmtpSettings(Strict):
    listen: str = "127.0.0.1:2525"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return listen_address(v, 25)


    hostname: str = ""
    max_message_size: Size = 26_214_400
    max_recipients: int = Field(1000, ge=1)
    proxy_protocol_from: list[str] = Field(
        default_factory=list,
        description="networks of the load balancers that send a PROXY v1/v2 header; they must send one, "
                    "nobody else may")

    @field_validator("proxy_protocol_from")
    @classmethod
    def _proxy_from(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP network (e.g. 192.0.2.10/32 or 2001:db8::/64)") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_proxy_inbound(cls, data: object) -> object:
        if isinstance(data, dict) and "proxy_protocol_inbound" in data:
            raise ValueError("proxy_protocol_inbound was replaced by proxy_protocol_from: list the load "
                             "balancers' networks (a PROXY header from anyone else is refused)")
        return data

    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False

    @model_validator(mode="after")
    def _tls_to_require(self) -> SmtpSettings:
        if self.require_tls and not self.tls_cert:
            raise ValueError("require_tls needs tls_cert: without a certificate STARTTLS is not offered, "
                             "and every sender would be refused")
        return self

    data_timeout: Duration = 300.0
    shutdown_grace: Duration = 30.0
    add_headers: bool = True
    header_prefix: str = "X-Queueguard"


class ClamdSettings(Strict):
    enabled: bool = False
    address: str = Field("/run/clamav/clamd.ctl", description="unix socket path, or host:port")
    timeout: Duration = 30.0
    connect_timeout: Duration = 2.0
    stream_max_length: Size = 26_214_400
    chunk_size: Size = 65536
    pid_file: Path | None = Path("/run/clamav/clamd.pid")
    database_directory: Path | None = Field(
        Path("/var/lib/clamav"), description="clamd's DatabaseDirectory: a change in its files, like a new "
        "clamd VERSION, empties the cache of scan answers (scan.cache in the policy)")
    reload_grace: Duration = Field(
        900.0, description="how long clamd may take to load signature files that changed (its SelfCheck, "
        "600 s by default, and the load itself): no scan answer is cached meanwhile, unless clamd's VERSION "
        "shows it reloaded")
    max_scan_time: Duration = Field(
        120.0, description="clamd's MaxScanTime: it answers OK for a scan that ran this long (unless "
        "AlertExceedsMax), so a clean answer that took this long is not reused")
    ping_interval: Duration = 10.0
    breaker_failures: int = Field(3, ge=1)
    breaker_reset: Duration = 5.0
    memory_cgroup: Path | None = Field(
        None, description="cgroup directory whose memory use and PSI feed the governor "
        "(e.g. the slice clamd and the ticket workers share); default: queueguard's own")


class QuarantineSettings(Strict):
    directory: Path = Path("/var/lib/queueguard/quarantine")
    min_free_bytes: Size = 512 * 1024 * 1024
    min_free_inodes: int = 10_000
    retention: Duration = 30 * 86400.0


def milter_listen(spec: str) -> tuple[str, str, int]:
    """A libmilter socket spec -> ("unix", path, 0) or ("inet", host, port): `unix:/path` (or
    `local:`, or a bare path), `inet:PORT@HOST`, `inet6:PORT@HOST`; no host means every address,
    as in libmilter."""
    kind, sep, rest = spec.strip().partition(":")
    if not sep:
        kind, rest = "unix", spec.strip()
    kind = kind.lower()
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"bad milter socket {spec!r}: unix:/absolute/path")
        return "unix", rest, 0
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"bad milter socket {spec!r}: inet:PORT@HOST with PORT 0-65535")
        host = host.strip("[]") or ("::" if kind == "inet6" else "0.0.0.0")
        return "inet", host, int(port)
    raise ValueError(f"bad milter socket {spec!r}: inet:PORT@HOST, inet6:PORT@HOST or unix:/path")


class MilterSettings(Strict):
    enabled: bool = False
    listen: str = Field("inet:8894@127.0.0.1", description="libmilter socket spec: inet:PORT@HOST or unix:/path")
    quarantine: Literal["store", "hold"] = "store"
    timeout: Duration = 600.0
    socket_owner: str | None = Field(None, description="user owning a unix socket (default: queueguard's own)")
    socket_group: str | None = Field(
        None, description="group owning a unix socket (default: `postfix` where that group exists)")
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$", description="permissions of a unix socket, octal")
    max_connections: int = Field(
        512, ge=1, description="MTA connections open at once, in each worker (Postfix opens one per smtpd "
        "process; its default_process_limit is 100): more are closed at once, and the MTA applies its "
        "milter_default_action to them")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        milter_listen(v)
        return v

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _mode(cls, v: object) -> object:
        if isinstance(v, int):  # YAML reads 0660 as the number 432: only a quoted mode is unambiguous
            raise ValueError("write the mode quoted, e.g. socket_mode: \"0660\"")
        return v


class PolicySocketSettings(Strict):
    enabled: bool = False
    listen: str = Field("127.0.0.1:10031", description="host:port or a unix socket path")


class QueueWatchSettings(Strict):
    interval: Duration = 30.0
    exim_spool: Path | None = None
    postfix_queue: Path | None = None
    mailman_queue: Path | None = None
    mailman_runners: list[str] = Field(default_factory=list)
    filesystems: list[Path] = Field(default_factory=list)
    processes: list[str] = Field(default_factory=list, description="process names expected to run")


class StatusSettings(Strict):
    """Who may read the status page and /status.json, which show recipient addresses (docs/settings.md#status)."""

    password_hash: str = Field("", description="scrypt hash from `queueguard passwd`")
    token_file: Path | None = Field(None, description="file holding a bearer token for scripts")
    session_lifetime: Duration = Field(8 * 3600.0, gt=0, description="a browser login lasts this long")

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if v:
            parse_password_hash(v)
        return v

    @property
    def protected(self) -> bool:
        return bool(self.password_hash) or self.token_file is not None


class Settings(Strict):
    smtp: SmtpSettings = SmtpSettings()
    downstreams: list[Downstream] = Field(default_factory=lambda: [Downstream(address="127.0.0.1:2526")],
                                          min_length=1)
    routes: dict[str, Route] = Field(default_factory=dict)
    metrics: str = "127.0.0.1:9925"
    status: StatusSettings = StatusSettings()
    policies: Path = Path("policies")
    state: str = Field("memory", description="'memory', a redis:// URL, or redis+sentinel://host:port,…/service")
    state_max_keys: int = Field(1_000_000, ge=1000)
    quarantine: QuarantineSettings = QuarantineSettings()
    clamd: ClamdSettings = ClamdSettings()
    milter: MilterSettings = MilterSettings()
    policy_socket: PolicySocketSettings = PolicySocketSettings()
    queuewatch: QueueWatchSettings = QueueWatchSettings()
    log_format: Literal["logfmt", "json"] = "logfmt"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    node: str = Field("", description="this host's name in shared state; default: hostname")
    publish_pressure: PublishPressure | None = None
    workers: int | Literal["auto"] = Field(
        1, description="processes sharing the SMTP and metrics ports (auto: one per core); more than one needs "
                        "state: redis://")

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("workers must be 1 to 256, or auto")
        return v

    def worker_count(self) -> int:
        """How many worker processes `serve` runs."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.workers

    @model_validator(mode="after")
    def _workers_need_shared_state(self) -> Settings:
        n = self.worker_count()
        if n > 1 and self.state == "memory":
            raise ValueError(f"workers: {self.workers} ({n} processes) with state: memory would give every worker "
                             f"its own limits and burst counts ({n} times each limit); set state to a redis:// URL, "
                             "or workers: 1")
        return self

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: str) -> str:
        return listen_address(v, 9925)

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: dict[str, Route]) -> dict[str, Route]:
        if "default" in v:
            raise ValueError("'default' is the route of the top-level downstreams; name this route otherwise")
        for name in v:
            if not ROUTE_NAME.fullmatch(name):
                raise ValueError(f"route name {name!r}: only letters, digits, '_', '.' and '-' (it is a metric label)")
        return v

    @model_validator(mode="after")
    def _pressure_state(self) -> Settings:
        redis_routes = [n for n, r in self.routes.items() if r.pressure and r.pressure.source == "redis"]
        if redis_routes and self.state == "memory":
            raise ValueError(f"routes {', '.join(redis_routes)} read pressure from Redis: set state to a redis:// URL")
        return self

    @field_validator("state")
    @classmethod
    def _state(cls, v: str) -> str:
        """A Sentinel URL is taken apart now, so a typo fails at start-up, not at the first RCPT."""
        if v != "memory":
            parse_redis_url(v)
        return v


def host_problems(settings: Settings) -> list[str]:
    """What valid settings still cannot run with on this host (files that are not there);
    `queueguard check` prints these, `serve` refuses to start on them."""
    problems = []
    for key, path in (("smtp.tls_cert", settings.smtp.tls_cert), ("smtp.tls_key", settings.smtp.tls_key)):
        if path is not None and not path.is_file():
            problems.append(f"{key}: {path}: no such file")
    tokens = [("status.token_file", settings.status.token_file)]
    tokens += [(f"routes.{name}.pressure.token_file", r.pressure.token_file)
               for name, r in settings.routes.items() if r.pressure is not None]
    for key, path in tokens:
        if path is not None:
            try:
                read_token(path)
            except OSError as e:
                problems.append(f"{key}: {path}: {e.strerror or e}")
            except ValueError as e:
                problems.append(f"{key}: {path}: {e}")
    host, _ = split_hostport(settings.metrics, 9925)
    if not is_loopback(host) and not settings.status.protected:
        problems.append(f"metrics: {settings.metrics} is not a loopback address and the status page shows "
                        "recipients: set status.password_hash (queueguard passwd) or status.token_file")
    return problems


class SettingsError(Exception):
    """Settings that cannot run; the message lists every problem."""


def load_settings(path: Path | None, overrides: dict[str, object] | None = None) -> Settings:
    """Read settings from `path` (if given), apply flag overrides, validate."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise SettingsError(f"{path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise SettingsError(f"{where}: {getattr(e, 'problem', None) or e}") from e
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: top level must be a mapping")
        data = loaded
    for key, value in (overrides or {}).items():
        section, _, sub = key.partition(".")
        if sub:
            current = data.get(section)
            data[section] = {**(current if isinstance(current, dict) else {}), sub: value}
        else:
            data[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        where = str(path) if path else "settings"
        lines = [f"{where}: {'.'.join(str(p) for p in err['loc']) + ': ' if err['loc'] else ''}{err['msg']}"
                 for err in e.errors()]
        raise SettingsError("\n".join(lines)) from e
