"""``hnctl``: look at and control nodes through their gRPC API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from homenet import __version__
from homenet.cli.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, fail, run
from homenet.control.client import ControlClient, ControlError
from homenet.node.address import DEFAULT_PORT, AddressError, parse_endpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hnctl", description="Look at and control HomeNet nodes.")
    p.add_argument("--version", action="version", version=f"hnctl {__version__}")
    p.add_argument(
        "--node", default=os.environ.get("HOMENET_NODE", "127.0.0.1:6969"),
        help="node to talk to, HOST:PORT (default $HOMENET_NODE or 127.0.0.1:6969)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call in seconds (default 5)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("status", "the node's identity, uptime and counters"),
        ("sessions", "sessions spliced now"),
        ("listeners", "listeners registered on this relay"),
    ):
        c = sub.add_parser(name, help=text, description=text.capitalize() + ".")
        c.add_argument("--json", action="store_true", help="print JSON")
    kick = sub.add_parser("kick", help="end a listener's stream and free its listenId", description="Kick a listener.")
    kick.add_argument("listen_id", metavar="LISTENID")
    return p


def _to_dict(msg: Message) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


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


async def _status(client: ControlClient, as_json: bool) -> None:
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
    print(f"relayed    {_bytes(st.bytes_up)} up, {_bytes(st.bytes_down)} down")


async def _sessions(client: ControlClient, as_json: bool) -> None:
    resp = await client.sessions()
    if as_json:
        print(json.dumps(_to_dict(resp)["sessions"], indent=2))
        return
    now = time.time()
    rows = [
        [str(s.id), s.client, s.target, s.dialed, f"{now - s.since:.0f}s", _bytes(s.bytes_up), _bytes(s.bytes_down)]
        for s in resp.sessions
    ]
    print(_table(rows, ["ID", "CLIENT", "TARGET", "DIALED", "AGE", "UP", "DOWN"]))


async def _listeners(client: ControlClient, as_json: bool) -> None:
    resp = await client.listeners()
    if as_json:
        print(json.dumps(_to_dict(resp)["listeners"], indent=2))
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
        for x in resp.listeners
    ]
    print(_table(rows, ["LISTENID", "STATE", "PEER", "NAME", "SINCE", "SESSIONS", "UP", "DOWN", "POOL"]))


async def _kick(client: ControlClient, listen_id: str) -> None:
    await client.kick(listen_id)
    print(f"kicked {listen_id}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hnctl`` command."""
    args = _parser().parse_args(argv)
    try:
        parse_endpoint(args.node, DEFAULT_PORT)
    except AddressError as exc:
        fail(f"--node: {exc}", EXIT_USAGE)

    async def go() -> None:
        async with ControlClient(args.node, args.timeout) as client:
            if args.command == "status":
                await _status(client, args.json)
            elif args.command == "sessions":
                await _sessions(client, args.json)
            elif args.command == "listeners":
                await _listeners(client, args.json)
            elif args.command == "kick":
                await _kick(client, args.listen_id)

    try:
        run(go())
    except ControlError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
