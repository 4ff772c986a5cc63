#!/usr/bin/env python3
"""Regenerate crossgrad/v1/ from proto/crossgrad/v1/*.proto with grpcio-tools.

    python scripts/generate_proto.py            # write into the repository
    python scripts/generate_proto.py --out DIR  # write elsewhere (the freshness test does)

The generated modules are committed. grpcio-tools is pinned in pyproject.toml because its
output embeds its version, and stubs refuse to import with an older grpcio or protobuf.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"


def generate(out: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / "crossgrad" / "v1").glob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out / "crossgrad" / "v1"
    (package / "__init__.py").write_text('"""Generated from proto/crossgrad/v1 by '
                                        'scripts/generate_proto.py. Do not edit."""\n')
    return sorted(package.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
