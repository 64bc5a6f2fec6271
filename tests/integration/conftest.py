"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import StartNode
from tests.integration.rl_support import stopped_in_reverse


@pytest.fixture
async def nodes(start_node: StartNode, tmp_path: Path) -> AsyncIterator[StartNode]:
    """Like ``start_node``; home nodes are stopped before their relays, all share one keys file."""
    async with stopped_in_reverse(start_node, tmp_path) as start:
        yield start
