"""Run a whole node: the core on the one port, the control server behind it, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from homenet.control.server import ControlServer
from homenet.node.log import fields
from homenet.node.server import Node
from homenet.node.settings import Settings

log = logging.getLogger("homenet.app")


async def run_node(settings: Settings, announce: Callable[[str], None], stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down in order.

    Order: health NOT_SERVING, stop accepting, drain sessions up to the grace period while
    the gRPC server finishes its calls, close what is left.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    control = ControlServer()
    node = Node(settings)
    control.add_node(node)
    node.control_endpoint = await control.start()
    try:
        await node.start()
    except BaseException:
        await control.stop(0)
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announce(f"READY {node.url}")
    try:
        await stop.wait()
        log.info("node.stopping", extra=fields(sessions=len(node.sessions), grace=settings.drain_grace))
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal cuts the drain short
            loop.add_signal_handler(sig, node.abort_sessions)
        await control.not_serving()
        node.stop_accepting()
        await asyncio.gather(node.drain(settings.drain_grace), control.stop(settings.drain_grace))
    finally:
        await node.close()
        await control.stop(0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("node.stopped", extra=fields(sessions=node.totals.sessions))
