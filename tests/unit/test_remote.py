"""A listener's side of the warm pool: grants past the agreed size open nothing."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from homenet.node.address import parse_url
from homenet.node.client import Opened
from homenet.node.remote import RemoteListen


class HeldDialing:
    """Stands in for the route to the relay: counts the connections asked for and holds
    each one open until released (a parked connection waiting for a client)."""

    def __init__(self, expect: int) -> None:
        self.opened = 0
        self.expect = expect
        self.all_opened = asyncio.Event()
        self.release = asyncio.Event()

    async def open(self, route: Any, **kw: Any) -> Opened:
        self.opened += 1
        if self.opened >= self.expect:
            self.all_opened.set()
        await self.release.wait()
        raise OSError("released")


async def _never(sock: socket.socket, desc: str, early: bytes, depth: int) -> None:
    raise AssertionError("nothing should be served")


async def _no_report(ticket: str, reason: str) -> None:
    return None


async def test_grants_past_the_agreed_pool_size_are_ignored() -> None:
    dialing = HeldDialing(expect=3)
    remote = RemoteListen(parse_url("hn://127.0.0.1:1"), _never, _no_report, dialing, pool_size=3)  # type: ignore[arg-type]
    try:
        for i in range(1000):  # a relay that floods its listener with grants
            remote.pool_grant(f"t{i}")
        async with asyncio.timeout(5.0):
            await dialing.all_opened.wait()
        assert (dialing.opened, remote.parking) == (3, 3)
    finally:
        await remote.close()
    assert remote.parking == 0, "cancelled parks give their place back"
