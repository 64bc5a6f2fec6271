"""LAN discovery over mDNS: browse common service types, keep a table, advertise ourselves.

Every service found gets a readable listenId derived from its type and instance name
(``living-room-nas-smb``), unique on this node and kept in the state directory, so the
same service has the same id across restarts of the node and of the service.

mDNS input is hostile by default: names, TXT records and addresses are bounded and cleaned
before they enter the table; whether an advertised address may be dialed is the target
policy's decision, at dial time, like any other target.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # zeroconf is imported only when mDNS is on (it costs memory)
    from zeroconf import IPVersion, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from homenet import __version__
from homenet.node.address import Endpoint
from homenet.node.dialer import Dialed, Dialer, DialError
from homenet.node.log import fields
from homenet.node.policy import IPNetwork, TargetPolicy, host_subnets, interface_addresses

log = logging.getLogger("homenet.discovery")

HOMENET_TYPE = "_homenet._tcp.local."
#: What a home node browses by default: HomeNet itself and the services homes run.
DEFAULT_TYPES = (
    HOMENET_TYPE,
    "_http._tcp.local.",
    "_https._tcp.local.",
    "_ssh._tcp.local.",
    "_sftp-ssh._tcp.local.",
    "_smb._tcp.local.",
    "_afpovertcp._tcp.local.",
    "_nfs._tcp.local.",
    "_webdav._tcp.local.",
    "_ipp._tcp.local.",
    "_ipps._tcp.local.",
    "_printer._tcp.local.",
    "_pdl-datastream._tcp.local.",
    "_raop._tcp.local.",
    "_airplay._tcp.local.",
    "_googlecast._tcp.local.",
    "_hap._tcp.local.",
    "_mqtt._tcp.local.",
    "_plexmediasvr._tcp.local.",
    "_daap._tcp.local.",
    "_rfb._tcp.local.",
    "_home-assistant._tcp.local.",
)

MAX_SERVICES = 1024
MAX_TXT_KEYS = 32
MAX_TXT_VALUE = 255
MAX_NAME = 63
RESOLVE_TIMEOUT_MS = 3000
_TYPE = re.compile(r"_[a-z0-9-]{1,15}\._(tcp|udp)\.local\.")


@dataclass(slots=True)
class Service:
    """One service instance seen on the LAN."""

    listen_id: str
    name: str
    type: str
    host: str
    addresses: list[str]
    port: int
    txt: dict[str, str]
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PublicServices:
    """The discovered services the node's operator lets clients reach without a connect key
    (under ``connect_auth=direct``), named by listenId, instance name or type. Never what a
    record says of itself: any device on the LAN can publish any record."""

    specs: tuple[str, ...] = ()

    def __contains__(self, svc: object) -> bool:
        if not isinstance(svc, Service):
            return False
        for spec in self.specs:
            if spec in (svc.listen_id, svc.name):
                return True
            if spec.startswith("_") and _same_type(spec, svc.type):
                return True
        return False


def _same_type(spec: str, type_: str) -> bool:
    try:
        return normalise_type(spec) == type_
    except ValueError:  # not a service type: it names nothing
        return False


def normalise_type(text: str) -> str:
    """``ssh`` / ``_ssh._tcp`` / ``_ssh._tcp.local.`` -> ``_ssh._tcp.local.``."""
    t = text.strip().lower()
    if not t.startswith("_"):
        t = f"_{t}._tcp"
    if not t.endswith(".local."):
        t = t.rstrip(".") + ".local."
    return t


def clean_text(raw: str, limit: int = MAX_NAME) -> str:
    """Printable, bounded text for names coming off the network."""
    return "".join(ch for ch in raw if ch.isprintable())[:limit]


def clean_txt(props: dict[bytes, bytes | None]) -> dict[str, str]:
    """Bounded TXT: at most MAX_TXT_KEYS keys, values cut to MAX_TXT_VALUE, printable only."""
    out: dict[str, str] = {}
    for key, value in list(props.items())[:MAX_TXT_KEYS]:
        k = clean_text(key.decode("utf-8", "replace"), 64)
        if not k:
            continue
        out[k] = clean_text((value or b"").decode("utf-8", "replace"), MAX_TXT_VALUE)
    return out


def instance_of(full_name: str, type_: str) -> str:
    """``My NAS._smb._tcp.local.`` -> ``My NAS``."""
    return full_name[: -len(type_) - 1] if full_name.endswith("." + type_) else full_name


def _slug(text: str, limit: int) -> str:
    """``Ünïcødé NAS`` -> ``unicode-nas``: accents dropped, anything else becomes a dash."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:limit].strip("-")


class ListenIdBook:
    """Stable listenIds for services, persisted as JSON in the state directory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._ids: dict[str, str] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    self._ids = {str(k): str(v) for k, v in data.items()}

    def id_for(self, type_: str, name: str) -> str:
        """The listenId of (type, instance name): the remembered one, else a new unique one."""
        key = f"{type_}|{name}"
        if key in self._ids:
            return self._ids[key]
        base = _slug(name, 40) or "svc-" + hashlib.sha256(name.encode()).hexdigest()[:6]
        kind = _slug(type_.split(".", 1)[0], 16) or "svc"
        candidate = f"{base}-{kind}"
        taken = set(self._ids.values())
        n = 2
        while candidate in taken:
            candidate = f"{base}-{kind}-{n}"
            n += 1
        self._ids[key] = candidate
        self._save()
        return candidate

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._ids, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("discovery.ids_not_saved", extra=fields(path=str(self.path), error=str(exc)))


def _interfaces(spec: Sequence[str]) -> tuple[list[str] | None, IPVersion]:
    """zeroconf interface choice from ``--mdns-interface`` values (IP addresses; empty = all)."""
    from zeroconf import IPVersion

    if not spec or any(s == "all" for s in spec):
        return None, IPVersion.V4Only
    addrs = [str(ipaddress.ip_address(s)) for s in spec]
    v6 = any(":" in a for a in addrs)
    v4 = any(":" not in a for a in addrs)
    return addrs, IPVersion.All if v4 and v6 else (IPVersion.V6Only if v6 else IPVersion.V4Only)


def advertised_addresses(interfaces: list[str] | None) -> list[bytes]:
    """Packed addresses to put in our own A records."""
    if interfaces:
        return [ipaddress.ip_address(a).packed for a in interfaces if ":" not in a]
    return [
        i.ip.packed for i in interface_addresses() if i.version == 4 and not (i.ip.is_loopback or i.ip.is_link_local)
    ]


class Discovery:
    """Browses mDNS and keeps the service table; owns its zeroconf instance and tasks."""

    def __init__(
        self,
        interfaces: Sequence[str] = (),
        types: Iterable[str] = DEFAULT_TYPES,
        state_dir: str | None = None,
        own_name: str = "",
    ) -> None:
        self.types = [normalise_type(t) for t in types]
        self.ifaces, self.ip_version = _interfaces(interfaces)
        self.ids = ListenIdBook(Path(state_dir) / "services.json" if state_dir else None)
        self.own_name = own_name
        self.services: dict[tuple[str, str], Service] = {}
        self.azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resolving = asyncio.Semaphore(8)

    async def start(self) -> None:
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self.azc = AsyncZeroconf(interfaces=self.ifaces or _all(), ip_version=self.ip_version)
        self._browser = AsyncServiceBrowser(self.azc.zeroconf, self.types, handlers=[self._on_change])
        log.info("discovery.started", extra=fields(types=len(self.types), interfaces=self.ifaces or "all"))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self.azc is not None:
            await self.azc.async_close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        from zeroconf import ServiceStateChange

        key = (service_type, name)
        if state_change is ServiceStateChange.Removed:
            gone = self.services.pop(key, None)
            if gone is not None:
                log.info("discovery.removed", extra=fields(name=gone.name, type=service_type, listen_id=gone.listen_id))
            return
        if len(self.services) >= MAX_SERVICES and key not in self.services:
            log.warning("discovery.table_full", extra=fields(limit=MAX_SERVICES))
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._resolved)

    def _resolved(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("discovery.resolve_crashed", exc_info=task.exception())

    async def _resolve(self, type_: str, name: str) -> None:
        assert self.azc is not None
        if not _TYPE.fullmatch(type_) or len(name) > 255:
            return
        instance = clean_text(instance_of(name, type_))
        if not instance or (type_ == HOMENET_TYPE and instance == self.own_name):
            return
        from zeroconf.asyncio import AsyncServiceInfo

        async with self._resolving:
            try:  # zeroconf refuses some names legal on the wire (control chars, > 63 bytes)
                info = AsyncServiceInfo(type_, name)
                ok = await info.async_request(self.azc.zeroconf, RESOLVE_TIMEOUT_MS)
            except Exception as exc:  # malformed records must not hurt the node
                log.debug("discovery.resolve_failed", extra=fields(name=name[:80], error=str(exc)))
                return
        if not ok or not info.port:
            return
        addresses = [a for a in info.parsed_scoped_addresses() if _is_ip(a)][:16]
        now = time.time()
        key = (type_, name)
        old = self.services.get(key)
        svc = Service(
            listen_id=self.ids.id_for(type_, instance),
            name=instance,
            type=type_,
            host=clean_text((info.server or "").rstrip("."), 253),
            addresses=addresses,
            port=int(info.port),
            txt=clean_txt(info.properties),
            first_seen=old.first_seen if old else now,
            last_seen=now,
        )
        self.services[key] = svc
        if old is None or (old.addresses, old.port, old.txt) != (svc.addresses, svc.port, svc.txt):
            log.info(
                "discovery.found",
                extra=fields(name=svc.name, type=type_, listen_id=svc.listen_id, port=svc.port, addresses=addresses),
            )

    def by_listen_id(self, listen_id: str) -> Service | None:
        for svc in self.services.values():
            if svc.listen_id == listen_id:
                return svc
        return None

    def query(self, name: str = "", type_: str = "") -> list[Service]:
        """Services whose name or listenId contains ``name`` and whose type is ``type_``."""
        needle = name.lower()
        want = normalise_type(type_) if type_ else ""
        out = [
            s
            for s in self.services.values()
            if (not needle or needle in s.name.lower() or needle in s.listen_id) and (not want or s.type == want)
        ]
        return sorted(out, key=lambda s: (s.type, s.name))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _all() -> list[str]:
    from zeroconf import InterfaceChoice

    return InterfaceChoice.All  # type: ignore[return-value]


class Advertiser:
    """Announces services on the LAN until closed (the node itself, or ``homenet publish``)."""

    def __init__(self, interfaces: Sequence[str] = ()) -> None:
        self.ifaces, self.ip_version = _interfaces(interfaces)
        self.azc: AsyncZeroconf | None = None
        self.infos: list[AsyncServiceInfo] = []

    async def start(self, azc: AsyncZeroconf | None = None) -> None:
        from zeroconf.asyncio import AsyncZeroconf

        self._own = azc is None
        self.azc = azc or AsyncZeroconf(interfaces=self.ifaces or _all(), ip_version=self.ip_version)

    async def publish(self, name: str, type_: str, port: int, txt: dict[str, str]) -> AsyncServiceInfo:
        """Register one service; returns its info (the name may get a suffix on conflict)."""
        from zeroconf.asyncio import AsyncServiceInfo

        assert self.azc is not None
        type_ = normalise_type(type_)
        host = clean_text(socket.gethostname().split(".")[0], 63) or "homenet"
        info = AsyncServiceInfo(
            type_,
            f"{clean_text(name)}.{type_}",
            port=port,
            properties=dict(txt),
            server=f"{host}.local.",
            addresses=advertised_addresses(self.ifaces),
        )
        await self.azc.async_register_service(info, allow_name_change=True)
        self.infos.append(info)
        log.info("discovery.published", extra=fields(name=info.name, port=port))
        return info

    async def update_txt(self, info: AsyncServiceInfo, txt: dict[str, str]) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        assert self.azc is not None
        new = AsyncServiceInfo(
            info.type, info.name, port=info.port, properties=dict(txt), server=info.server,
            addresses=info.addresses,
        )  # fmt: skip
        await self.azc.async_update_service(new)
        self.infos[self.infos.index(info)] = new

    async def close(self) -> None:
        if self.azc is None:
            return
        with contextlib.suppress(Exception):
            await self.azc.async_unregister_all_services()
        if self._own:
            await self.azc.async_close()


def node_txt(rl_urls: Iterable[str]) -> dict[str, str]:
    """TXT of a node's own ``_homenet._tcp`` record."""
    urls = " ".join(rl_urls)
    return {"version": __version__, "rl": urls[:MAX_TXT_VALUE]}


def service_policy(policy: TargetPolicy, lan: Callable[[], Iterable[IPNetwork]] = host_subnets) -> TargetPolicy:
    """Where a discovered service may be dialed: the node's ``--allow`` rules, and the private
    subnets the host is on (a LAN record names a LAN host). A record naming any other address
    gets what a direct hop to it would get (403); guarded ranges (loopback, link-local,
    metadata) still need the node's explicit ``--allow``."""
    return TargetPolicy((*policy.allow, *lan()), policy.own, policy.local)


async def dial_service(
    svc: Service, policy: TargetPolicy, timeout: float, lan: Callable[[], Iterable[IPNetwork]] = host_subnets
) -> Dialed:
    """Dial a discovered service at the first of its addresses that the policy allows."""
    dialer = Dialer(service_policy(policy, lan), timeout)
    last: DialError | None = None
    for addr in svc.addresses or [svc.host]:
        try:
            return await dialer.dial(Endpoint(addr.split("%", 1)[0], svc.port))
        except DialError as exc:
            last = exc
    assert last is not None
    raise last
