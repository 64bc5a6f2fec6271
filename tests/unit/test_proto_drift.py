"""The committed generated code is exactly what proto/ generates (``./dev proto`` fixes drift)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gen_proto  # noqa: E402


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    written = gen_proto.generate(tmp_path)
    committed = ROOT / "homenet" / "control" / "v1"
    assert {p.name for p in written} == {p.name for p in committed.iterdir() if p.is_file()}
    drifted = [p.name for p in written if p.read_bytes() != (committed / p.name).read_bytes()]
    assert not drifted, f"generated code drifted from proto/ in {drifted}: run ./dev proto and commit"
