"""Regenerate the committed gRPC/protobuf code from proto/ (``./dev proto``).

proto/homenet/v1/*.proto (package homenet.v1, file names ``homenet/v1/*.proto`` as every
consumer of the public API sees them) is generated into homenet/control/v1/; the generated
modules' imports of each other are rewritten from ``homenet.v1`` to ``homenet.control.v1``.
With ``--out DIR`` the code goes to DIR instead (the drift test compares it with the
committed code).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "homenet"


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) with the mypy plugins; returns the files written."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _protoc(Path(tmp))
        gen = out / "homenet" / "control" / "v1"
        gen.mkdir(parents=True, exist_ok=True)
        for old in gen.glob("*_pb2*.py*"):
            old.unlink()
        for src in sorted((Path(tmp) / "homenet" / "v1").iterdir()):
            text = src.read_text()
            text = re.sub(r"^from homenet\.v1 import", "from homenet.control.v1 import", text, flags=re.M)
            (gen / src.name).write_text(text)
    (gen / "__init__.py").write_text('"""Generated from proto/homenet/v1 by tools/gen_proto.py; do not edit."""\n')
    return sorted(gen.iterdir())


def _protoc(out: Path) -> None:
    from grpc_tools import protoc

    bindir = Path(sys.executable).parent
    if shutil.which("protoc-gen-mypy", path=str(bindir)) is None:
        raise SystemExit("protoc-gen-mypy not found: install the dev extras (./dev test does)")
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        "-Iproto",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    finally:
        os.chdir(cwd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args()
    for path in generate(args.out.resolve()):
        print(path.relative_to(args.out.resolve()))


if __name__ == "__main__":
    main()
