"""The README cannot drift from the CLI: its shell examples are checked against the real programs.

* ``test_readme_command_parses``: every ``homenet``/``hnctl`` command line of README.md's ```sh
  blocks (and the ``homenet`` command inside the ssh ProxyCommand) is parsed by the product's own
  argparse parsers: an unknown flag or subcommand fails, naming the README line.
* ``test_commands_table_row``: every row of the Commands table names subcommands and flags the
  parsers have, with the arity (``--flag VALUE`` or ``--flag``) and repeatability (``[...]...``)
  the row shows, and a command line built from the row parses.
* ``test_use_it``: the "Use it" block runs end to end, one README line after the other, each a real
  ``homenet``/``hnctl`` console script, with the README's hosts mapped to loopback and each output
  the README promises asserted (``Flow`` below). One test per README line, so a failure names it.

Nothing here is a copy of a README command: the lines are read from README.md at collection and
substituted, so when the README changes the test follows it, or fails on the line it cannot follow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import shlex
import shutil
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from homenet.node.address import Endpoint, ListenId, parse_endpoint, parse_url
from tests.helpers import EchoServer, NodeProc, proc_env
from tests.integration.readme_support import (
    PARSERS,
    Command,
    Line,
    ParseFailed,
    cli_lines,
    command,
    expectation,
    output_comment,
    parse,
    promised_output,
    proxy_commands,
    substitute,
    table_cases,
    usage_argv,
    use_it_lines,
    words,
)
from tests.integration.support import CliResult, connected, run_program

#: The real console scripts (pytest runs from the venv that installed them).
BIN = Path(sys.executable).parent
#: Upper bound of one step of the flow (a command, a wait for a line).
STEP_TIMEOUT = 15.0


# -- test 1 and 2: parsing -----------------------------------------------------------------------------
def _cli_id(case: tuple[Line, list[str]]) -> str:
    return f"L{case[0].number}:{' '.join(case[1][:2])}"


@pytest.mark.parametrize("case", cli_lines(), ids=_cli_id)
def test_readme_command_parses(case: tuple[Line, list[str]]) -> None:
    line, argv = case
    try:
        args = parse(argv)
    except ParseFailed as exc:
        refused = str(exc)
    else:
        assert args.command, line
        return
    pytest.fail(f"{line}\n`{shlex.join(argv)}` is refused by the real {argv[0]} parser:\n{refused}", pytrace=False)


@pytest.mark.parametrize(("number", "usage"), table_cases(), ids=[f"L{n}:{u}" for n, u in table_cases()])
def test_commands_table_row(number: int, usage: str) -> None:
    where = f"README.md:{number} (Commands table: `{usage}`)"
    argv, repeats = usage_argv(usage, where)
    try:
        args = parse(argv)
    except ParseFailed as exc:
        refused = str(exc)
    else:
        refused = ""
    if refused:
        pytest.fail(f"{where}\nbuilt `{shlex.join(argv)}`, refused by the real parser:\n{refused}", pytrace=False)
    for dest, count in repeats.items():
        value = getattr(args, dest)
        assert isinstance(value, list), f"{where}: the README shows {dest} as repeatable, the parser keeps one"
        assert len(value) == count, f"{where}: {dest} kept {value!r}"


def test_readme_examples_are_found() -> None:
    """The extraction itself: an empty parametrization would pass silently."""
    programs = [argv[:2] for _, argv in cli_lines()]
    for needed in (["homenet", "node"], ["homenet", "connect"], ["homenet", "listen"], ["homenet", "rl"]):
        assert needed in programs, f"no `{' '.join(needed)}` example in README.md's sh blocks"
    assert any(argv[0] == "hnctl" for argv in programs)
    usages = {" ".join(u.split()[:2]) for _, u in table_cases()}
    assert {"homenet node", "homenet connect", "homenet listen", "homenet rl", "homenet publish"} <= usages
    assert len(use_it_lines()) >= 10
    stale = [d.pattern for d in KNOWN_DRIFT if not any(d.matches(line) for line in use_it_lines())]
    assert not stale, f"KNOWN_DRIFT entries that match no README line any more: {stale}"


# -- test 3: the "Use it" flow -------------------------------------------------------------------------
#: Where the README says a line runs -> the machine the flow runs it on. The README's words are
#: looked up in the line's own comment first, then in its paragraph's opening comment; a paragraph
#: that names no place continues on the machine of the paragraph before it. Each machine has a
#: state directory (keys file, listenIds) and an environment of its own.
PLACES = (
    (re.compile(r"\bon the public VM\b"), "relay-vm"),
    (re.compile(r"^operators\b"), "relay-vm"),  # the relay's operator: hnctl finds the admin key there
    (re.compile(r"\bat home\b"), "home"),
    (re.compile(r"\bon the home node\b"), "home"),
    (re.compile(r"\bon alice's laptop\b"), "laptop"),
    (re.compile(r"^anywhere\b"), "laptop"),
)
#: The README's relay host and default port; the node started on the relay VM stands for it.
README_RELAY, README_PORT = "relay.example.net", 6969
#: The README's LAN targets -> the loopback server that stands for each (see Flow.setup).
LAN_TARGETS = {"192.168.1.20:22": "ssh", "127.0.0.1:8080": "web"}
#: The README's discovered services -> (instance name, type, server) published with `homenet publish`
#: on 127.0.0.1 mDNS. Names get a random token (other tests share loopback mDNS), so the listenId
#: differs from the README's; the flow substitutes the one the home node gives it.
LAN_SERVICES = {"photos-server-http": ("Photos Server", "_http._tcp", "photos")}
#: One more service, of type ssh, for `hnctl query ... --type ssh`.
SSH_SERVICE = ("Garage Pi", "_ssh._tcp", "ssh")


@dataclass(frozen=True)
class Drift:
    """A README line known not to work with the current CLI: its test must fail with ``symptom``
    (an xfail); once it works, the test fails until the entry is removed (strict)."""

    pattern: str
    symptom: str
    reason: str

    def matches(self, line: Line) -> bool:
        return re.search(self.pattern, line.text) is not None


KNOWN_DRIFT: tuple[Drift, ...] = ()


def known_drift(line: Line) -> Drift | None:
    return next((d for d in KNOWN_DRIFT if d.matches(line)), None)


@dataclass(frozen=True)
class Outcome:
    status: Literal["passed", "failed", "skipped"]
    detail: str = ""


class Skipped(Exception):
    """A README line the flow cannot run here (the reason says why)."""


@dataclass
class Machine:
    """One of the README's computers."""

    name: str
    env: dict[str, str]


class SshLikeServer(EchoServer):
    """Answers like an ssh server's first bytes (its banner line), then echoes."""

    BANNER = b"SSH-2.0-HomeNet_readme_stand_in\r\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.BANNER)
        await super()._handle(reader, writer)

    def reply(self, data: bytes) -> bytes:
        return self.BANNER + data


def answer(server: EchoServer, data: bytes) -> bytes:
    """What ``server`` sends back to a client that sends ``data`` and half-closes."""
    return server.reply(data) if isinstance(server, SshLikeServer) else data


def loopback_node_args(args: list[str]) -> list[str]:
    """A README ``homenet node`` made loopback-only: ``--bind 127.0.0.1`` and ``--port 0`` (the
    README's nodes use 0.0.0.0:6969; a test must open nothing on real interfaces nor depend on a
    fixed port: the port is read from READY). ``--allow lan`` gets ``--allow 127.0.0.1/32`` next
    to it: the README's LAN hosts are loopback servers here, and loopback is not "lan" (the
    policy refuses it unless a rule names it)."""
    out: list[str] = []
    rest = iter(_split_equals(args))
    for word in rest:
        if word in ("--port", "--bind"):
            next(rest, None)
            continue
        out.append(word)
        if word == "--allow":
            value = next(rest, "")
            out.append(value)
            if value == "lan":
                out += ["--allow", "127.0.0.1/32"]
    return [*out, "--bind", "127.0.0.1", "--port", "0"]


def _split_equals(args: list[str]) -> list[str]:
    out: list[str] = []
    for word in args:
        out += word.split("=", 1) if word.startswith("--") and "=" in word else [word]
    return out


def _replace_option(args: list[str], option: str, value: str) -> tuple[list[str], str | None]:
    """``args`` with ``option``'s value set to ``value``; and the value the README gave (if any)."""
    args = _split_equals(args)
    if option in args:
        i = args.index(option)
        old = args[i + 1] if i + 1 < len(args) else None
        return [*args[:i], option, value, *args[i + 2 :]], old
    return [*args, option, value], None


def assert_loopback(argv: list[str], where: Line) -> None:
    """Refuse to run a command that would make a node dial off loopback: every route, --to and
    --node must name 127.0.0.0/8 or [::1] once substituted (a README host without a substitution
    stops the test here rather than being dialed)."""
    for i, word in enumerate(argv):
        endpoints: list[Endpoint] = []
        try:
            if "://" in word:
                route = parse_url(word)
                endpoints = [route.entry, *(h for h in route.hops if not isinstance(h, ListenId))]
            elif i > 0 and argv[i - 1] in ("--to", "--node"):
                endpoints = [parse_endpoint(word, README_PORT)]
        except ValueError as exc:
            raise AssertionError(f"{where}: `{word}` after substitution: {exc}") from None
        for ep in endpoints:
            host = str(ep.host).strip("[]")
            if not (host.startswith("127.") or host == "::1"):
                raise AssertionError(f"{where}: `{word}` names {host}, which has no loopback substitution here")


def _shown(env: Mapping[str, str], argv: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def _result(res: CliResult) -> str:
    return f"exit {res.code}\nstdout: {res.stdout!r}\nstderr: {res.stderr.strip()}"


@dataclass
class Flow:
    """Runs the "Use it" lines in order on three loopback "machines" (relay VM, home, laptop).

    Substitutions (README word -> this run): relay.example.net[:6969] -> 127.0.0.1:PORT of the
    node started on the relay VM (``homenet node --bind 127.0.0.1 --port 0``, port from READY);
    192.168.1.20:22 -> a loopback server that answers like sshd's first bytes and echoes;
    127.0.0.1:8080 -> a loopback echo server (a fixed port might be taken); photos-server-http ->
    the listenId the home node gave a service published with ``homenet publish`` on 127.0.0.1;
    ID:SECRET and Xk3... -> what ``homenet key new`` and ``homenet rl`` printed.
    """

    tmp: Path
    subs: dict[str, str] = field(default_factory=dict)
    machines: dict[str, Machine] = field(default_factory=dict)
    servers: dict[str, EchoServer] = field(default_factory=dict)
    #: README target (last hop of a route) -> the server behind it.
    targets: dict[str, EchoServer] = field(default_factory=dict)
    #: Machine -> the node the flow started there.
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    procs: list[NodeProc] = field(default_factory=list)
    #: Lines each long-running process printed (stdout), in order.
    printed: dict[int, list[str]] = field(default_factory=dict)
    #: The process whose output the README's comment-only output lines show.
    last_long: NodeProc | None = None
    published: dict[str, str] = field(default_factory=dict)  # instance name -> type
    #: Machine -> the key its node remote-listens with.
    listen_keys: dict[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(3))

    # -- setup and teardown ------------------------------------------------------------------------
    async def setup(self) -> None:
        for name in ("relay-vm", "home", "laptop"):
            env = proc_env(self.tmp / name, secure=True)  # mDNS on 127.0.0.1; no relaxed auth
            env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # ssh's ProxyCommand finds `homenet`
            self.machines[name] = Machine(name, env)
        self.servers = {"ssh": SshLikeServer(), "web": EchoServer(), "photos": EchoServer()}
        for server in self.servers.values():
            await server.start()
        for readme, name in LAN_TARGETS.items():
            self.targets[readme] = self.servers[name]
            self.subs[readme] = self.servers[name].endpoint
        # the home LAN's services, announced before the home node starts browsing
        services = [(f"{name} {self.token}", type_, server) for name, type_, server in LAN_SERVICES.values()]
        services.append((f"{SSH_SERVICE[0]} {self.token}", SSH_SERVICE[1], SSH_SERVICE[2]))
        await asyncio.gather(*(self.publish(*s) for s in services))

    async def publish(self, name: str, type_: str, server: str) -> None:
        port = self.servers[server].port
        argv = ["homenet", "publish", "--name", name, "--port", str(port), "--type", type_]
        proc = await self.start([*argv, "--mdns-interface", "127.0.0.1"], self.machines["home"].env)
        line = await self.next_line(proc, "PUBLISHED ")
        # the Commands table: `PUBLISHED NAME._TYPE port N` (the full mDNS name, .local. included)
        assert re.fullmatch(rf"PUBLISHED {re.escape(name)}\.{re.escape(type_)}(\.local\.)? port {port}", line), line
        self.published[name] = type_

    async def teardown(self) -> None:
        # listeners before their relay: its SIGTERM would otherwise wait on their live streams
        for proc in reversed(self.procs):
            await proc.stop()
        for server in self.servers.values():
            await server.close()

    # -- processes ---------------------------------------------------------------------------------
    async def start(self, argv: list[str], env: dict[str, str]) -> NodeProc:
        """A long-running console script (``BIN/homenet ...``): tests.helpers.spawn runs
        ``python -m homenet``, this test runs the installed scripts the README names."""
        err = self.tmp / f"proc-{len(self.procs)}-{argv[0]}-{argv[1]}.stderr"
        with err.open("wb") as fh:
            proc = await asyncio.create_subprocess_exec(
                str(BIN / argv[0]), *argv[1:],
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=fh, env=env,
            )  # fmt: skip
        node = NodeProc(proc, err)
        node._reader = asyncio.get_running_loop().create_task(node._pump())
        self.procs.append(node)
        self.printed[id(node)] = []
        return node

    async def next_line(self, proc: NodeProc, prefix: str) -> str:
        """The process's next line starting with ``prefix`` (AssertionError, with its stderr, if it
        exits first or prints none within STEP_TIMEOUT)."""
        try:
            line = await proc.next_line(prefix, timeout=STEP_TIMEOUT)
        except TimeoutError:
            raise AssertionError(
                f"no {prefix.strip()} line within {STEP_TIMEOUT:g}s; stderr:\n{proc.stderr()}"
            ) from None
        self.printed[id(proc)].append(line)
        return line

    async def run(self, argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> CliResult:
        return await run_program(str(BIN / argv[0]), *argv[1:], stdin=stdin, timeout=STEP_TIMEOUT, env=env)

    # -- the lines ---------------------------------------------------------------------------------
    async def attempt(self, line: Line, machine: str) -> Outcome:
        try:
            async with asyncio.timeout(3 * STEP_TIMEOUT):
                await self.step(line, machine)
        except Skipped as exc:
            return Outcome("skipped", str(exc))
        except ParseFailed as exc:
            return Outcome("failed", f"{line}\nrefused by the real parser:\n{exc}")
        except AssertionError as exc:
            return Outcome("failed", str(exc))
        except Exception:
            return Outcome("failed", f"{line}\n{traceback.format_exc()}")
        return Outcome("passed")

    async def step(self, line: Line, machine: str) -> None:
        cmd = command(line)
        if cmd is None:
            return self.check_shown_output(line)
        env = {**self.machines[machine].env, **{k: substitute(v, self.subs) for k, v in cmd.env.items()}}
        argv = [substitute(w, self.subs) for w in cmd.argv]
        if argv[0] == "export":
            for assignment in argv[1:]:
                name, sep, value = assignment.partition("=")
                assert sep, f"{line}: not an assignment: {assignment}"
                assert "SECRET" not in value, f"{line}: nothing printed a value for {assignment}"
                self.machines[machine].env[name] = value
            return None
        if argv[0] == "ssh":
            return await self.ssh(cmd, argv, env)
        assert argv[0] in PARSERS, f"{line}: the flow does not know how to run {argv[0]!r}; teach it"
        args = parse(argv)
        kind = (argv[0], args.command)
        if kind == ("homenet", "node"):
            await self.node(cmd, [*argv[:2], *loopback_node_args(argv[2:])], env, machine)
        elif kind == ("homenet", "key") and args.key_command in ("new", "show"):
            await self.key_new(cmd, argv, env, args.id)
        elif kind == ("homenet", "connect"):
            await self.connect(cmd, argv, env, args.data)
        elif kind == ("homenet", "listen"):
            await self.listen(cmd, argv, env, args.url)
        elif kind == ("homenet", "rl"):
            await self.rl(cmd, argv, env)
        elif kind == ("hnctl", "query"):
            await self.query(cmd, argv, env, args)
        elif argv[0] == "hnctl":
            await self.operate(cmd, argv, env, args)
        else:
            raise AssertionError(f"{line}: the flow does not know how to run `{' '.join(kind)}`; teach it")
        return None

    def check_promise(
        self, cmd: Command, text: str, lines: list[str], *, whole_line: bool, own: Mapping[str, str] | None = None
    ) -> None:
        """The output the README's comment promises is there; its placeholders become substitutions
        (``own``: substitutions for this output only)."""
        shown = substitute(text, {**self.subs, **(own or {})})
        pattern, names = expectation(shown)
        found = None
        for out in lines:
            found = pattern.fullmatch(out) if whole_line else pattern.search(out)
            if found:
                break
        assert found is not None, f"{cmd.line}\nthe README promises {text!r}, the program printed:\n" + "\n".join(lines)
        for i, (placeholder, prefix) in enumerate(names):
            if len(placeholder) > len("..."):  # `Xk3...`, `home1:SECRET`: words later lines use
                self.subs[placeholder] = prefix + found.group(f"p{i}")
        return None

    def check_shown_output(self, line: Line) -> None:
        """A comment-only line showing output (``#   READY hn://0.0.0.0:6969``): the last
        long-running command before it printed that line (0.0.0.0:6969 = its own address)."""
        text = output_comment(line)
        assert text is not None
        proc = self.last_long
        assert proc is not None, f"{line}: no program ran before this output line"
        cmd = Command(line, {}, [], False, text)
        own = {f"0.0.0.0:{README_PORT}": proc.endpoint}  # the README's node binds its defaults
        self.check_promise(cmd, text, self.printed[id(proc)], whole_line=True, own=own)

    async def node(self, cmd: Command, argv: list[str], env: dict[str, str], machine: str) -> None:
        where = f"{cmd.line}\nran: {_shown(cmd.env, argv)}"
        assert_loopback(argv, cmd.line)
        proc = await self.start(argv, env)
        self.last_long = proc
        try:
            ready = await self.next_line(proc, "READY ")
            assert re.fullmatch(r"READY hn://127\.0\.0\.1:[0-9]+", ready), f"{where}\n{ready!r}"
            proc.url = ready.split()[1]
            relays = [argv[i + 1] for i, w in enumerate(argv) if w == "--rl"]
            for relay in relays:  # one LISTENING per --rl: hn://RELAY:PORT/.../ID
                listening = await self.next_line(proc, "LISTENING ")
                assert re.fullmatch(rf"LISTENING {re.escape(relay.rstrip('/'))}/[A-Za-z0-9_-]{{1,64}}", listening), (
                    f"{where}\n{listening!r}"
                )
        except AssertionError as exc:  # its message has the process's stderr
            raise AssertionError(f"{where}\n{exc}") from None
        self.nodes[machine] = proc
        if relays and env.get("HOMENET_KEY"):
            self.listen_keys[machine] = env["HOMENET_KEY"]
        if machine == "relay-vm":
            self.subs[f"{README_RELAY}:{README_PORT}"] = self.subs[README_RELAY] = proc.endpoint
        promise = promised_output(cmd.comment)
        if promise is not None:  # e.g. "first start prints: export HOMENET_KEY=admin:..." (on stderr)
            self.check_promise(cmd, promise, [*self.printed[id(proc)], *proc.stderr().splitlines()], whole_line=False)

    async def key_new(self, cmd: Command, argv: list[str], env: dict[str, str], key_id: str) -> None:
        res = await self.run(argv, env)
        where = f"{cmd.line}\nran: {_shown(cmd.env, argv)}\n{_result(res)}"
        assert res.code == 0, where
        printed = res.stdout.decode().strip()
        # `homenet key new ID` prints ID:SECRET once, `homenet key show ID` again (README, Security: Keys)
        assert re.fullmatch(rf"{re.escape(key_id)}:[A-Za-z0-9_-]{{22,128}}", printed), where
        self.subs[f"{key_id}:SECRET"] = printed
        promise = promised_output(cmd.comment)
        if promise is not None:
            self.check_promise(cmd, promise, [printed], whole_line=True)

    def target(self, cmd: Command, url: str) -> EchoServer:
        """The server behind the README route ``url`` (its last hop, as the README writes it)."""
        hop = url.rstrip("/").rsplit("/", 1)[-1]
        assert hop in self.targets, f"{cmd.line}: the flow has no stand-in for the target {hop!r}"
        return self.targets[hop]

    async def connect(self, cmd: Command, argv: list[str], env: dict[str, str], data: str | None) -> None:
        readme_url = next(w for w in cmd.argv[2:] if "://" in w)
        if readme_url.rsplit("/", 1)[-1] in LAN_SERVICES:
            await self.discovered(cmd)
            argv = [substitute(w, self.subs) for w in cmd.argv]
        assert_loopback(argv, cmd.line)
        server = self.target(cmd, readme_url)
        # without --data, stdin goes to the target: the test types a line, then EOF
        payload = data.encode() if data is not None else f"typed into {cmd.line.number}\n".encode()
        res = await self.run(argv, env, stdin=None if data is not None else payload)
        where = f"{cmd.line}\nran: {_shown(cmd.env, argv)}\n{_result(res)}"
        assert res.code == 0, where
        assert res.stdout == answer(server, payload), where

    async def exchange(self, cmd: Command, port: int, server: EchoServer) -> None:
        """A client of a local port forwarded to ``server``: its bytes come back as the server answers."""
        payload = b"SSH-2.0-OpenSSH_readme_client\r\n"
        async with connected("127.0.0.1", port) as conn:
            await conn.send(payload)
            await conn.shutdown_write()
            got = await conn.until_eof(STEP_TIMEOUT)
        assert got == answer(server, payload), f"{cmd.line}: through 127.0.0.1:{port}: {got!r}"

    async def listen(self, cmd: Command, argv: list[str], env: dict[str, str], url: str) -> None:
        argv, readme_port = _replace_option(argv, "--port", "0")  # any free port, read from LISTENING
        assert_loopback(argv, cmd.line)
        server = self.target(cmd, next(w for w in cmd.argv[2:] if "://" in w))
        proc = await self.start(argv, env)
        self.last_long = proc
        try:
            line = await self.next_line(proc, "LISTENING ")
        except AssertionError as exc:
            raise AssertionError(f"{cmd.line}\nran: {_shown(cmd.env, argv)}\n{exc}") from None
        m = re.fullmatch(rf"LISTENING tcp://127\.0\.0\.1:([0-9]+) -> {re.escape(url)}", line)
        assert m, f"{cmd.line}\nprinted {line!r}"
        then = re.search(r"\bthen: ssh -p ([0-9]+) localhost\b", cmd.comment)
        if then:  # the README's follow-up uses the port the command was given
            assert then.group(1) == readme_port, f"{cmd.line}: `ssh -p {then.group(1)}` but --port {readme_port}"
        await self.exchange(cmd, int(m.group(1)), server)

    async def rl(self, cmd: Command, argv: list[str], env: dict[str, str]) -> None:
        assert_loopback(argv, cmd.line)
        readme_to = cmd.argv[cmd.argv.index("--to") + 1]
        assert readme_to in self.targets, f"{cmd.line}: no stand-in for --to {readme_to}"
        failure = await self.start_rl(cmd, argv, env, readme_to)
        if failure is None:
            return
        # so that the lines using its listenId can still be checked, run it once more as the
        # README's Identities paragraph has it: at home, with the home node's listen key
        key = self.listen_keys.get("home")
        assert key is not None, failure
        again = await self.start_rl(cmd, argv, {**self.machines["home"].env, "HOMENET_KEY": key}, readme_to)
        if again is not None:
            raise AssertionError(f"{failure}\nand at home with the home node's listen key too:\n{again}")
        raise AssertionError(f"{failure}\n(then run at home with the home node's listen key, for the lines after it)")

    async def start_rl(self, cmd: Command, argv: list[str], env: dict[str, str], readme_to: str) -> str | None:
        """Start ``homenet rl``; None once it printed LISTENING as promised, else why it did not."""
        proc = await self.start(argv, env)
        self.last_long = proc
        key = {"HOMENET_KEY": env["HOMENET_KEY"]} if env.get("HOMENET_KEY") else {}
        where = f"{cmd.line}\nran: {_shown(key, argv)}"
        try:
            line = await self.next_line(proc, "LISTENING ")
        except AssertionError as exc:
            return f"{where}\n{exc}"
        relay = self.subs[README_RELAY]
        assert re.fullmatch(rf"LISTENING hn://{re.escape(relay)}/[A-Za-z0-9_-]{{1,64}}", line), f"{where}\n{line!r}"
        promise = promised_output(cmd.comment)  # LISTENING hn://relay.example.net:6969/Xk3...
        if promise is not None:
            before = set(self.subs)
            self.check_promise(cmd, promise, [line], whole_line=True)
            for placeholder in set(self.subs) - before:  # its listenId leads to the --to target
                self.targets[placeholder] = self.targets[readme_to]
        return None

    async def discovered(self, cmd: Command) -> None:
        """Wait until the home node lists the published services; substitute their listenIds.

        Asked on the home machine, of the home node itself (``hnctl`` finds its owner's admin key
        there), not through the relay: a discovery has no event a client could await, so this
        polls, bounded, until the services are listed.
        """
        if all(k in self.subs for k in LAN_SERVICES):
            return
        home = self.nodes.get("home")
        assert home is not None, f"{cmd.line}: no home node is running"
        argv = ["hnctl", "--node", home.endpoint, "query", home.url, "--json"]
        loop = asyncio.get_running_loop()
        end = loop.time() + STEP_TIMEOUT
        names: dict[str, str] = {}
        while True:
            res = await self.run(argv, self.machines["home"].env)
            assert res.code == 0, f"{cmd.line}: asking the home node: {_result(res)}"
            names = {s["name"]: s["listen_id"] for s in json.loads(res.stdout)}
            if set(self.published) <= set(names):
                break
            assert loop.time() < end, f"{cmd.line}: the home node never listed {sorted(self.published)}: {names}"
            await asyncio.sleep(0.1)
        for readme_id, (name, _, server) in LAN_SERVICES.items():
            self.subs[readme_id] = names[f"{name} {self.token}"]
            self.targets[readme_id] = self.servers[server]

    async def query(self, cmd: Command, argv: list[str], env: dict[str, str], args: argparse.Namespace) -> None:
        await self.discovered(cmd)
        assert_loopback(argv, cmd.line)
        res = await self.run(argv, env)
        where = f"{cmd.line}\nran: {_shown(cmd.env, argv)}\n{_result(res)}"
        assert res.code == 0, where
        wanted = _type_name(args.type) if args.type else ""
        expected = {
            n for n, t in self.published.items() if (not wanted or t == wanted) and args.name.lower() in n.lower()
        }
        assert expected, f"{cmd.line}: none of the published services {self.published} fits this query"
        if args.json:
            services = json.loads(res.stdout)
            assert isinstance(services, list), where
            listed = {s["name"] for s in services}
            assert expected <= listed, where
            if wanted:
                assert {_type_name(s["type"]) for s in services} == {wanted}, where
        else:
            out = res.stdout.decode()
            for name in expected:
                assert name in out, where

    async def operate(self, cmd: Command, argv: list[str], env: dict[str, str], args: argparse.Namespace) -> None:
        assert_loopback(argv, cmd.line)
        relay = self.nodes["relay-vm"]
        res = await self.run(argv, env)
        where = f"{cmd.line}\nran: {_shown(cmd.env, argv)}\n{_result(res)}"
        assert res.code == 0, where
        out = res.stdout.decode()
        table = [row.split() for row in out.splitlines()]
        header = table[0] if table else []
        if args.command == "status":
            shown = json.loads(out)["address"] if args.json else out
            assert relay.url in shown, where
        elif args.command == "listeners":  # the home node the README started is there, online
            rows = [[x["listen_id"], x["state"]] for x in json.loads(out)] if args.json else table[1:]
            assert ["home1", "online"] in [r[:2] for r in rows], where
            assert args.json or header[:2] == ["LISTENID", "STATE"], where  # rows follow a header
        elif args.command == "sessions":
            if args.json:
                assert isinstance(json.loads(out), list), where
            else:
                assert header[:3] == ["ID", "CLIENT", "TARGET"], where
        elif args.command == "kick":
            assert out.strip() == f"kicked {args.listen_id}", where

    async def ssh(self, cmd: Command, argv: list[str], env: dict[str, str]) -> None:
        """``ssh -o ProxyCommand='homenet connect .../%h:%p' HOST``: ssh runs the ProxyCommand with
        %h/%p expanded and speaks to the server over its stdin/stdout. There is no sshd here (and
        ssh would need one, with host keys and a user to log in), so ssh itself is not run: its
        ProxyCommand is, as ssh would run it, with an ssh client's first bytes on stdin."""
        [proxy] = proxy_commands(cmd.argv)
        host = cmd.argv[-1]
        port = cmd.argv[cmd.argv.index("-p") + 1] if "-p" in cmd.argv else "22"
        expanded = proxy.replace("%h", host).replace("%p", port).replace("%%", "%")
        inner = [substitute(w, self.subs) for w in words(expanded)]
        assert_loopback(inner, cmd.line)
        server = self.target(cmd, f"{host}:{port}")
        hello = b"SSH-2.0-OpenSSH_readme_client\r\n"
        res = await self.run(inner, env, stdin=hello)
        where = f"{cmd.line}\nProxyCommand ran: {shlex.join(inner)}\n{_result(res)}"
        assert res.code == 0, where
        assert res.stdout == answer(server, hello), where
        why = (
            "no sshd on this host"
            if shutil.which("sshd", path="/usr/sbin:/usr/bin") is None
            else "needs an sshd set up"
        )
        raise Skipped(f"{cmd.line}: ssh itself not run ({why}); its ProxyCommand ran as ssh runs it, bytes both ways")


def _type_name(type_: str) -> str:
    """``ssh``, ``_ssh._tcp`` or ``_ssh._tcp.local.`` -> ``_ssh._tcp``."""
    type_ = type_.removesuffix(".").removesuffix(".local")
    return type_ if type_.startswith("_") else f"_{type_}._tcp"


def machines_of(lines: list[Line]) -> dict[int, str]:
    """README line -> the machine it runs on (see PLACES)."""
    out: dict[int, str] = {}
    current = ""
    for line in lines:
        cmd = command(line)
        comment = cmd.comment if cmd is not None else ""
        own = next((m for p, m in PLACES if p.search(comment)), "")
        section = next((m for p, m in PLACES if p.search(line.section)), "")
        current = section or current
        out[line.number] = own or current
        assert out[line.number], f"{line}: the README says nowhere which machine this runs on"
    return out


async def run_flow(tmp: Path, lines: list[Line]) -> dict[int, Outcome]:
    flow = Flow(tmp)
    outcomes: dict[int, Outcome] = {}
    where = machines_of(lines)
    try:
        try:
            await flow.setup()
        except Exception:
            setup = Outcome("failed", f"setup failed:\n{traceback.format_exc()}")
            return dict.fromkeys(where, setup)
        for line in lines:
            outcomes[line.number] = await flow.attempt(line, where[line.number])
    finally:
        await flow.teardown()
    return outcomes


@pytest.fixture(scope="module")
def use_it(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Outcome]:
    """The whole "Use it" block, run once (in its own event loop); every process is stopped
    before the results are handed to the per-line tests."""
    return asyncio.run(run_flow(tmp_path_factory.mktemp("readme"), use_it_lines()))


def _use_it_id(line: Line) -> str:
    cmd = command(line)
    return f"L{line.number}:{' '.join(cmd.argv[:2]) if cmd is not None else 'output'}"


@pytest.mark.parametrize("line", use_it_lines(), ids=_use_it_id)
def test_use_it(line: Line, use_it: dict[int, Outcome]) -> None:
    outcome = use_it.get(line.number, Outcome("failed", f"{line}: the flow never reached this line"))
    drift = known_drift(line)
    if drift is not None:
        if outcome.status == "failed" and drift.symptom in outcome.detail:
            pytest.xfail(f"{line}: {drift.reason}")
        pytest.fail(
            f"{line}\nlisted in KNOWN_DRIFT ({drift.symptom!r}) but {outcome.status}: "
            f"remove the entry if it works now\n{outcome.detail}",
            pytrace=False,
        )
    if outcome.status == "skipped":
        pytest.skip(outcome.detail)
    if outcome.status == "failed":
        pytest.fail(outcome.detail, pytrace=False)
