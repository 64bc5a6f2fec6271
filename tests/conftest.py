"""Fixtures shared by the test suite."""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.helpers import NodeProc, node_args, spawn


def pytest_configure(config: pytest.Config) -> None:
    # 1,000-connection tests need more descriptors than the usual soft limit of 1,024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


StartNode = Callable[..., Awaitable[NodeProc]]


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[StartNode]:
    """Start real `homenet node` processes; all are stopped at teardown."""
    procs: list[NodeProc] = []

    async def start(*extra: str, bind: str = "127.0.0.1", args: list[str] | None = None) -> NodeProc:
        p = await spawn(args if args is not None else node_args(bind, *extra), tmp_path)
        procs.append(p)
        return p

    yield start
    for p in procs:
        await p.stop()
