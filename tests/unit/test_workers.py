"""Worker processes: settings, the supervisor's spec, the status merge, and the handoff of a
connection by file descriptor (real Unix sockets in a temporary directory)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from homenet.control.siblings import merge_status
from homenet.control.v1 import node_pb2
from homenet.control.workers import WorkerSpec, worker_settings
from homenet.node.address import Endpoint
from homenet.node.handoff import Handoff, HandoffError, decode, encode
from homenet.node.settings import Settings, SettingsError


def test_one_worker_by_default_and_0_is_one_per_core_except_for_homes_and_fleet_relays() -> None:
    assert Settings(workers=3).worker_count == 3
    assert Settings().worker_count == 1
    assert Settings(workers=0).worker_count >= 1
    assert Settings(workers=0, rl=("hn://relay.example:6969",)).worker_count == 1
    assert Settings(workers=0, peers=("10.0.0.2:6969",), fleet_key_file="k").worker_count == 1


@pytest.mark.parametrize("bad", [{"workers": -1}, {"workers": 65}, {"worker_accept": "fork"}])
def test_bad_worker_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        Settings(**bad)  # type: ignore[arg-type]


def test_workers_cannot_join_a_fleet() -> None:
    with pytest.raises(SettingsError, match="one relay process per pod"):
        Settings(workers=2, peers=("10.0.0.2:6969",), fleet_key_file="k")


def _spec(index: int) -> WorkerSpec:
    return WorkerSpec(
        index=index,
        siblings=("127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"),
        handoffs=("/d/w0.sock", "/d/w1.sock", "/d/w2.sock"),
        fleet_key_file="/d/fleet.key",
        replay_file="/d/replay.table",
        private_fd=5,
        public_fd=-1,
        bind="0.0.0.0",
        port=6969,
        supervisor=1,
    )


def test_a_spec_round_trips_and_names_the_siblings() -> None:
    spec = _spec(1)
    assert WorkerSpec.loads(spec.dumps()) == spec
    assert spec.private == Endpoint("127.0.0.1", 4002)
    assert spec.sibling_handoffs() == {
        Endpoint("127.0.0.1", 4001): "/d/w0.sock",
        Endpoint("127.0.0.1", 4003): "/d/w2.sock",
    }


def test_only_worker_0_keeps_the_once_per_node_roles() -> None:
    base = Settings(rl=("hn://relay.example:6969",), health_port=8080, workers=3)
    first, second = worker_settings(base, _spec(0)), worker_settings(base, _spec(1))
    assert first.rl == base.rl
    assert first.health_port == 8080
    assert second.rl == ()
    assert second.health_port == 0
    assert second.peers == ("127.0.0.1:4001", "127.0.0.1:4003")
    assert second.fleet_key_file == "/d/fleet.key"
    assert second.workers == 1


def test_the_status_of_a_node_sums_its_workers() -> None:
    own = node_pb2.NodeStatus(active_sessions=2, total_sessions=5, bytes_up=10, listeners=1, uptime_seconds=3.0)
    other = node_pb2.NodeStatus(active_sessions=1, total_sessions=7, bytes_up=5, listeners=2, uptime_seconds=9.0)
    merged = merge_status(own, [other], workers=3)
    assert (merged.active_sessions, merged.total_sessions, merged.bytes_up, merged.listeners) == (3, 12, 15, 3)
    assert (merged.workers, merged.workers_up, merged.uptime_seconds) == (3, 2, 9.0)


def test_a_message_round_trips_and_bad_ones_are_refused() -> None:
    assert decode(encode("1.2.3.4:5", b"HN/1 CONNECT x\n", 3)) == ("1.2.3.4:5", b"HN/1 CONNECT x\n", 3)
    with pytest.raises(ValueError, match="short"):
        decode(b"\x00")
    with pytest.raises(ValueError, match="truncated"):
        decode(b"\x00\x00\x00\x09abc")
    with pytest.raises(HandoffError):
        encode("p", b"x" * (300 * 1024), 0)


async def test_a_connection_is_handed_over_with_what_was_read(tmp_path: Path) -> None:
    got: asyncio.Queue[tuple[socket.socket, str, bytes, int]] = asyncio.Queue()
    target = Endpoint("127.0.0.1", 4002)
    receiver = Handoff(str(tmp_path / "w1.sock"), {}, lambda *a: got.put_nowait(a))
    sender = Handoff(str(tmp_path / "w0.sock"), {target: str(tmp_path / "w1.sock")}, lambda *a: None)
    receiver.start()
    sender.start()
    ours, theirs = socket.socketpair()
    try:
        assert sender.serves(target)
        assert not sender.serves(Endpoint("127.0.0.1", 1))
        await sender.send(target, ours, "10.1.2.3:4444", b"HN/1 CONNECT home1\n", 1)
        assert ours.fileno() == -1, "the sender's copy is closed"
        sock, peer, data, depth = await asyncio.wait_for(got.get(), 5.0)
        with sock:
            assert (peer, data, depth) == ("10.1.2.3:4444", b"HN/1 CONNECT home1\n", 1)
            assert sock.gettimeout() == 0.0
            theirs.sendall(b"ping")  # the very connection: bytes flow to the receiver's socket
            assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4), 5.0) == b"ping"
        assert (sender.handed, receiver.received) == (1, 1)
    finally:
        theirs.close()
        sender.close()
        receiver.close()


async def test_a_sibling_that_is_gone_is_a_handoff_error(tmp_path: Path) -> None:
    target = Endpoint("127.0.0.1", 4002)
    sender = Handoff(str(tmp_path / "w0.sock"), {target: str(tmp_path / "gone.sock")}, lambda *a: None)
    ours, theirs = socket.socketpair()
    try:
        with pytest.raises(HandoffError, match="cannot take"):
            await sender.send(target, ours, "p", b"x", 0)
        assert ours.fileno() != -1, "the connection stays ours to refuse"
    finally:
        ours.close()
        theirs.close()
        sender.close()
