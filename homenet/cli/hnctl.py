"""``hnctl``: look at and control nodes through their gRPC API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from homenet import __version__
from homenet.cli.common import EXIT_OK, EXIT_USAGE, PROG, fail, guarded, run
from homenet.client import Client, ControlError
from homenet.client.control import query_endpoint, query_target
from homenet.control.v1 import discovery_pb2
from homenet.node.address import DEFAULT_PORT, AddressError, parse_endpoint
from homenet.node.auth import Credentials
from homenet.node.errors import HomeNetError
from homenet.node.keys import KeyFileError, client_key
from homenet.node.settings import SettingsError, client_settings, load_settings


def _parser() -> argparse.ArgumentParser:
    env = client_settings()
    p = argparse.ArgumentParser(prog="hnctl", description="Look at and control HomeNet nodes.")
    p.add_argument("--version", action="version", version=f"hnctl {__version__}")
    p.add_argument(
        "--node", default=env.node,
        help="node to talk to, HOST:PORT (default $HOMENET_NODE or 127.0.0.1:6969)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call in seconds (default 5)")
    p.add_argument("--tls", action="store_true", help="talk TLS to --node (hns:// URLs imply it)")
    p.add_argument("--tls-ca", metavar="PEM", default=env.tls_ca, help="CA to verify with")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for nodes that require one (mTLS)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--key-file", metavar="FILE",
        help="key to sign calls with (default: $HOMENET_KEY, else the admin key of a local node's state dir)",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("status", "the node's identity, uptime and counters"),
        ("sessions", "sessions spliced now"),
        ("listeners", "listeners registered on this relay"),
        ("peers", "the relays of this relay's fleet, as it sees them"),
    ):
        c = sub.add_parser(name, help=text, description=text.capitalize() + ".")
        c.add_argument("--json", action="store_true", help="print JSON")
        if name == "listeners":
            c.add_argument("--fleet", action="store_true", help="also the listeners of every peer relay")
    q = sub.add_parser(
        "query", help="list the LAN services of a remote home node",
        description="List the services a node discovered, through any chain: hnctl query hn://relay/home1.",
    )  # fmt: skip
    q.add_argument("url", metavar="URL", help="hn://NODE[:PORT][/LISTENID...]: the node to ask")
    q.add_argument("--name", default="", help="only services whose name or listenId contains this")
    q.add_argument("--type", default="", help="only services of this type (_ssh._tcp, ssh, ...)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--watch", action="store_true", help="keep watching and print changes (Ctrl-C stops)")
    q.add_argument("--interval", type=float, default=2.0, help="seconds between --watch polls (default 2)")
    kick = sub.add_parser("kick", help="end a listener's stream and free its listenId", description="Kick a listener.")
    kick.add_argument("listen_id", metavar="LISTENID")
    return p


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64,
          FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_SINT64}  # fmt: skip


def _to_dict(msg: Message) -> dict[str, Any]:
    """JSON-ready dict; 64-bit counters as numbers (protobuf's JSON mapping makes them strings)."""
    out = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(msg, out)


def _numbers(msg: Message, out: dict[str, Any]) -> dict[str, Any]:
    for f in msg.DESCRIPTOR.fields:
        if f.name not in out:
            continue
        value = getattr(msg, f.name)
        if f.type in _INT64:
            out[f.name] = list(value) if f.is_repeated else int(value)
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            if f.is_repeated:
                out[f.name] = [_numbers(m, d) for m, d in zip(value, out[f.name], strict=True)]
            else:
                out[f.name] = _numbers(value, out[f.name])
    return out


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


async def _status(client: Client, as_json: bool) -> None:
    st = await client.status()
    if as_json:
        print(json.dumps(_to_dict(st), indent=2))
        return
    up = int(st.uptime_seconds)
    print(f"node       {st.name} ({st.address})")
    print(f"version    {st.version}")
    print(f"state      {st.state}")
    print(f"uptime     {up // 86400}d {up % 86400 // 3600:02d}:{up % 3600 // 60:02d}:{up % 60:02d}")
    print(f"sessions   {st.active_sessions} active, {st.total_sessions} total, {st.refused_sessions} refused")
    print(f"listeners  {st.listeners}")
    if st.workers > 1:
        print(f"workers    {st.workers_up}/{st.workers} answered")
    if st.fleet_peers:
        print(f"fleet      {st.fleet_peers_up}/{st.fleet_peers} peers up, {st.fleet_listeners} listeners on peers")
    print(f"relayed    {_bytes(st.bytes_up)} up, {_bytes(st.bytes_down)} down")


async def _sessions(client: Client, as_json: bool) -> None:
    sessions = await client.sessions()
    if as_json:
        print(json.dumps([_to_dict(s) for s in sessions], indent=2))
        return
    now = time.time()
    rows = [
        [str(s.id), s.client, s.target, s.dialed, f"{now - s.since:.0f}s", _bytes(s.bytes_up), _bytes(s.bytes_down)]
        for s in sessions
    ]
    print(_table(rows, ["ID", "CLIENT", "TARGET", "DIALED", "AGE", "UP", "DOWN"]))


async def _peers(client: Client, as_json: bool) -> None:
    resp = await client.peers()
    if as_json:
        print(json.dumps(_to_dict(resp), indent=2))
        return
    me = resp.self
    print(f"relay {me.relay_id[:12]} ({me.name}, {me.address}); {resp.moving} listeners moving")
    rows = [
        [p.target, p.relay_id[:12], p.state, str(p.listeners), f"{p.last_seen_seconds:.1f}s", str(p.forwarded), p.error]
        for p in resp.peers
    ]
    print(_table(rows, ["PEER", "RELAY", "STATE", "LISTENERS", "LAST SEEN", "FORWARDED", "ERROR"]))


async def _fleet_listeners(client: Client, as_json: bool) -> None:
    """``listeners --fleet``: this relay's listeners, then every peer's, as this relay sees them."""
    local, peers = await client.listeners(), await client.peers(with_entries=True)
    here = peers.self.relay_id[:12]
    rows = [[x.listen_id, x.state, here, "local"] for x in local]
    for p in peers.peers:
        rows += [[e.listen_id, "online" if e.online else "offline", p.relay_id[:12], p.target] for e in p.entries]
    rows.sort()
    if as_json:
        print(json.dumps([dict(zip(("listen_id", "state", "relay", "via"), r, strict=True)) for r in rows], indent=2))
        return
    print(_table(rows, ["LISTENID", "STATE", "RELAY", "VIA"]))


async def _listeners(client: Client, as_json: bool) -> None:
    listeners = await client.listeners()
    if as_json:
        print(json.dumps([_to_dict(x) for x in listeners], indent=2))
        return
    now = time.time()
    rows = [
        [
            x.listen_id,
            x.state,
            x.peer,
            x.name,
            f"{now - x.since:.0f}s",
            str(x.active_sessions),
            _bytes(x.bytes_up),
            _bytes(x.bytes_down),
            f"{x.pool_parked}/{x.pool_size}",
        ]
        for x in listeners
    ]
    print(_table(rows, ["LISTENID", "STATE", "PEER", "NAME", "SINCE", "SESSIONS", "UP", "DOWN", "POOL"]))


def _service_row(s: discovery_pb2.Service) -> list[str]:
    txt = " ".join(f"{k}={v}" for k, v in sorted(s.txt.items()))
    return [s.name, s.type.removesuffix(".local."), s.listen_id, ",".join(s.addresses) or s.host, str(s.port), txt]


_SERVICE_HEADER = ["NAME", "TYPE", "LISTENID", "ADDRESS", "PORT", "TXT"]


async def _query(client: Client, path: list[str], args: argparse.Namespace) -> None:
    resp = await client.query(path, name=args.name, type_=args.type)
    if not args.watch:
        if args.json:
            print(json.dumps(_to_dict(resp)["services"], indent=2))
        elif not resp.discovery_enabled:
            print(f"node {resp.node} runs without discovery (--no-mdns)")
        else:
            print(_table([_service_row(s) for s in resp.services], _SERVICE_HEADER))
        return
    import asyncio

    seen: dict[tuple[str, str], discovery_pb2.Service] = {}
    while True:  # --watch: poll and print what changed, one line (or JSON object) per change
        now = {(s.type, s.name): s for s in resp.services}
        for key in sorted(now.keys() | seen.keys()):
            old, new = seen.get(key), now.get(key)
            if old == new:
                continue
            change = "removed" if new is None else "added" if old is None else "changed"
            svc = new or old
            assert svc is not None
            if args.json:
                print(json.dumps({"change": change, "service": _to_dict(svc)}), flush=True)
            else:
                print(f"{change:<8} " + "  ".join(_service_row(svc)), flush=True)
        seen = now
        await asyncio.sleep(args.interval)
        resp = await client.query(path, name=args.name, type_=args.type)


async def _kick(client: Client, listen_id: str) -> None:
    await client.kick(listen_id)
    print(f"kicked {listen_id}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hnctl`` command."""
    PROG[0] = "hnctl"
    args = _parser().parse_args(argv)
    node, tls = args.node, args.tls
    path: list[str] = []
    try:
        parse_endpoint(args.node, DEFAULT_PORT)
    except AddressError as exc:
        fail(f"--node: {exc}", EXIT_USAGE)
    if args.command == "query":
        try:
            node, path, url_tls = query_target(args.url)
        except HomeNetError as exc:
            fail(str(exc), EXIT_USAGE)
        tls = tls or url_tls

    try:
        found = client_key(key_file=args.key_file, env=client_settings().key_env, local_keys=load_settings().keys_path)
    except (KeyFileError, SettingsError) as exc:
        fail(str(exc), EXIT_USAGE)
    creds = Credentials(*found) if found else None

    async def go() -> None:
        if args.command == "query":  # a ws:// relay: through a local tunnel forwarder
            tunnel = query_endpoint(
                args.url, timeout=args.timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
            )
            async with tunnel as (local, _, url_tls):
                await session(local, args.tls or url_tls)
        else:
            await session(node, tls)

    async def session(node: str, tls: bool) -> None:
        # no retries: hnctl reports the first failure (scripts decide whether to try again)
        async with Client(
            node, key=creds, timeout=args.timeout, tls=tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
            tls_key=args.tls_key, retries=0,
        ) as client:  # fmt: skip
            if args.command == "status":
                await _status(client, args.json)
            elif args.command == "sessions":
                await _sessions(client, args.json)
            elif args.command == "listeners":
                await (_fleet_listeners if args.fleet else _listeners)(client, args.json)
            elif args.command == "peers":
                await _peers(client, args.json)
            elif args.command == "query":
                await _query(client, path, args)
            elif args.command == "kick":
                await _kick(client, args.listen_id)

    def body() -> int:
        try:
            run(go())
        except ControlError as exc:
            fail(str(exc))
        return EXIT_OK

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
