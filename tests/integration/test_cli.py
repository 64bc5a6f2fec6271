"""The real command line: ``homenet connect``, ``homenet listen``, and node configuration."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import StartNode
from tests.helpers import EchoServer, NodeProc, echo_server, node_args, pattern, proc_env, spawn
from tests.integration.support import (
    OK_REPLY,
    HashServer,
    closed_port,
    connected,
    free_port,
    hash_server,
    homenet,
    request,
    run_program,
    start_chain,
    stays,
    wait_status,
)


def _assert_one_line_error(res_stderr: str) -> None:
    lines = res_stderr.splitlines()
    assert len(lines) == 1, res_stderr
    assert "Traceback" not in res_stderr
    # the program name itself is checked in test_error_names_the_program
    assert re.match(r"\S+: error: \S", lines[0]), lines[0]


def env_of(node: NodeProc) -> dict[str, str]:
    """The environment the harness gives the test's nodes (their state directory included)."""
    return proc_env(node.stderr_path.parent)


# -- homenet connect ---------------------------------------------------------------------------
async def test_connect_data(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo:
        res = await homenet("connect", f"{node.url}/{echo.endpoint}", "--data", "hello, homenet ✓", env=env_of(node))
    assert (res.code, res.stderr) == (0, "")
    assert res.stdout == "hello, homenet ✓".encode()
    assert echo.connections == 1


async def test_connect_stdin(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    data = pattern(1 << 20, seed=7)
    async with echo_server() as echo:
        res = await homenet("connect", f"{node.url}/{echo.endpoint}", stdin=data, env=env_of(node))
    assert (res.code, res.stderr) == (0, "")
    assert res.stdout == data


async def test_connect_stdin_through_a_chain(start_node: StartNode) -> None:
    """stdin EOF becomes a half-close that crosses three nodes; the answer comes back after it."""
    nodes = await start_chain(start_node)
    data = pattern(300_000, seed=8)
    async with hash_server() as target:
        url = nodes[0].url + "".join(f"/{n.endpoint}" for n in nodes[1:]) + f"/{target.endpoint}"
        res = await homenet("connect", url, stdin=data, env=env_of(nodes[0]))
    assert (res.code, res.stderr) == (0, "")
    assert res.stdout == HashServer.answer(data)


async def test_connect_route_failures_are_one_line(start_node: StartNode) -> None:
    node = await start_node("--allow", "10.99.0.0/16")
    async with echo_server() as echo:
        with closed_port() as dead:
            env = env_of(node)
            refused, no_node, bad_url = await asyncio.gather(
                homenet("connect", f"{node.url}/{echo.endpoint}", "--data", "x", env=env),
                homenet("connect", f"hn://127.0.0.1:{dead}/{echo.endpoint}", "--data", "x", env=env),
                homenet("connect", "http://127.0.0.1/x", "--data", "x", env=env),
            )
        assert echo.connections == 0
    for res in (refused, no_node):
        assert res.code == 1, res
        assert res.stdout == b""
        _assert_one_line_error(res.stderr)
    assert "forbidden (403)" in refused.stderr
    assert f"127.0.0.1:{dead}" in no_node.stderr
    assert bad_url.code == 2, bad_url
    _assert_one_line_error(bad_url.stderr)


async def test_unreachable_node_says_connection_refused(tmp_path: Path) -> None:
    with closed_port() as dead:
        res = await homenet("connect", f"hn://127.0.0.1:{dead}/127.0.0.1:1", "--data", "x", env=proc_env(tmp_path))
    assert res.code == 1, res
    _assert_one_line_error(res.stderr)
    assert res.stderr.rstrip().endswith(f"cannot reach node 127.0.0.1:{dead}: connection refused"), res.stderr


async def test_connect_target_closed_port(start_node: StartNode) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    with closed_port() as dead:
        res = await homenet("connect", f"{node.url}/127.0.0.1:{dead}", "--data", "x", env=env_of(node))
    assert res.code == 1, res
    _assert_one_line_error(res.stderr)
    assert "502" in res.stderr


@pytest.mark.parametrize(
    "how",
    ["console-script", "python-m"],
)
async def test_error_names_the_program(how: str, tmp_path: Path) -> None:
    with closed_port() as dead:
        args = ("connect", f"hn://127.0.0.1:{dead}/127.0.0.1:1", "--data", "x")
        if how == "python-m":
            res = await homenet(*args, env=proc_env(tmp_path))
        else:
            res = await run_program(str(Path(sys.executable).with_name("homenet")), *args, env=proc_env(tmp_path))
    assert res.code == 1, res
    _assert_one_line_error(res.stderr)
    assert res.stderr.startswith("homenet: error: "), res.stderr


# -- homenet listen ----------------------------------------------------------------------------
async def _echo_through(port: int, payload: bytes) -> bytes:
    async with connected("127.0.0.1", port) as conn:
        send = asyncio.create_task(conn.send(payload))
        got = await conn.exactly(len(payload))
        await send
        await conn.shutdown_write()
        assert await conn.until_eof() == b""
        return got


@contextlib.asynccontextmanager
async def listening(url: str, tmp: Path, *flags: str) -> AsyncIterator[tuple[NodeProc, str]]:
    """A real `homenet listen URL FLAGS` and the exact LISTENING line it printed; stopped after."""
    proc = await spawn(["listen", url, *flags], tmp, ready=None)
    try:
        line = await proc.next_line("LISTENING ")
        proc.url = line.split()[1]
        yield proc, line
    finally:
        await proc.stop()


async def test_listen_forwards_every_connection(start_node: StartNode, tmp_path: Path) -> None:
    node = await start_node("--allow", "127.0.0.1/32")
    async with echo_server() as echo:
        url = f"{node.url}/{echo.endpoint}"
        async with listening(url, tmp_path) as (lis, line):
            assert re.fullmatch(r"LISTENING tcp://127\.0\.0\.1:[0-9]+ -> " + re.escape(url), line), line
            payloads = [pattern(100_000 + i, seed=100 + i) for i in range(8)]
            got = await asyncio.gather(*(_echo_through(lis.port, p) for p in payloads))
            assert got == payloads
            got2 = await _echo_through(lis.port, b"one more, after the others")
            assert got2 == b"one more, after the others"
            assert echo.connections == len(payloads) + 1
        assert lis.proc.returncode == 0
    await wait_status(node, "all sessions closed", lambda st: st.total_sessions == 9 and st.active_sessions == 0)


async def test_listen_bind_and_port(tmp_path: Path) -> None:
    """The local end is where --bind/--port say; no node is dialed until a client arrives."""
    port = free_port("127.0.0.5")
    with closed_port() as dead:
        url = f"hn://127.0.0.1:{dead}/127.0.0.1:1"
        async with listening(url, tmp_path, "--bind", "127.0.0.5", "--port", str(port)) as (_, line):
            assert line == f"LISTENING tcp://127.0.0.5:{port} -> {url}"


async def test_listen_refused_route_closes_the_local_client(start_node: StartNode, tmp_path: Path) -> None:
    node = await start_node()  # allows no direct target
    async with echo_server() as echo:
        async with listening(f"{node.url}/{echo.endpoint}", tmp_path) as (lis, _):
            for _ in range(2):
                async with connected("127.0.0.1", lis.port) as conn:
                    await conn.send(b"hello?")
                    try:
                        got = await conn.until_eof()
                    except ConnectionResetError:  # closed with our bytes unread: a reset is a close too
                        got = b""
                    assert got == b""
            assert lis.proc.returncode is None, "listen survives a failed route"
        await stays("the refused target was reached", lambda: echo.connections == 0, 0.2)


# -- configuration precedence: flags > HOMENET_* environment > TOML file --------------------------
TARGETS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


async def _allowed(node: NodeProc, targets: list[EchoServer]) -> set[str]:
    """The hosts among ``targets`` this node agrees to dial (checked one by one)."""
    out: set[str] = set()
    for t in targets:
        async with connected(node.host, node.port) as conn:
            await conn.send(request(t.endpoint) + b"probe")
            await conn.shutdown_write()
            stream = await conn.until_eof()
        if stream == OK_REPLY + b"probe":
            out.add(t.host)
        else:
            assert stream.startswith(b"HN/1 403 forbidden "), stream
    return out


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({}, [], "127.0.0.2"),
        ({"HOMENET_ALLOW": "127.0.0.3/32"}, [], "127.0.0.3"),
        ({"HOMENET_ALLOW": "127.0.0.3/32"}, ["--allow", "127.0.0.4/32"], "127.0.0.4"),
    ],
    ids=["file", "env-over-file", "flag-over-env"],
)
async def test_config_precedence(
    start_node: StartNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    flags: list[str],
    expected: str,
) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {port}\nallow = ["127.0.0.2/32"]\nname = "from-file"\n')
    for var in ("HOMENET_ALLOW", "HOMENET_PORT", "HOMENET_NAME", "HOMENET_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    node = await start_node(args=["node", "--bind", "127.0.0.1", "--no-mdns", "--config", str(config), *flags])
    assert node.port == port, "the file's port is used when nothing overrides it"
    echoes = [EchoServer(h) for h in TARGETS]
    try:
        for e in echoes:
            await e.start()
        assert await _allowed(node, echoes) == {expected}
    finally:
        for e in echoes:
            await e.close()


async def test_config_env_and_flag_override_port(
    start_node: StartNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_port, env_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(f"port = {file_port}\n")
    monkeypatch.setenv("HOMENET_PORT", str(env_port))
    by_env = await start_node(args=["node", "--bind", "127.0.0.1", "--no-mdns", "--config", str(config)])
    assert by_env.port == env_port
    by_flag = await start_node(args=node_args("127.0.0.1", "--config", str(config)))  # node_args has --port 0
    assert by_flag.port not in (file_port, env_port)


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--allow", "not-a-cidr"], "--allow"),
        (["--config", "{missing}"], "cannot read config"),
        (["--config", "{bad_key}"], "unknown setting"),
    ],
    ids=["bad-allow", "missing-config", "unknown-key"],
)
async def test_bad_node_configuration_exits_2_in_one_line(tmp_path: Path, args: list[str], text: str) -> None:
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text("colour = 'blue'\n")
    filled = [a.format(missing=tmp_path / "nope.toml", bad_key=bad_key) for a in args]
    res = await homenet(
        "node", "--bind", "127.0.0.1", "--port", "0", "--no-mdns", *filled, timeout=15, env=proc_env(tmp_path)
    )
    assert res.code == 2, res
    _assert_one_line_error(res.stderr)
    assert text in res.stderr
    assert b"READY" not in res.stdout
