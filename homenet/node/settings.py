"""One typed settings object for a node, built once from file, environment and flags.

Precedence: command-line flags > ``HOMENET_*`` environment variables > TOML config file >
defaults. Every value is validated on construction; a bad one raises :class:`SettingsError`
with a one-line message naming where it came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from homenet.node.address import DEFAULT_PORT, AddressError, parse_endpoint, parse_url
from homenet.node.errors import UsageError
from homenet.node.policy import parse_rule

#: At most this many worker processes.
MAX_WORKERS = 64


class SettingsError(UsageError, ValueError):
    """A setting with a bad value; the message names the setting and its source."""


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "homenet")


def _opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    repr: bool = True,
    **cli: Any,
) -> Any:
    """A settings field with what the command line needs to offer it (see :func:`cli_options`)."""
    meta = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, repr=repr, metadata=meta)
    return field(default=default, repr=repr, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to run; immutable once built."""

    bind: str = _opt("0.0.0.0", "address to listen on (default 0.0.0.0)", metavar="ADDR")
    port: int = _opt(DEFAULT_PORT, "TCP port for both planes (default 6969; 0 picks a free one)")
    name: str = _opt(
        factory=lambda: socket.gethostname().split(".")[0] or "homenet",
        help="node name shown to operators (default: the host name)",
    )
    rl: tuple[str, ...] = _opt(
        (), "remote-listen on hn://RELAY[:PORT][/HOP...] (or hns://, ws://, wss://; repeatable)", metavar="URL"
    )
    listen_id: str | None = _opt(
        None, "listenId to claim on the relay (default: the one kept from last time)", metavar="ID", rl=True
    )
    allow: tuple[str, ...] = _opt(
        (), "direct targets this node may dial (repeatable; 'lan' = this host's private subnets)", metavar="CIDR"
    )
    mdns: bool = _opt(True, "turn LAN discovery off", flag="--no-mdns")
    #: Addresses of the interfaces to run mDNS on (empty: all).
    mdns_interface: tuple[str, ...] = _opt(
        (), "run mDNS only on the interface with this address (repeatable; default: all)", metavar="ADDR"
    )
    #: Service types to browse (empty: HomeNet's default list).
    mdns_types: tuple[str, ...] = _opt((), "service type to browse (repeatable)", flag="--mdns-type", metavar="TYPE")
    state_dir: str = _opt(
        factory=_default_state_dir, help="where listenIds, keys and secrets are kept", metavar="DIR", rl=True
    )
    log_level: str = _opt("info", "", choices=("debug", "info", "warning", "error"), rl=True)
    log_format: str = _opt("text", "", choices=("text", "json"), rl=True)
    #: Seconds a client has to send its preamble (and a gRPC client its preface).
    handshake_timeout: float = _opt(5.0, "seconds to send a complete preamble (default 5)")
    #: Seconds to resolve and connect to a target.
    dial_timeout: float = _opt(10.0, "seconds to resolve and connect a target (default 10)")
    #: Seconds without a byte either way before a session is closed (0: never).
    idle_timeout: float = _opt(3600.0, "seconds without a byte before a session is closed; 0 disables")
    #: Seconds SIGTERM waits for sessions to finish before closing them.
    drain_grace: float = _opt(10.0, "seconds SIGTERM waits for sessions to finish (default 10)")
    #: Spliced sessions at once; more get ``429 too-many``.
    max_sessions: int = _opt(20000, "sessions at once; more get 429 (default 20000)")
    #: Connections still in their handshake at once (past that, early drop: see the README).
    max_handshakes: int = _opt(256, "connections in handshake at once (default 256)")
    #: Warm connections to keep parked at each relay we remote-listen on (0: dial back only).
    pool_size: int = _opt(4, "warm connections parked at each relay (default 4)", metavar="N", rl=True)
    #: Cap in seconds of the reconnect backoff to a relay (exponential with jitter below it).
    rl_backoff_max: float = _opt(1.5, "cap of the reconnect backoff to a relay, seconds (default 1.5)")
    #: Relay role: seconds between pings on listener streams (3 missed = dead).
    ping_interval: float = _opt(2.0, "relay role: ping listeners every N s (default 2)")
    #: Relay role: seconds an offline listenId stays reserved for its owner.
    offline_hold: float = _opt(60.0, "relay role: seconds an offline listenId stays its owner's (default 60)")
    #: Keys file (TOML) of the keys this node accepts; default: <state_dir>/keys.toml.
    keys_file: str | None = _opt(None, "keys this node accepts (default STATE_DIR/keys.toml)", metavar="FILE")
    #: This node's own key (``ID:SECRET``) for the relays and nodes it talks to. Never a flag:
    #: a command line is visible to every local user.
    key: str | None = _opt(None, "", cli=False, repr=False)
    #: Remote listen: ``required`` (a listen key claims its own id) or ``open`` (anonymous
    #: nodes get random ids, or claim ids no key reserves).
    rl_auth: str = _opt("required", "remote listen needs a listen key (default)", choices=("required", "open"))
    #: ``none``, ``direct`` (direct targets and non-public services need a connect key) or ``all``.
    connect_auth: str = _opt(
        "direct",
        "which hops need a connect key (default direct: ip:port and non-public services)",
        choices=("none", "direct", "all"),
    )
    #: Discovery queries: ``required`` (a query key) or ``open``.
    query_auth: str = _opt("required", "queries need a query key (default)", choices=("required", "open"))
    #: Connections in handshake from one source (IPv4 address or IPv6 /64) at once.
    max_per_source: int = _opt(64, "connections in handshake from one source at once (default 64)")
    max_sessions_per_source: int = _opt(1000, "sessions one source holds at once; more get 429 (default 1000)")
    max_grpc_per_source: int = _opt(32, "gRPC connections one source holds at once (default 32)")
    max_listeners_per_source: int = _opt(64, "relay: listeners one source registers anonymously (default 64)")
    max_listeners_per_key: int = _opt(64, "relay: listeners one key registers, admin keys aside (default 64)")
    #: Sessions one listener may have at once.
    max_listener_sessions: int = _opt(1000, "relay role: sessions one listener may have at once (default 1000)")
    #: Failed authentications from one source (within a minute) before it is blocked.
    penalty_threshold: int = _opt(5, "failed logins from one source within a minute before it is blocked")
    #: Seconds a source is first blocked for (doubles on repeat, up to 10 minutes).
    penalty_seconds: float = _opt(30.0, "seconds a source is first blocked for (doubles on repeat)")
    #: TLS on the one port (both planes): certificate chain and key files (PEM).
    tls_cert: str | None = _opt(None, "serve both planes over TLS with this certificate chain", metavar="PEM")
    tls_key: str | None = _opt(None, "private key of --tls-cert", metavar="PEM")
    #: Require client certificates signed by this CA (mTLS for relay peers and operators).
    tls_client_ca: str | None = _opt(None, "require client certificates from this CA (mTLS)", metavar="PEM")
    #: CA bundle to verify hns:// relays with (default: the system store).
    tls_ca: str | None = _opt(None, "CA to verify hns:// and wss:// relays (default: system store)", metavar="PEM")
    #: Relay role: ``host:port`` listeners dial back to (this process's own address when a
    #: load balancer spreads the public one over many relays); empty: the public address.
    advertise: str = _opt("", "relay role: this relay's own public HOST:PORT for dial-backs", metavar="HOST:PORT")
    #: A plaintext gRPC health port (``grpc.health.v1`` only) for probes when the port speaks
    #: TLS; bound to ``health_bind`` (in Kubernetes: the pod IP). 0: none.
    health_port: int = _opt(0, "a plaintext gRPC health-only port for probes (0: none)")
    health_bind: str = _opt("127.0.0.1", "address of --health-port (default 127.0.0.1)", metavar="ADDR")
    #: Fleet: the relays this one peers with (``host:port``; the data port of each).
    peers: tuple[str, ...] = _opt(
        (), "fleet: a peer relay HOST:PORT (repeatable, or comma-separated)", metavar="HOST:PORT"
    )
    #: Fleet: a DNS name whose addresses are the peers (a Kubernetes headless Service),
    #: re-resolved every few seconds; ``NAME`` or ``NAME:PORT`` (default: this node's port).
    peers_dns: str | None = _opt(None, "fleet: peers are the addresses of this DNS name (re-resolved)", metavar="NAME")
    #: Fleet: the fleet key file (``ID:SECRET``, the same on every relay); no key, no peering.
    fleet_key_file: str | None = _opt(None, "fleet: the fleet key (ID:SECRET) every relay shares", metavar="FILE")
    #: Fleet over TLS: the name peers' certificates carry (pods' addresses change; one
    #: certificate, e.g. for the public name, serves every relay). Default: the peer's address.
    peer_tls_name: str | None = _opt(None, "fleet over TLS: the name to verify peers' certificates as", metavar="NAME")
    #: Fleet: seconds the listeners of a peer that went away answer 432 moving (then 404).
    moving_hold: float = _opt(10.0, "fleet: seconds a vanished peer's listeners answer 432 moving (default 10)")
    #: Worker processes accepting on the one port; 0: one per core, except 1 with --rl,
    #: --peers or --peers-dns. The default is 1: measured on 2 cores, more workers cut the
    #: connection rate (bench/README.md, "Worker processes").
    workers: int = _opt(
        1, "worker processes on the one port (default 1; 0: one per core, but 1 with --rl, --peers or --peers-dns)"
    )
    #: How workers share the port: ``reuseport`` (SO_REUSEPORT, the kernel spreads
    #: connections over one accept queue per worker) or ``shared`` (one queue, one socket).
    worker_accept: str = _opt(
        "reuseport", "how workers share the port (default reuseport)", choices=("reuseport", "shared")
    )
    #: Discovered services clients reach without a connect key (connect_auth direct): by
    #: listenId, instance name or type (``_homenet._tcp``). Never what a record says of itself.
    public_services: tuple[str, ...] = _opt(
        (), "a discovered service reachable without a connect key: listenId, name or _type (repeatable)",
        metavar="SERVICE", flag="--public-service",
    )  # fmt: skip
    #: The HTTP gateway on the one port (HTTP/1.x requests routed to a home's web servers).
    http_gateway: bool = _opt(True, "turn the HTTP gateway on the one port off", flag="--no-http-gateway")
    #: HTTP gateway: requests for ``<listenId>.DOMAIN`` go to that listener (wildcard DNS).
    http_domain: str | None = _opt(
        None, "HTTP gateway: route <listenId>.DOMAIN by host name (wildcard DNS to this relay)", metavar="DOMAIN"
    )
    #: Operators: ``ADDR:PORT`` of the admin HTTP server (``/metrics`` for Prometheus, the
    #: dashboard); never the public port. Empty: off.
    metrics_bind: str = _opt("", "ADDR:PORT for /metrics and the dashboard (default: off)", metavar="ADDR:PORT")
    #: Who may read it off loopback: ``admin`` (an admin key, so the address must speak TLS:
    #: a key never crosses the network in clear) or ``none`` (behind a network policy).
    metrics_auth: str = _opt(
        "admin", "off loopback, the metrics address needs an admin key over TLS (default) or none",
        choices=("admin", "none"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("port", "health_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"{name} {getattr(self, name)} out of range 0-65535")
        try:
            parse_endpoint(f"[{self.bind}]:1" if ":" in self.bind else f"{self.bind}:1")
        except AddressError:
            raise SettingsError(f"bind {self.bind!r} is not an IP address or hostname") from None
        try:
            parse_endpoint(f"[{self.health_bind}]:1" if ":" in self.health_bind else f"{self.health_bind}:1")
        except AddressError:
            raise SettingsError(f"health_bind {self.health_bind!r} is not an IP address or hostname") from None
        for url in self.rl:
            try:
                parse_url(url)
            except AddressError as exc:
                raise SettingsError(f"rl: {exc}") from None
        for spec in self.allow:
            try:
                parse_rule(spec, lambda: ())  # the syntax now; 'lan' is expanded when the node starts
            except ValueError:
                raise SettingsError(f"allow {spec!r}: expected a CIDR like 192.168.1.0/24, or 'lan'") from None
        for iface in self.mdns_interface:
            if iface != "all":
                try:
                    ipaddress.ip_address(iface)
                except ValueError:
                    raise SettingsError(f"mdns_interface {iface!r}: expected an IP address of this host") from None
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level {self.log_level!r}: expected debug, info, warning or error")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"log_format {self.log_format!r}: expected text or json")
        if self.listen_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.listen_id):
            raise SettingsError(f"listen_id {self.listen_id!r}: expected 1-64 of A-Z a-z 0-9 _ -")
        for name, allowed in (
            ("rl_auth", ("required", "open")),
            ("connect_auth", ("none", "direct", "all")),
            ("query_auth", ("required", "open")),
            ("worker_accept", ("reuseport", "shared")),
            ("metrics_auth", ("admin", "none")),
        ):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} {getattr(self, name)!r}: expected {' or '.join(allowed)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert and tls_key go together: give both or neither")
        if self.key is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}:[A-Za-z0-9_-]{22,128}", self.key):
            raise SettingsError("key must be ID:SECRET (the line `homenet key new` printed)")
        for name in (
            "max_sessions", "max_handshakes", "max_per_source", "max_listener_sessions", "penalty_threshold",
            "max_sessions_per_source", "max_grpc_per_source", "max_listeners_per_source", "max_listeners_per_key",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1")
        if not 0 <= self.pool_size <= 64:
            raise SettingsError("pool_size must be 0-64")
        for name in (
            "handshake_timeout", "dial_timeout", "drain_grace", "rl_backoff_max", "ping_interval", "offline_hold",
            "penalty_seconds", "moving_hold",
        ):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingsError(f"{name} must be > 0, got {value}")
        for peer in self.peers:
            try:
                parse_endpoint(peer, self.port or DEFAULT_PORT)
            except AddressError as exc:
                raise SettingsError(f"peers {peer!r}: {exc}") from None
        if (self.peers or self.peers_dns) and not self.fleet_key_file:
            raise SettingsError("peers need a fleet key: give fleet_key_file (--fleet-key-file) on every relay")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise SettingsError(f"workers must be 0-{MAX_WORKERS} (0: one per core), got {self.workers}")
        self._check_metrics()
        if self.http_domain is not None and not re.fullmatch(
            r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", self.http_domain
        ):
            raise SettingsError(
                f"http_domain {self.http_domain!r}: expected a lower-case DNS name like relay.example.net"
            )
        if self.workers > 1 and (self.peers or self.peers_dns):
            raise SettingsError(
                "workers > 1 cannot join a fleet (--peers/--peers-dns): run one relay process per pod or host"
            )
        if self.advertise:
            try:
                parse_endpoint(self.advertise)
            except AddressError as exc:
                raise SettingsError(f"advertise {self.advertise!r}: {exc}") from None
        if not (math.isfinite(self.idle_timeout) and self.idle_timeout >= 0):
            raise SettingsError(f"idle_timeout must be >= 0 (0 disables it), got {self.idle_timeout}")

    def metrics_endpoint(self) -> tuple[str, int] | None:
        """``metrics_bind`` as (host, port), or None when it is off."""
        if not self.metrics_bind:
            return None
        host, sep, port = self.metrics_bind.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise AddressError("expected ADDR:PORT with a port 0-65535")
        return parse_endpoint(f"{host}:1").host, int(port)  # the host's syntax, [IPv6] included

    @property
    def metrics_open(self) -> bool:
        """``/metrics`` is served without a key (loopback, or metrics_auth none)."""
        return self.metrics_auth == "none" or self.metrics_loopback

    @property
    def metrics_loopback(self) -> bool:
        """The metrics address is on loopback: every page is served without a key."""
        ep = self.metrics_endpoint()
        return ep is not None and _loopback(ep[0])

    def _check_metrics(self) -> None:
        if not self.metrics_bind:
            return
        try:
            host = (self.metrics_endpoint() or ("", 0))[0]
        except AddressError as exc:
            raise SettingsError(f"metrics_bind {self.metrics_bind!r}: {exc}") from None
        if self.metrics_auth == "admin" and not _loopback(host) and not self.tls_cert:
            raise SettingsError(
                f"metrics_bind {self.metrics_bind} is not loopback: its admin key would cross the network in"
                " clear; give tls_cert/tls_key, bind 127.0.0.1, or set metrics_auth none behind a network policy"
            )

    @property
    def worker_count(self) -> int:
        """How many worker processes: ``workers``, or the default it stands for."""
        if self.workers:
            return self.workers
        if self.rl or self.peers or self.peers_dns:
            return 1
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))

    @property
    def keys_path(self) -> Path:
        return Path(self.keys_file) if self.keys_file else Path(self.state_dir) / "keys.toml"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class CliOption:
    """How one setting is offered on the command line."""

    name: str
    flag: str
    kwargs: dict[str, Any]
    #: Offered by ``homenet rl`` too (not only ``homenet node``).
    rl: bool


def cli_options() -> list[CliOption]:
    """Every setting offered as a flag, in declaration order, with its argparse arguments:
    the one source of the CLI's node flags (flags override env, which overrides the file)."""
    out = []
    for f in fields(Settings):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind = str(f.type)
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta.get("help") or None}
        if kind == "bool":  # only switches that turn a default-on feature off
            kwargs.update(action="store_const", const=not f.default)
        elif kind.startswith("tuple"):
            kwargs.update(action="append")
        elif "int" in kind:
            kwargs.update(type=int, metavar="N")
        elif "float" in kind:
            kwargs.update(type=float, metavar="SECONDS")
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        out.append(CliOption(f.name, flag, kwargs, bool(meta.get("rl", False))))
    return out


@dataclass(frozen=True)
class ClientSettings:
    """What the client commands (connect, listen, hnctl) take from their environment."""

    #: ``HOMENET_KEY``: the key to sign with, ``ID:SECRET``.
    key: str | None = field(default=None, repr=False)
    #: ``HOMENET_KEY_FILE``: a file holding it.
    key_file: str | None = None
    #: ``HOMENET_TLS_CA``: the CA to verify hns:// nodes with (default: the system store).
    tls_ca: str | None = None
    #: ``HOMENET_NODE``: the node hnctl talks to.
    node: str = "127.0.0.1:6969"

    @property
    def key_env(self) -> dict[str, str]:
        """The key variables, as :func:`homenet.node.keys.client_key` reads them."""
        return {k: v for k, v in (("HOMENET_KEY", self.key), ("HOMENET_KEY_FILE", self.key_file)) if v}


def client_settings(env: Mapping[str, str] | None = None) -> ClientSettings:
    """The client commands' settings from ``HOMENET_*`` variables (empty means unset)."""
    env = os.environ if env is None else env
    return ClientSettings(
        key=env.get("HOMENET_KEY") or None,
        key_file=env.get("HOMENET_KEY_FILE") or None,
        tls_ca=env.get("HOMENET_TLS_CA") or None,
        node=env.get("HOMENET_NODE") or "127.0.0.1:6969",
    )


def _service_link(name: str, value: str) -> bool:
    """Kubernetes sets ``HOMENET_PORT=tcp://10.0.0.7:6969`` for a Service named ``homenet``:
    a service link, not a setting (``VAR=`` means unset, as in a shell, too)."""
    return name == "port" and value.startswith(("tcp://", "udp://", "sctp://"))


def _to_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _to_list(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.replace(",", " ").split() if p)


def _converter(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    kind = str(f.type)
    if kind == "bool":
        return _to_bool
    if kind == "int":
        return int
    if kind == "float":
        return float
    if kind.startswith("tuple"):
        return _to_list
    return str


def _coerce(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    """Turn a file or env value into the field's type, naming the source on failure."""
    kind = str(f.type)
    try:
        if isinstance(value, str):
            return _converter(f)(value)
        if kind.startswith("tuple") and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    raise SettingsError(f"{source}: wrong type {type(value).__name__} for {f.name}")


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
) -> Settings:
    """Build settings from a TOML file, ``HOMENET_*`` variables and flags (highest wins).

    ``flags`` holds only the options the user gave (``None`` values are ignored).
    The config file is ``config``, else ``HOMENET_CONFIG``, else none.
    """
    env = os.environ if env is None else env
    by_name = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = config or env.get("HOMENET_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except OSError as exc:
            raise SettingsError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config {path} is not valid TOML: {exc}") from None
        if "node" in table:
            if not isinstance(table["node"], dict):
                raise SettingsError(f"config {path}: 'node' must be a table ([node])")
            if len(table) > 1:
                raise SettingsError(f"config {path}: put every setting under [node], or none")
            table = table["node"]
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in by_name:
                raise SettingsError(f"config {path}: unknown setting {key!r}")
            values[name] = _coerce(by_name[name], value, f"config {path}: {key}")
            sources[name] = f"config {path}"
    for name, f in by_name.items():
        var = f"HOMENET_{name.upper()}"
        if var in env and not (env[var] == "" and f.default is None) and not _service_link(name, env[var]):
            values[name] = _coerce(f, env[var], var)
            sources[name] = var
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
            sources[name] = "--" + name.replace("_", "-")
    try:
        return Settings(**values)
    except TypeError as exc:
        raise SettingsError(str(exc)) from None
    except SettingsError as exc:  # name where the bad value came from
        name = str(exc).split(" ", 1)[0].rstrip(":")
        raise SettingsError(f"{sources[name]}: {exc}" if name in sources else str(exc)) from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
