"""``homenet.client.Client`` against a scripted NodeService (pytest-grpc hosts it on 127.0.0.1)
for what a real node does not produce on demand: UNAVAILABLE a few times then OK (the retry
works and is bounded), PERMISSION_DENIED (never retried, its code carried), a call that is
never answered (the deadline fires with one clear line). ``hnctl`` prints the same line.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from homenet.client import Client, Code, ControlError
from homenet.control.errors import CODE_KEY
from homenet.control.v1 import node_pb2, node_pb2_grpc
from tests.integration.support import cli_env, run_cli

#: pytest-grpc runs the servicer on a thread pool: a hung call must not starve the next test.
grpc_max_workers = 4

#: Upper bound of a scripted hang (released at teardown long before).
HANG = 30.0


class ScriptedNode(node_pb2_grpc.NodeServiceServicer):
    """GetStatus does what the script says, one step per call (then answers OK)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.script: list[str] = []
        self.calls = 0
        self.release = threading.Event()

    def reset(self, *steps: str) -> None:
        with self.lock:
            self.script, self.calls = list(steps), 0
        self.release.clear()

    def GetStatus(self, request: node_pb2.GetStatusRequest, context: grpc.ServicerContext) -> node_pb2.NodeStatus:
        with self.lock:
            self.calls += 1
            step = self.script.pop(0) if self.script else "ok"
        if step == "unavailable":  # a bare status, as a proxy or a restarting node sends it
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: not now")
        if step == "offline":  # the node's own word: the listener is reconnecting
            context.set_trailing_metadata(((CODE_KEY, str(int(Code.UNAVAILABLE))),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "listener home1 is offline")
        if step == "denied":
            context.set_trailing_metadata(((CODE_KEY, str(int(Code.FORBIDDEN))),))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "key alice lacks the admin role")
        if step == "hang":
            self.release.wait(HANG)
        return node_pb2.NodeStatus(name="scripted", state="serving")

    def ListSessions(
        self, request: node_pb2.ListSessionsRequest, context: grpc.ServicerContext
    ) -> node_pb2.ListSessionsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    def GetMetrics(self, request: node_pb2.GetMetricsRequest, context: grpc.ServicerContext) -> node_pb2.Metrics:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")


@pytest.fixture(scope="module")
def grpc_addr() -> str:
    """127.0.0.1 only (the plugin's own default binds "localhost" and leaves a socket open)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Callable[[Any, grpc.Server], None]:
    return node_pb2_grpc.add_NodeServiceServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer() -> ScriptedNode:
    return ScriptedNode()


@pytest.fixture
def node(grpc_server: grpc.Server, grpc_servicer: ScriptedNode) -> Iterator[ScriptedNode]:
    grpc_servicer.reset()
    yield grpc_servicer
    grpc_servicer.release.set()  # a hung call ends now, not after HANG


async def test_unavailable_is_retried_until_ok(node: ScriptedNode, grpc_addr: str) -> None:
    node.reset("unavailable", "offline")
    async with Client(grpc_addr, timeout=5.0, retries=2) as client:
        st = await client.status()
    assert st.name == "scripted"
    assert node.calls == 3


async def test_retries_are_bounded(node: ScriptedNode, grpc_addr: str) -> None:
    node.reset(*["offline"] * 10)
    async with Client(grpc_addr, timeout=5.0, retries=2) as client:
        with pytest.raises(ControlError) as info:
            await client.status()
    assert node.calls == 3
    assert (info.value.code, str(info.value)) == (Code.UNAVAILABLE, "listener home1 is offline")
    assert info.value.retryable

    node.reset("unavailable", "unavailable")
    async with Client(grpc_addr, timeout=5.0, retries=0) as client:
        with pytest.raises(ControlError):
            await client.status()
    assert node.calls == 1, "retries=0 is one attempt"


async def test_permission_denied_is_not_retried(node: ScriptedNode, grpc_addr: str, tmp_path: Path) -> None:
    node.reset("denied", "denied")
    async with Client(grpc_addr, timeout=5.0, retries=3) as client:
        with pytest.raises(ControlError) as info:
            await client.status()
    assert node.calls == 1
    err = info.value
    assert err.code == 403
    assert not err.retryable
    assert str(err) == f"node {grpc_addr}: permission_denied: key alice lacks the admin role"
    node.reset("denied")
    res = await run_cli("homenet.cli.hnctl", "--node", grpc_addr, "status", env=_env(tmp_path))
    assert (res.code, res.stderr) == (1, f"hnctl: error: {err}\n")


async def test_a_call_never_answered_hits_the_deadline(node: ScriptedNode, grpc_addr: str, tmp_path: Path) -> None:
    node.reset("hang", "hang")
    async with Client(grpc_addr, timeout=0.5, retries=3) as client:
        with pytest.raises(ControlError) as info:
            await client.status()
    assert node.calls == 1, "a deadline is not retried: the next attempt would wait as long"
    err = info.value
    assert (err.code, str(err)) == (Code.GATEWAY_TIMEOUT, f"node {grpc_addr} did not answer in time")
    node.release.set()
    node.reset("hang")
    res = await run_cli("homenet.cli.hnctl", "--node", grpc_addr, "--timeout", "0.5", "status", env=_env(tmp_path))
    assert (res.code, res.stderr) == (1, f"hnctl: error: {err}\n")


def _env(tmp: Path) -> dict[str, str]:
    """hnctl's environment: no HOMENET_* of the developer's, an empty state directory."""
    return cli_env(HOMENET_STATE_DIR=str(tmp / "state"))
