"""Large models over a link: time and peak memory of one GetModel between two processes.

    python bench/large_model.py                        # 500 MB and 2 GB
    python bench/large_model.py --sizes 100MB,1GB --json

For each size, two fresh processes on loopback, both with default settings (message limit,
chunk size, crossgrad.rpc.DEFAULT_MAX_MODEL_BYTES):

  sender    a real Node holding a synthetic float32 model of that size (4 nn.Linear layers of
            width w, w chosen to fit), its round-0 model published, served by a real
            PeerRuntime (PeerServicer.GetModel, peer/wire.encode_raw);
  receiver  a real Node with a model of the same shapes (other values) fetching the sender's
            with GrpcNeighborhood.fetch_model, as a peer does in a round.

Each process reports its peak resident memory (VmHWM in /proc/self/status, the high-water
mark of the whole process life) and its resident memory once its model was built (before any
transfer); the receiver times the fetch (request to the last tensor validated and on its
device). "equal" compares the CRC-32C of every tensor the sender holds with that of every tensor
the receiver got, computed on each side from the tensors themselves (not from the stream).

What each side needs to hold, at least: the sender its parameters and the published snapshot
(2x the model); the receiver its own parameters and the received model (2x). "x model" is
(peak - the process's RSS before its model was built) / model size; "peak - model" is the peak
less one model. Both build the Node as peer/builder.make_node does, then let the Trainer's
template module share the Node's parameters (`share_template`): Node clones the parameters it
is given, and the Trainer only needs the module's structure (torch.func.functional_call swaps
in the parameters of each call), so the template's own copy would be one more model's worth of
memory on each side. --keep-template measures with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peer import algorithms  # noqa: E402
from peer.client import GrpcNeighborhood  # noqa: E402
from peer.node import Node  # noqa: E402
from peer.rounds import Assignment  # noqa: E402
from peer.service import PeerOptions, PeerRuntime  # noqa: E402
from peer.training.allocator import keep_freed_memory  # noqa: E402
from peer.training.trainer import Schedule, Trainer  # noqa: E402
from peer.wire import checksums  # noqa: E402

SENDER, RECEIVER, ROUND = 0, 1, 0
LAYERS = 4
FETCH_TIMEOUT_S = 600.0
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20,
         "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2 * 2**30, '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or (unit and unit not in UNITS):
        raise argparse.ArgumentTypeError(f"a size such as 500MB, 2GB or 1GiB; got {text!r}")
    return int(float(match.group(1)) * UNITS.get(unit or "B", 1))


def size_list(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


# ---- the model and the node --------------------------------------------------------------------
def width_for(total_bytes: int) -> int:
    """w such that LAYERS float32 nn.Linear(w, w) layers (weights and biases) take at most
    total_bytes: LAYERS * (w^2 + w) * 4 <= total_bytes."""
    return max(1, int((-1 + math.sqrt(1 + total_bytes / LAYERS)) / 2))


class Synthetic(nn.Module):
    """LAYERS square linear layers: a few big parameter tensors, like the large layers of a real
    model; forward is a real (if pointless) network, so the Trainer can take gradients."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, w) -> (b, w)
        return self.layers(x)


def share_template(trainer: Trainer, node: Node) -> None:
    """Let the template module's parameters share the node's tensors (see the module doc)."""
    with torch.no_grad():
        for template, own in zip(trainer.model.parameters(), node.params, strict=True):
            template.data = own


def build_node(node_id: int, total_bytes: int, seed: int, keep_template: bool,
               neighbors: Sequence[int] = ()) -> Node:
    """A Node holding a Synthetic model of about total_bytes; its neighbors are `neighbors`
    (default: the other of SENDER and RECEIVER), with equal mixing weights."""
    torch.manual_seed(seed)
    width = width_for(total_bytes)
    model = Synthetic(width)
    x, y = torch.zeros(2, width), torch.zeros(2, dtype=torch.long)  # (2, w), (2,)
    trainer = Trainer(node_id, model, x, y, Schedule(batch_size=2), seed, torch.device("cpu"))
    peers = tuple(neighbors) or (RECEIVER if node_id == SENDER else SENDER,)
    share = 1.0 / (len(peers) + 1)
    assignment = Assignment(neighbors=peers, weights={j: share for j in (node_id, *peers)})
    node = Node(node_id, trainer, algorithms.make("dpsgd", algorithms.Hyperparameters()),
                assignment, [p.detach() for p in model.parameters()])
    del model
    if not keep_template:
        share_template(trainer, node)
    return node


def status_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def model_bytes(node: Node) -> int:
    return sum(p.numel() * p.element_size() for p in node.params)


# ---- the two processes -------------------------------------------------------------------------
def report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def run_sender(args: argparse.Namespace) -> int:
    base = status_kib("VmRSS")  # the interpreter, torch and grpc, before any model
    runtime = PeerRuntime(PeerOptions(node_id=SENDER, bootstrap="unused:1", bind="127.0.0.1:0",
                                      timeout=FETCH_TIMEOUT_S))  # mallopt as a peer does
    node = build_node(SENDER, args.bytes, seed=1, keep_template=args.keep_template)
    node.publish()  # round ROUND's snapshot is what GetModel serves
    server = runtime.serve()
    runtime.attach(node, {}, epoch=1)  # it only serves: no neighbor is ever asked
    report(address=server.address, model_bytes=model_bytes(node), base_rss=base,
           built_rss=status_kib("VmRSS"),
           crcs=checksums(node.params))
    sys.stdin.read()  # the main process closes our stdin once the receiver is done
    server.stop(grace=0)
    report(peak_rss=status_kib("VmHWM"))
    return 0


def run_receiver(args: argparse.Namespace) -> int:
    keep_freed_memory()  # as a PeerRuntime does
    base = status_kib("VmRSS")
    node = build_node(RECEIVER, args.bytes, seed=2, keep_template=args.keep_template)
    built = status_kib("VmRSS")
    hood = GrpcNeighborhood(node, {SENDER: args.address}, timeout=FETCH_TIMEOUT_S)
    started = time.perf_counter()
    params = hood.fetch_model(SENDER, ROUND)
    seconds = time.perf_counter() - started
    report(seconds=seconds, base_rss=base, built_rss=built, peak_rss=status_kib("VmHWM"),
           crcs=checksums(params), device=str(params[0].device))
    hood.close()
    return 0


def measure(total_bytes: int, keep_template: bool) -> dict[str, Any]:
    """One size: a sender and a receiver process, in this process group (a caller that kills
    the group kills them too)."""
    child = [sys.executable, str(Path(__file__).resolve()), "--bytes", str(total_bytes)]
    if keep_template:
        child.append("--keep-template")
    sender = subprocess.Popen([*child, "--role", "sender"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert sender.stdout is not None and sender.stdin is not None
        line = sender.stdout.readline()
        if not line:
            raise SystemExit("the sender exited before serving (its error is above)")
        sent = json.loads(line)
        received = subprocess.run([*child, "--role", "receiver", "--address", sent["address"]],
                                  capture_output=True, text=True, check=False)
        if received.returncode != 0:
            raise SystemExit(f"the receiver failed:\n{received.stderr}")
        got = json.loads(received.stdout.splitlines()[-1])
        sender.stdin.close()
        sender_peak = json.loads(sender.stdout.readline())["peak_rss"]
        sender.wait(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    size = sent["model_bytes"]
    return {"model_bytes": size, "seconds": got["seconds"], "gb_per_s": size / got["seconds"] / 1e9,
            "sender_base_rss": sent["base_rss"], "sender_built_rss": sent["built_rss"],
            "sender_peak_rss": sender_peak, "receiver_base_rss": got["base_rss"],
            "receiver_built_rss": got["built_rss"], "receiver_peak_rss": got["peak_rss"],
            "equal": got["crcs"] == sent["crcs"], "device": got["device"]}


# ---- the report --------------------------------------------------------------------------------
def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


COLUMNS = ("model GB", "seconds", "GB/s", "sender peak GB", "peak - model", "x model",
           "receiver peak GB", "peak - model", "x model", "fetch adds GB", "equal")


def row(r: dict[str, Any]) -> list[str]:
    """RSS in GB; "x model": (peak - the process's RSS before its model was built) / model."""
    size = r["model_bytes"]
    return [gb(size), f"{r['seconds']:.2f}", f"{r['gb_per_s']:.2f}",
            gb(r["sender_peak_rss"]), gb(r["sender_peak_rss"] - size),
            f"{(r['sender_peak_rss'] - r['sender_base_rss']) / size:.2f}",
            gb(r["receiver_peak_rss"]), gb(r["receiver_peak_rss"] - size),
            f"{(r['receiver_peak_rss'] - r['receiver_base_rss']) / size:.2f}",
            gb(r["receiver_peak_rss"] - r["receiver_built_rss"]),
            "yes" if r["equal"] else "NO"]


def markdown_table(columns: Sequence[str], rows: list[list[str]]) -> str:
    """A right-aligned Markdown table (what the benches print and docs/benchmarks.md keeps)."""
    widths = [max(len(x[i]) for x in [list(columns), *rows]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(list(columns)), rule, *map(line, rows)])


def table(rows: list[list[str]]) -> str:
    return markdown_table(COLUMNS, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=size_list, default=size_list("500MB,2GB"),
                        help="model sizes, comma-separated (500MB, 2GB, 1GiB, ...)")
    parser.add_argument("--keep-template", action="store_true",
                        help="keep the Trainer's own copy of the parameters (see above)")
    parser.add_argument("--json", action="store_true", help="one JSON line per size as well")
    parser.add_argument("--role", choices=("sender", "receiver"), help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sender":
        return run_sender(args)
    if args.role == "receiver":
        return run_receiver(args)

    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {status_kib_total() / 2**30:.0f} GiB RAM, "
          f"Python {platform.python_version()}")
    print(f"# torch {torch.__version__}, grpcio {grpc.__version__}")
    print(f"# command: python {shlex.join(['bench/large_model.py', *sys.argv[1:]])}")
    print(f"# float32, {LAYERS} nn.Linear layers; default settings; one fetch per size, "
          f"fresh processes; template {'kept' if args.keep_template else 'shared'}")
    results = []
    for size in args.sizes:
        result = measure(size, args.keep_template)
        results.append(result)
        if args.json:
            print(json.dumps(result), flush=True)
    print(f"# RSS before any model: sender {gb(results[0]['sender_base_rss'])} GB, receiver "
          f"{gb(results[0]['receiver_base_rss'])} GB; \"x model\" = (peak - that) / model; "
          "\"fetch adds\" = receiver peak - its RSS before the fetch")
    print()
    print(table([row(r) for r in results]))
    return 0 if all(r["equal"] for r in results) else 1


def status_kib_total() -> int:
    """MemTotal of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
