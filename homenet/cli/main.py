"""``homenet``: run a node, connect to a route, forward a local port to a route."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from homenet import __version__
from homenet.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    fail,
    guarded,
    raise_nofile,
    run,
)
from homenet.client import Dialer
from homenet.node.address import AddressError, Route, parse_endpoint, parse_url
from homenet.node.auth import Credentials
from homenet.node.client import RouteFailed
from homenet.node.keys import ROLES, KeyFileError, KeyStore, client_key, new_secret
from homenet.node.log import configure
from homenet.node.settings import Settings, SettingsError, cli_options, client_settings, load_settings
from homenet.node.tls import TLSError


def _announce(line: str) -> None:
    print(line, flush=True)


def _notice(line: str) -> None:
    print(f"homenet: {line}", file=sys.stderr, flush=True)


def _dialer(route: Route, args: argparse.Namespace) -> Dialer:
    """How this command opens ``route`` (the client library's dialer): its --timeout, key and
    TLS flags. No retries: the command reports the first failure, and the caller decides."""
    creds = _client_creds(args.key_file)
    try:
        return Dialer.for_route(
            route, key=creds, timeout=args.timeout, tls_ca=args.tls_ca or client_settings().tls_ca,
            tls_cert=args.tls_cert, tls_key=args.tls_key, retries=0,
        )  # fmt: skip
    except TLSError as exc:
        fail(str(exc), EXIT_USAGE)


def _client_creds(key_file: str | None) -> Credentials | None:
    """The key this command signs with (--key-file, HOMENET_KEY, HOMENET_KEY_FILE), if any."""
    try:
        found = client_key(key_file=key_file, env=client_settings().key_env)
    except KeyFileError as exc:
        fail(str(exc), EXIT_USAGE)
    return Credentials(*found) if found else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="homenet", description="Every server of a home network through one port.")
    p.add_argument("--version", action="version", version=f"homenet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_node(sub)
    _add_rl(sub)
    _add_connect(sub)
    _add_publish(sub)
    _add_key(sub)
    _add_listen(sub)
    return p


def _add_node(sub: Any) -> None:
    node = sub.add_parser("node", help="run a node (relay and/or home bridge)", description="Run a node.")
    for opt in cli_options():
        node.add_argument(opt.flag, **opt.kwargs)
    node.add_argument("--config", help="TOML config file (flags > HOMENET_* env > file)")


def _add_rl(sub: Any) -> None:
    rl = sub.add_parser(
        "rl", help="remote-listen on a relay and forward every client to one target",
        description="Remote-listen on RELAY; every client of hn://RELAY/LISTENID is forwarded to --to HOST:PORT.",
    )  # fmt: skip
    rl.add_argument("url", metavar="URL", help="hn://RELAY[:PORT][/HOP...] (hns:// TLS, ws:// WebSocket, wss:// both)")
    rl.add_argument("--to", required=True, metavar="HOST:PORT", help="the one target every client reaches")
    for opt in cli_options():
        if opt.rl:
            rl.add_argument(opt.flag, **opt.kwargs)
    rl.add_argument("--config", help="TOML config file")


def _client_flags(cmd: argparse.ArgumentParser) -> None:
    """What every command that opens a route takes: a deadline, a key, TLS."""
    cmd.add_argument("url", metavar="URL", help="hn://HOST[:PORT]/HOP... (hns:// TLS, ws:// WebSocket, wss:// both)")
    cmd.add_argument("--timeout", type=float, default=10.0, help="seconds to open the route (default 10)")
    cmd.add_argument("--key-file", metavar="FILE", help="key to sign requests with (default $HOMENET_KEY)")
    cmd.add_argument("--tls-ca", metavar="PEM", help="CA to verify an hns:// or wss:// node (default: system store)")
    cmd.add_argument("--tls-cert", metavar="PEM", help="client certificate for nodes that require one (mTLS)")
    cmd.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def _add_connect(sub: Any) -> None:
    conn = sub.add_parser(
        "connect", help="netcat for HomeNet: stdin to the target, the target to stdout",
        description="Connect to URL; exit 0 when the target closes, 1 with a reason when the route fails.",
    )  # fmt: skip
    _client_flags(conn)
    conn.add_argument("--data", help="send TEXT instead of reading stdin, then half-close")


def _add_listen(sub: Any) -> None:
    lis = sub.add_parser(
        "listen", help="forward a local TCP port to URL",
        description="Forward every connection to a local port to URL.",
    )  # fmt: skip
    _client_flags(lis)
    lis.add_argument("--bind", default="127.0.0.1", help="local address (default 127.0.0.1)")
    lis.add_argument("--port", type=int, default=0, help="local port (default: a free one)")
    lis.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def _add_publish(sub: Any) -> None:
    pub = sub.add_parser(
        "publish", help="announce a service on the LAN over mDNS until stopped",
        description="Announce a service on the LAN (mDNS) until stopped; HomeNet nodes list it and reach it.",
    )  # fmt: skip
    pub.add_argument("--name", required=True, help="instance name, e.g. 'Photos'")
    pub.add_argument("--port", required=True, type=int, help="TCP port of the service")
    pub.add_argument("--type", default="_homenet._tcp", help="service type (default _homenet._tcp)")
    pub.add_argument("--txt", action="append", default=[], metavar="KEY=VALUE", help="TXT entry (repeatable)")
    pub.add_argument(
        "--private", action="store_true",
        help="no effect (kept for old scripts): whether clients need a key is the node operator's --public-service",
    )  # fmt: skip
    pub.add_argument(
        "--mdns-interface", action="append", default=[], metavar="ADDR",
        help="announce only on the interface with this address (repeatable; default: all)",
    )  # fmt: skip


def _add_key(sub: Any) -> None:
    key = sub.add_parser("key", help="manage the keys a node accepts", description="Manage a node's keys file.")
    key.add_argument("--keys-file", metavar="FILE", help="default: $HOMENET_KEYS_FILE or STATE_DIR/keys.toml")
    key.add_argument("--state-dir", help="the node's state directory")
    ksub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    knew = ksub.add_parser("new", help="create a key and print ID:SECRET once")
    knew.add_argument("id", metavar="ID", help="key id (a listen key claims the listenId ID)")
    knew.add_argument("--role", action="append", choices=list(ROLES), required=True, help="repeatable")
    ksub.add_parser("list", help="list keys (ids and roles, never secrets)")
    kshow = ksub.add_parser("show", help="print one key as ID:SECRET (for a client; needs the keys file)")
    kshow.add_argument("id", metavar="ID")
    krev = ksub.add_parser("revoke", help="delete a key (running nodes notice within a second)")
    krev.add_argument("id", metavar="ID")
    ksub.add_parser("fleet", help="print a new fleet key (ID:SECRET) for --fleet-key-file, once")


def _given(args: argparse.Namespace, rl_only: bool = False) -> dict[str, Any]:
    """The settings the user gave as flags (repeated flags as tuples)."""
    out: dict[str, Any] = {}
    for opt in cli_options():
        if rl_only and not opt.rl:
            continue
        value = getattr(args, opt.name)
        out[opt.name] = tuple(value) if isinstance(value, list) else value
    return out


def _cmd_node(args: argparse.Namespace) -> int:
    from homenet.control.runtime import Fatal, run_node, supervise
    from homenet.control.workers import EXIT_FATAL, current_spec, die_with_supervisor, worker_settings

    settings = load_settings(_given(args), config=args.config)  # errors: one line, exit 2 (guarded)
    configure(settings.log_level, settings.log_format)
    raise_nofile()
    spec = current_spec()
    try:
        if spec is not None:  # one worker of a supervisor (which started it with this command line)
            die_with_supervisor(spec)
            try:
                run(run_node(worker_settings(settings, spec), _announce, notice=_notice, spec=spec))
            except Fatal as exc:
                fail(str(exc), EXIT_FATAL)
        elif settings.worker_count > 1:
            return run(supervise(settings, _ARGV[0], _announce, _notice))
        else:
            run(run_node(settings, _announce, notice=_notice))
    except OSError as exc:
        fail(f"cannot listen on {settings.bind}:{settings.port}: {exc.strerror or exc}", EXIT_FAILED)
    return EXIT_OK


def _cmd_rl(args: argparse.Namespace) -> int:
    from homenet.control.runtime import run_rl

    to = parse_endpoint(args.to)
    parse_url(args.url)
    settings = load_settings(_given(args, rl_only=True), config=args.config)
    configure(settings.log_level, settings.log_format)
    raise_nofile()
    run(run_rl(settings, args.url, to, _announce))
    return EXIT_OK


def _cmd_connect(args: argparse.Namespace) -> int:
    from homenet.node.forward import stdio_session

    try:
        route = parse_url(args.url)
    except AddressError as exc:
        fail(str(exc), EXIT_USAGE)
    data = args.data.encode("utf-8") if args.data is not None else None
    try:
        run(stdio_session(route, data, _dialer(route, args)))
    except RouteFailed as exc:
        fail(str(exc))
    except (ConnectionError, OSError) as exc:
        fail(f"{route}: connection broke: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
    return EXIT_OK


def _cmd_listen(args: argparse.Namespace) -> int:
    from homenet.node.forward import Forwarder

    try:
        route = parse_url(args.url)
    except AddressError as exc:
        fail(str(exc), EXIT_USAGE)
    if not route.hops:
        fail(f"{route} names no target: add a hop, e.g. {route}/127.0.0.1:22", EXIT_USAGE)
    configure(args.log_level)
    raise_nofile()
    dialing = _dialer(route, args)

    async def serve() -> None:
        import asyncio

        from homenet.control.runtime import signals

        fwd = Forwarder(route, args.bind, args.port, dialing)
        try:
            ep = await fwd.start()
        except OSError as exc:
            fail(f"cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}")
        stop = asyncio.Event()
        _announce(f"LISTENING tcp://{ep} -> {route}")
        try:
            async with signals(stop):
                await stop.wait()
        finally:
            await fwd.close()

    run(serve())
    return EXIT_OK


def _cmd_publish(args: argparse.Namespace) -> int:
    from homenet.node.discovery import Advertiser, normalise_type

    txt: dict[str, str] = {}
    for item in args.txt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"bad --txt {item!r}: expected KEY=VALUE", EXIT_USAGE)
        txt[key] = value
    if not 0 < args.port < 65536:
        fail(f"bad --port {args.port}: expected 1-65535", EXIT_USAGE)
    try:
        type_ = normalise_type(args.type)
        Settings(mdns_interface=tuple(args.mdns_interface))
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    configure("warning")

    async def serve() -> None:
        import asyncio

        from homenet.control.runtime import signals

        adv = Advertiser(args.mdns_interface)
        await adv.start()
        stop = asyncio.Event()
        try:
            async with signals(stop):
                info = await adv.publish(args.name, type_, args.port, txt)
                _announce(f"PUBLISHED {info.name} port {args.port}")
                await stop.wait()
        finally:
            await adv.close()

    run(serve())
    return EXIT_OK


def _cmd_key(args: argparse.Namespace) -> int:
    if args.key_command == "fleet":  # not a key of this node's keys file: the fleet's own
        print(f"fleet:{new_secret().reveal()}")
        return EXIT_OK
    try:
        settings = load_settings({"keys_file": args.keys_file, "state_dir": args.state_dir})
        store = KeyStore(settings.keys_path)
        if args.key_command == "new":
            k = store.add(args.id, args.role)
            print(f"{k.id}:{k.secret.reveal()}")
            _notice(f"created key {k.id} ({', '.join(sorted(k.roles))}) in {store.path}; shown once, keep it secret")
        elif args.key_command == "list":
            for k in store.all():
                print(f"{k.id}  {','.join(sorted(k.roles))}")
        elif args.key_command == "show":
            found = store.get(args.id)
            if found is None:
                fail(f"no key {args.id} in {store.path}")
            print(f"{found.id}:{found.secret.reveal()}")
        elif not store.revoke(args.id):
            fail(f"no key {args.id} in {store.path}")
    except (KeyFileError, SettingsError) as exc:
        fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        fail(f"cannot write keys file: {exc.strerror or exc}")
    return EXIT_OK


_COMMANDS = {
    "key": _cmd_key,
    "node": _cmd_node,
    "rl": _cmd_rl,
    "connect": _cmd_connect,
    "listen": _cmd_listen,
    "publish": _cmd_publish,
}


#: The command line of this run (workers of ``homenet node --workers N`` get it too).
_ARGV: list[list[str]] = [[]]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``homenet`` command."""
    PROG[0] = "homenet"
    _ARGV[0] = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    handler = _COMMANDS[args.command]
    return guarded(lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
