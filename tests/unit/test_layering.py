"""DESIGN.md section 1: the pure packages never reach the transport, even indirectly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = ["peer/algorithms", "peer/compression", "peer/training", "bootstrap/topology.py"]
FORBIDDEN = ("grpc", "google.protobuf", "crossgrad.v1", "crossgrad.rpc", "peer.wire",
             "peer.client", "peer.servicer", "peer.node", "bootstrap.servicer")


def module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def reachable(start: Path) -> dict[str, Path]:
    """Every import reachable from `start` through the project's own modules."""
    seen: dict[str, Path] = {}
    stack = [start]
    visited: set[Path] = set()
    while stack:
        path = stack.pop()
        if path in visited:
            continue
        visited.add(path)
        for name in imports_of(path):
            seen.setdefault(name, path)
            target = module_file(name)
            if target is not None:
                stack.append(target)
    return seen


def pure_files() -> list[Path]:
    files: list[Path] = []
    for entry in PURE:
        path = REPO / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_pure_modules_do_not_reach_the_transport(path: Path) -> None:
    for name, via in reachable(path).items():
        bad = [f for f in FORBIDDEN if name == f or name.startswith(f + ".")]
        assert not bad, f"{path.relative_to(REPO)} reaches {name} (imported in {via})"


def test_the_walk_would_see_a_violation(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import grpc\nfrom peer.training import seeding\n")
    assert "grpc" in reachable(probe)
