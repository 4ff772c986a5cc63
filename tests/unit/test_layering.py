"""Import direction, checked by walking imports (docs/architecture.md, "Packages";
docs/conventions.md, "Packages point one way").

Two kinds of rule:
- the pure packages never reach the transport, even indirectly;
- packages point one way: the shared kernel `crossgrad/` reaches neither `peer/` nor
  `bootstrap/`, and `bootstrap/` never reaches `peer/`. Only the composition roots, which put
  the components together, import across; they are listed here by file, so a new one is a
  decision someone wrote down.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = ["peer/algorithms", "peer/compression", "peer/training", "bootstrap/topology.py"]
FORBIDDEN = ("grpc", "google.protobuf", "crossgrad.v1", "crossgrad.rpc", "peer.wire",
             "peer.client", "peer.servicer", "peer.node", "bootstrap.servicer")

# package -> the packages none of its modules may reach, directly or through others.
# peer/ may import bootstrap/ (a peer is the bootstrap's client: its assignment types).
ONE_WAY = {
    "crossgrad": ("peer", "bootstrap"),
    "bootstrap": ("peer",),
}
# The modules that compose the components and so may import across: the CLI (and its
# `python -m crossgrad` entry), the demo, the builder (the registries' names, every node's
# parts), a deployed peer, the simulator and its batched engine. The rules above do not walk
# from these.
COMPOSITION_ROOTS = {"crossgrad/cli.py", "crossgrad/__main__.py", "crossgrad/demo.py",
                     "peer/builder.py", "peer/service.py", "peer/simulate.py",
                     "peer/batched.py"}


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


def violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    """'name (imported in file)' for each module reachable from `path` under a forbidden one."""
    def where(via: Path) -> Path:
        return via.relative_to(REPO) if via.is_relative_to(REPO) else via

    return sorted(f"{name} (imported in {where(via)})" for name, via in reachable(path).items()
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def files_of(entries: list[str]) -> list[Path]:
    files: list[Path] = []
    for entry in entries:
        path = REPO / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", files_of(PURE), ids=relative)
def test_pure_modules_do_not_reach_the_transport(path: Path) -> None:
    assert violations(path, FORBIDDEN) == [], relative(path)


ONE_WAY_CASES = [(package, path) for package in ONE_WAY for path in files_of([package])
                 if relative(path) not in COMPOSITION_ROOTS]


@pytest.mark.parametrize(("package", "path"), ONE_WAY_CASES,
                         ids=[relative(path) for _, path in ONE_WAY_CASES])
def test_packages_point_one_way(package: str, path: Path) -> None:
    assert violations(path, ONE_WAY[package]) == [], (
        f"{relative(path)} reaches {' or '.join(ONE_WAY[package])}; only a composition root "
        f"({', '.join(sorted(COMPOSITION_ROOTS))}) may import across")


def test_each_rule_walks_modules_and_each_root_exists() -> None:
    """The table names real files, and every rule has modules to check (a renamed package
    would otherwise pass by checking nothing)."""
    assert all((REPO / root).is_file() for root in COMPOSITION_ROOTS)
    for package in ONE_WAY:
        assert any(p == package for p, _ in ONE_WAY_CASES), package


def test_the_walk_would_see_a_violation(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import grpc\nfrom crossgrad import seeding\n")
    assert "grpc" in reachable(probe)
    assert violations(probe, FORBIDDEN) == [f"grpc (imported in {probe})"]

    # A kernel module importing a composition root reaches peer/ and bootstrap/ through it.
    probe.write_text("from crossgrad.config import RunConfig\nfrom crossgrad import cli\n")
    found = violations(probe, ONE_WAY["crossgrad"])
    assert any(v.startswith("peer.builder ") for v in found), found
    assert any(v.startswith("bootstrap.") for v in found), found
    # ... and a bootstrap module importing a peer module, even one two steps away.
    probe.write_text("from bootstrap.registry import Registry\nimport peer.training.models\n")
    assert violations(probe, ONE_WAY["bootstrap"])[0].startswith("peer.training.models ")
