#!/usr/bin/env python3
"""Write docs/protocol-reference.md from the comments of proto/crossgrad/v1/*.proto.

    python scripts/protocol_reference.py             # rewrite docs/protocol-reference.md
    python scripts/protocol_reference.py --out FILE  # write elsewhere (the freshness test does)

The .proto files are the one place the contract is described; this page is their comments laid
out per service, method, message, field and enum value, so that it cannot drift from them.
protoc parses the files (with --include_source_info, which keeps the comments), so the reference
sees exactly what the stub generator sees. tests/unit/test_generated.py fails when the committed
page differs from a fresh one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2 as pb
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
DEFAULT_OUT = REPO / "docs" / "protocol-reference.md"

# Field numbers of descriptor.proto, which SourceCodeInfo paths are made of.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2

SCALARS = {number: name[len("TYPE_"):].lower()
           for name, number in pb.FieldDescriptorProto.Type.items()}

Comments = dict[tuple[int, ...], str]


def parse(protos: Sequence[Path]) -> pb.FileDescriptorSet:
    """The files as protoc sees them, comments included."""
    include = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", "--include_source_info",
                f"--descriptor_set_out={out}", *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return pb.FileDescriptorSet.FromString(out.read_bytes())


def comments_of(file: pb.FileDescriptorProto) -> Comments:
    """Path -> the comment written above (or else after) that element, as one paragraph each."""
    found: Comments = {}
    for location in file.source_code_info.location:
        text = location.leading_comments or location.trailing_comments
        if location.path == [FILE_SYNTAX]:  # the file's header: above `syntax`, or detached
            text = "\n\n".join([*location.leading_detached_comments, text])
        if text.strip():
            found[tuple(location.path)] = text
    return found


def lines(text: str) -> str:
    """A comment as markdown: its paragraphs as written, and indented runs of lines (the status
    code tables of the file headers) as preformatted blocks, which keep their columns."""
    out: list[str] = []
    block: list[str] = []
    for raw in text.strip("\n").split("\n"):
        line = raw[1:] if raw.startswith(" ") else raw
        if line.startswith("  "):
            block.append(line)
            continue
        if block:
            out += ["", "```text", *block, "```", ""]
            block = []
        out.append(line)
    if block:
        out += ["", "```text", *block, "```"]
    return "\n".join(out).strip().replace("\n\n\n", "\n\n")


def cell(text: str) -> str:
    """A comment inside a table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "-"


def type_name(field: pb.FieldDescriptorProto, maps: dict[str, str]) -> str:
    if field.type_name:
        name = field.type_name.rsplit(".", 1)[-1]
        if field.type_name in maps:
            return maps[field.type_name]
        return f"[{name}](#{name.lower()})"
    return SCALARS[field.type]


def map_entries(package: str, message: pb.DescriptorProto, scope: str) -> dict[str, str]:
    """Full name of every map entry type -> `map<K, V>`, so fields read as they were written."""
    found: dict[str, str] = {}
    for nested in message.nested_type:
        full = f".{package}.{scope}{message.name}.{nested.name}"
        if nested.options.map_entry:
            key, value = nested.field
            found[full] = f"map<{type_name(key, {})}, {type_name(value, {})}>"
        found.update(map_entries(package, nested, f"{scope}{message.name}."))
    return found


def enum_section(enum: pb.EnumDescriptorProto, path: tuple[int, ...], comments: Comments,
                 prefix: str) -> Iterator[str]:
    yield f"### enum {prefix}{enum.name}\n"
    if path in comments:
        yield lines(comments[path]) + "\n"
    yield "| value | number | description |\n|---|---|---|"
    for i, value in enumerate(enum.value):
        note = comments.get((*path, ENUM_VALUE, i), "")
        yield f"| `{value.name}` | {value.number} | {cell(note)} |"
    yield ""


def message_section(message: pb.DescriptorProto, path: tuple[int, ...], comments: Comments,
                    maps: dict[str, str], prefix: str) -> Iterator[str]:
    yield f"### message {prefix}{message.name}\n"
    if path in comments:
        yield lines(comments[path]) + "\n"
    if message.field:
        yield "| field | number | type | description |\n|---|---|---|---|"
        for i, field in enumerate(message.field):
            kind = type_name(field, maps)
            if field.label == pb.FieldDescriptorProto.LABEL_REPEATED and not kind.startswith("map"):
                kind = f"repeated {kind}"
            if field.proto3_optional:  # presence: set or not is part of the message
                kind = f"optional {kind}"
            elif field.HasField("oneof_index"):
                kind += f" (oneof `{message.oneof_decl[field.oneof_index].name}`)"
            note = comments.get((*path, MESSAGE_FIELD, i), "")
            yield f"| `{field.name}` | {field.number} | {kind} | {cell(note)} |"
    else:
        yield "No fields."
    yield ""
    for i, enum in enumerate(message.enum_type):
        yield from enum_section(enum, (*path, MESSAGE_ENUM, i), comments,
                                f"{prefix}{message.name}.")
    for i, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:
            yield from message_section(nested, (*path, MESSAGE_NESTED, i), comments, maps,
                                       f"{prefix}{message.name}.")


def file_section(file: pb.FileDescriptorProto) -> Iterator[str]:
    comments = comments_of(file)
    maps: dict[str, str] = {}
    for message in file.message_type:
        maps.update(map_entries(file.package, message, ""))
    yield f"## {Path(file.name).name}\n"
    if (FILE_SYNTAX,) in comments:
        yield lines(comments[(FILE_SYNTAX,)]) + "\n"
    for s, service in enumerate(file.service):
        path = (FILE_SERVICE, s)
        yield f"### service {service.name}\n"
        if path in comments:
            yield lines(comments[path]) + "\n"
        for m, method in enumerate(service.method):
            request = method.input_type.rsplit(".", 1)[-1]
            response = method.output_type.rsplit(".", 1)[-1]
            stream_in = "stream " if method.client_streaming else ""
            stream_out = "stream " if method.server_streaming else ""
            yield (f"#### rpc {method.name}([{stream_in}{request}](#{request.lower()})) returns "
                   f"([{stream_out}{response}](#{response.lower()}))\n")
            note = comments.get((*path, SERVICE_METHOD, m))
            if note:
                yield lines(note) + "\n"
    for i, enum in enumerate(file.enum_type):
        yield from enum_section(enum, (FILE_ENUM, i), comments, "")
    for i, message in enumerate(file.message_type):
        yield from message_section(message, (FILE_MESSAGE, i), comments, maps, "")


def render(protos: Sequence[Path]) -> str:
    files = parse(protos).file
    ours = sorted((f for f in files if f.name.startswith("crossgrad/")), key=lambda f: f.name)
    head = [
        "# crossgrad.v1 protocol reference",
        "",
        "<!-- Generated by scripts/protocol_reference.py from proto/crossgrad/v1/*.proto. "
        "Do not edit: change the .proto comments and rerun the script. -->",
        "",
        "Every service, method, message, field and enum value of the contract, with the comment "
        "the .proto file gives it. [protocol.md](protocol.md) explains how the pieces are used "
        "(streams, deadlines, status codes, bytes on the wire).",
        "",
        *(f"- [{Path(f.name).name}](#{Path(f.name).name.replace('.', '')})" for f in ours),
        "",
    ]
    body = [line for f in ours for line in file_section(f)]
    return "\n".join(head + body).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    protos = sorted((PROTO_ROOT / "crossgrad" / "v1").glob("*.proto"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(protos))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
