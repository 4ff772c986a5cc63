"""The committed stubs in crossgrad/v1/ and docs/protocol-reference.md are exactly what the
protos generate, and the protos follow the contract's rules (docs/architecture.md, "The
contract").

Stubs are committed so that a checkout imports with no build step; these tests are what keep
them honest. When one fails: `python scripts/generate_proto.py` (or
`python scripts/protocol_reference.py`) and commit the result.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from google.protobuf.descriptor import Descriptor, EnumDescriptor

from procs import REPO, ProcessGroup

COMMITTED = REPO / "crossgrad" / "v1"
SCRIPT = REPO / "scripts" / "generate_proto.py"
REFERENCE_SCRIPT = REPO / "scripts" / "protocol_reference.py"
REFERENCE = REPO / "docs" / "protocol-reference.md"
MAX_DIFF_LINES = 40


def generated_files(package: Path) -> dict[str, str]:
    """Name -> text of every generated file (caches and compiled files are not generated)."""
    return {p.name: p.read_text() for p in sorted(package.iterdir())
            if p.is_file() and p.suffix in (".py", ".pyi")}


def test_committed_stubs_match_a_fresh_generation(procs: ProcessGroup, tmp_path: Path) -> None:
    result = procs.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], timeout=60)
    assert result.returncode == 0, f"generate_proto.py failed:\n{result.stderr}"
    fresh = generated_files(tmp_path / "crossgrad" / "v1")
    committed = generated_files(COMMITTED)

    problems = [f"{name}: generated but not committed" for name in sorted(fresh.keys() - committed)]
    problems += [f"{name}: committed but no longer generated"
                 for name in sorted(committed.keys() - fresh)]
    for name in sorted(fresh.keys() & committed.keys()):
        if fresh[name] != committed[name]:
            diff = list(difflib.unified_diff(
                committed[name].splitlines(), fresh[name].splitlines(),
                f"committed/crossgrad/v1/{name}", f"generated/crossgrad/v1/{name}", lineterm=""))
            more = len(diff) - MAX_DIFF_LINES
            tail = [f"... {more} more diff lines"] if more > 0 else []
            problems.append("\n".join([f"{name} differs:", *diff[:MAX_DIFF_LINES], *tail]))
    assert not problems, ("crossgrad/v1 is stale; run `python scripts/generate_proto.py` and "
                          "commit the result:\n\n" + "\n\n".join(problems))


def pb2_modules() -> list[ModuleType]:
    return [importlib.import_module(f"crossgrad.v1.{p.stem}")
            for p in sorted(COMMITTED.glob("*_pb2.py"))]


def all_enums(messages: Iterator[Descriptor] | list[Descriptor]) -> Iterator[EnumDescriptor]:
    for message in messages:
        yield from message.enum_types
        yield from all_enums(message.nested_types)


def test_every_enum_has_an_unspecified_zero_value() -> None:
    modules = pb2_modules()
    assert modules, "no generated *_pb2 modules found in crossgrad/v1"
    enums: list[EnumDescriptor] = []
    for module in modules:
        enums += module.DESCRIPTOR.enum_types_by_name.values()
        enums += all_enums(list(module.DESCRIPTOR.message_types_by_name.values()))
    assert enums, "expected at least the DType and Codec enums"
    zero = {e.full_name: e.values_by_number[0].name if 0 in e.values_by_number else "missing"
            for e in enums}
    bad = [f"{name}: zero value is {value}" for name, value in zero.items()
           if not value.endswith("_UNSPECIFIED")]
    assert not bad, "every enum needs an unused zero value named *_UNSPECIFIED:\n" + "\n".join(bad)


def test_protocol_reference_matches_a_fresh_generation(procs: ProcessGroup,
                                                        tmp_path: Path) -> None:
    fresh_path = tmp_path / "protocol-reference.md"
    result = procs.run([sys.executable, str(REFERENCE_SCRIPT), "--out", str(fresh_path)],
                       timeout=60)
    assert result.returncode == 0, f"protocol_reference.py failed:\n{result.stderr}"
    fresh, committed = fresh_path.read_text(), REFERENCE.read_text()
    diff = list(difflib.unified_diff(committed.splitlines(), fresh.splitlines(),
                                     "committed", "generated", lineterm=""))
    assert not diff, ("docs/protocol-reference.md is stale; run `python "
                      "scripts/protocol_reference.py` and commit the result:\n"
                      + "\n".join(diff[:MAX_DIFF_LINES]))


def test_protocol_reference_names_every_service_method_message_and_field() -> None:
    text = REFERENCE.read_text()
    missing: list[str] = []
    for module in pb2_modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            missing += [] if f"### service {service.name}\n" in text else [service.full_name]
            missing += [m.full_name for m in service.methods
                        if f"#### rpc {m.name}(" not in text]
        messages = list(module.DESCRIPTOR.message_types_by_name.values())
        for message in messages:
            missing += [] if f"### message {message.name}\n" in text else [message.full_name]
            missing += [f.full_name for f in message.fields if f"| `{f.name}` | {f.number} |"
                        not in text]
    assert not missing, "not in docs/protocol-reference.md: " + ", ".join(missing)
    # a comment of the .proto reaches the page (one of each kind: method, field, enum value)
    assert "Register a peer." in text
    assert "Mixing weight pi_il of this neighbor." in text
    assert "| `CODEC_UNSPECIFIED` | 0 |" in text
