"""Faults on a real run: every scenario of docs/reliability.md, one driver, one table.

    sudo .venv/bin/python bench/faults.py --scenario link-down
    sudo .venv/bin/python bench/faults.py --scenario straggler --rate 1mbit
    sudo .venv/bin/python bench/faults.py --scenario all --out runs/faults

A bootstrap and --nodes peers (default 5: digits, ring, cga, the seed 123), each a `crossgrad`
CLI process (crossgrad.cluster.LocalCluster), train --rounds rounds with --timeout as every
neighbor call's deadline and --lease-seconds as the bootstrap's lease. One fault is injected
into peer --victim (default 2) once it has recorded round --at (default a quarter of the
rounds):

    none                no fault: the networked baseline for the other rows
    kill9-resume        SIGKILL the peer; once the bootstrap has expired it and its neighbors
                        are --away rounds further, restart it with --resume (its checkpoint:
                        --checkpoint-every rounds)
    bootstrap-restart   SIGKILL the bootstrap; --down seconds later start it again on the same
                        port with the same state file
    sigterm-resume      SIGTERM the peer (it drains after the current round and exits); --away
                        rounds later restart it with --resume
    link-down           (namespaces) take the peer's link down for --down seconds (default 10),
                        then back up: `ip link set portK down` at the switch, a silent link
    straggler           (namespaces) rate-limit the peer's link to --rate (tbf on both ends) for
                        --slow seconds (default 30), then lift the limit

Loopback scenarios run on 127.0.0.1; namespace scenarios put every process in its own network
namespace on a private bridge (tests/faults/netns.py: root and iproute2 needed, everything is
removed at the end, also on an error or Ctrl-C).

Columns, per scenario (the "live" nodes are all but the victim; for bootstrap-restart all):

  rounds           the last round every peer reached (summary.json), of --rounds
  s/round          a round record's `seconds` (publishing excluded; fetching the neighbors'
                   models and cross-gradients, computing, stepping included) of the live nodes,
                   median / p90 / max over their rounds before the fault (round 0, connection
                   set-up, left out), during it (from the round each node was in when the fault
                   began to the one it was in when it ended), and after it
  gap              the longest wall-clock time between two consecutive rounds of a live node
                   appearing in its metrics.jsonl, from the fault on (crossgrad.cluster
                   .RoundWatch, 50 ms polls): what a round record leaves out (evaluation,
                   checkpoint, catch-up, a new assignment) is in it; a stuck node shows here
  acc              the mean over peers of the final test accuracy, and minus that of the
                   unfaulted run (the in-process simulator with the same settings: a networked
                   run with no fault ends bit-identical to it)
  missed           neighbor answers left out of a round, summed over peers (summary.json)
  exit             exit codes: every process of the victim in order, then the others

Below the table, per scenario, the victim's own view (alone / catch-up / resume events) and the
per-node figures. The machine may be shared: absolute seconds are noisy; compare the phases of
one row, and rows of one invocation.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "faults")]

from netns import Namespaces, unavailable  # noqa: E402

from crossgrad.cluster import LocalCluster, RoundWatch  # noqa: E402
from crossgrad.config import RunConfig  # noqa: E402

SCENARIOS = ("none", "kill9-resume", "bootstrap-restart", "sigterm-resume", "link-down",
             "straggler")
NAMESPACED = ("link-down", "straggler")
PROXY_VARS = ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy", "no_proxy")


# ---- what a run left behind ----------------------------------------------------------------
def records(out: Path, node: int) -> list[dict[str, Any]]:
    path = out / f"node-{node}" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_seconds(out: Path, node: int) -> dict[int, float]:
    """Round -> its record's seconds (a round recorded twice, after a resume: the last)."""
    return {int(r["round"]): float(r["seconds"]) for r in records(out, node)
            if r["kind"] == "round"}


def events(out: Path, node: int) -> list[dict[str, Any]]:
    return [r for r in records(out, node) if r["kind"] == "event"]


def summary(out: Path, node: int) -> dict[str, Any] | None:
    path = out / f"node-{node}" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def stats(values: list[float]) -> str:
    """median / p90 / max, or "-" with nothing to summarize."""
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return f"{statistics.median(ordered):.2f} / {p90:.2f} / {ordered[-1]:.2f}"


def non_finite(out: Path, node: int) -> list[str]:
    """What is NaN/Inf in a node's records and final model (empty when all is finite)."""
    import torch

    found = [f"round {r['round']} loss" for r in records(out, node)
             if r["kind"] == "round" and not math.isfinite(float(r["loss"]))]
    model = out / f"node-{node}" / "model.pt"
    if model.exists():
        params = torch.load(model, weights_only=True)
        found += [f"model tensor {k}" for k, p in enumerate(params)
                  if not bool(torch.isfinite(p).all())]
    return found


# ---- one scenario --------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a scenario did, and where each node was when the fault began and ended."""

    scenario: str
    action: str = ""
    live: list[int] = field(default_factory=list)
    began: dict[int, int] = field(default_factory=dict)  # node -> round it was in
    ended: dict[int, int] = field(default_factory=dict)
    began_at: float = math.inf  # time.monotonic()
    ended_at: float = math.inf
    codes: dict[int, list[int]] = field(default_factory=dict)  # node -> exit codes, in order
    watch: dict[int, dict[int, float]] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Setup:
    config: RunConfig
    victim: int
    at: int
    timeout: float
    lease: float
    checkpoint_every: int
    down: float
    slow: float
    rate: str
    away: int
    run_timeout: float


def peer_args(setup: Setup) -> list[str]:
    return ["--timeout", str(setup.timeout), "--checkpoint-every", str(setup.checkpoint_every)]


def mark(cluster: LocalCluster, nodes: range) -> dict[int, int]:
    return {i: cluster.recorded_round(i) for i in nodes}


@contextmanager
def cluster_for(scenario: str, setup: Setup, out: Path) -> Iterator[tuple[LocalCluster,
                                                                          Namespaces | None]]:
    """A started cluster (bootstrap and peers), in namespaces for the link scenarios."""
    net = Namespaces(setup.config.nodes).create() if scenario in NAMESPACED else None
    try:
        kwargs: dict[str, Any] = {}
        if net is not None:
            kwargs = {"hosts": net.host, "prefix": net.prefix, "bootstrap_host": net.boot_host,
                      "bootstrap_prefix": net.boot_prefix}
        with LocalCluster(setup.config, out, peer_args=peer_args(setup), **kwargs) as cluster:
            cluster.start_bootstrap(lease_seconds=setup.lease)
            cluster.start_peers()
            yield cluster, net
    finally:
        if net is not None:
            net.remove()


def run_scenario(scenario: str, setup: Setup, out: Path) -> Outcome:
    nodes = range(setup.config.nodes)
    victim = setup.victim
    outcome = Outcome(scenario, live=[i for i in nodes if i != victim or
                                      scenario in ("none", "bootstrap-restart")])
    with cluster_for(scenario, setup, out) as (cluster, net):
        watch = RoundWatch(out, list(nodes))
        first: dict[int, int] = {}  # exit codes of processes that were replaced
        try:
            cluster.wait_recorded(victim, setup.at, timeout=setup.run_timeout)
            outcome.began, outcome.began_at = mark(cluster, nodes), time.monotonic()
            if scenario == "none":
                outcome.action = "nothing"
            elif scenario == "link-down":
                assert net is not None
                net.cut(victim)
                threading.Event().wait(setup.down)  # the fault itself lasts this long
                net.restore(victim)
                outcome.action = f"peer {victim}'s link down {setup.down:.0f} s at round " \
                                 f"{outcome.began[victim]}"
            elif scenario == "straggler":
                assert net is not None
                net.rate_limit(victim, setup.rate)
                threading.Event().wait(setup.slow)
                net.unlimit(victim)
                outcome.action = f"peer {victim}'s link at {setup.rate} for {setup.slow:.0f} s " \
                                 f"from round {outcome.began[victim]}"
            elif scenario == "bootstrap-restart":
                cluster.signal("bootstrap", signal.SIGKILL)
                assert cluster.bootstrap is not None
                cluster.bootstrap.wait()
                threading.Event().wait(setup.down)
                cluster.start_bootstrap(lease_seconds=setup.lease)
                outcome.action = f"bootstrap SIGKILLed, back after {setup.down:.0f} s (same " \
                                 "port and state)"
            else:  # kill9-resume, sigterm-resume
                sig = signal.SIGKILL if scenario == "kill9-resume" else signal.SIGTERM
                cluster.signal(victim, sig)
                first[victim] = cluster.peers[victim].wait(timeout=60)
                neighbor = (victim + 1) % setup.config.nodes
                cluster.wait_recorded(neighbor, outcome.began[neighbor] + setup.away,
                                      timeout=setup.run_timeout)
                cluster.start_peer(victim, resume=True)
                outcome.action = f"peer {victim} {signal.Signals(sig).name} at round " \
                                 f"{outcome.began[victim]}, back with --resume " \
                                 f"{setup.away} rounds later"
            outcome.ended, outcome.ended_at = mark(cluster, nodes), time.monotonic()
            codes = cluster.wait_peers(timeout=setup.run_timeout)
        except (RuntimeError, TimeoutError, OSError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            codes = {i: p.poll() for i, p in cluster.peers.items()}  # type: ignore[misc]
        finally:
            watch.stop()
        outcome.watch = {i: watch.times(i) for i in nodes}
        outcome.codes = {i: [*([first[i]] if i in first else []), codes[i]] for i in nodes}
    return outcome


# ---- the report ----------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    action: str
    rounds: str
    before: str
    during: str
    after: str
    gap: str
    acc: str
    missed: str
    exit: str
    details: list[str]


def phases(outcome: Outcome, out: Path, nodes: list[int]) -> tuple[list[float], list[float],
                                                                    list[float]]:
    before: list[float] = []
    during: list[float] = []
    after: list[float] = []
    for i in nodes:
        lo, hi = outcome.began.get(i, math.inf), outcome.ended.get(i, math.inf)
        for r, seconds in round_seconds(out, i).items():
            if r == 0:
                continue
            (before if r < lo else during if r <= hi else after).append(seconds)
    return before, during, after


def longest_gap(outcome: Outcome, nodes: list[int]) -> tuple[float, int, int]:
    """The longest wall-clock time between consecutive rounds of `nodes` appearing, from the
    fault on: (seconds, node, round that ended it)."""
    best = (0.0, -1, -1)
    for i in nodes:
        seen = sorted(outcome.watch.get(i, {}).items())
        for (_, t0), (r1, t1) in itertools.pairwise(seen):
            if t1 >= outcome.began_at and t1 - t0 > best[0]:
                best = (t1 - t0, i, r1)
    return best


def back(outcome: Outcome, out: Path, victim: int) -> str:
    """When the victim's first round with an answering neighbor appeared after the fault
    ended (the restore, the restart, the lifted limit), and that round."""
    answered = {int(r["round"]) for r in records(out, victim)
                if r["kind"] == "round" and r["answered"]}
    later = sorted((t, r) for r, t in outcome.watch.get(victim, {}).items()
                   if t >= outcome.ended_at and r in answered)
    if not later:
        return "never answered by a neighbor after the fault"
    t, r = later[0]
    return f"{t - outcome.ended_at:.1f} s after the fault ended, at round {r}"


def report(outcome: Outcome, out: Path, setup: Setup, unfaulted: float) -> Row:
    nodes = range(setup.config.nodes)
    sums = {i: summary(out, i) for i in nodes}
    done = [s for s in sums.values() if s is not None]
    before, during, after = phases(outcome, out, outcome.live)
    gap, gap_node, gap_round = longest_gap(outcome, outcome.live)
    rounds = "-" if len(done) < len(sums) else str(min(int(s["round"]) for s in done))
    acc = "-"
    if done:
        mean = statistics.fmean(float(s["accuracy"]) for s in done)
        acc = f"{mean:.4f} ({mean - unfaulted:+.4f})"
    missed = str(sum(int(s["missed_neighbor_answers"]) for s in done))
    exits = " ".join(f"{i}:" + ",".join(str(c) for c in outcome.codes.get(i, []))
                     for i in nodes)
    details = [f"  {outcome.scenario}: {outcome.action}" +
               (f"; ERROR {outcome.error}" if outcome.error else "")]
    bad = {i: non_finite(out, i) for i in nodes}
    details.append("  non-finite: " + ("none" if not any(bad.values()) else
                                       "; ".join(f"node {i}: {', '.join(v[:3])}"
                                                 for i, v in bad.items() if v)))
    details.append(f"  longest gap {gap:.2f} s: node {gap_node} before round {gap_round}")
    split = {i: sum(1 for r in records(out, i) if r["kind"] == "round"
                    and set(r["missing"]) & set(outcome.live)) for i in outcome.live}
    details.append("  rounds a live node ran without a live neighbor: "
                   + (", ".join(f"node {i}: {n}" for i, n in split.items() if n) or "none"))
    if outcome.scenario != "none":
        details.append(f"  peer {setup.victim} back: {back(outcome, out, setup.victim)}")
    for i in nodes:
        b, d, a = phases(outcome, out, [i])
        s = sums[i]
        what = [e["event"] + f"@{e['round']}" for e in events(out, i)
                if e["event"] not in ("checkpoint",)]
        details.append(
            f"  node {i}: rounds {outcome.began.get(i, '-')}..{outcome.ended.get(i, '-')} "
            f"faulted; s/round before {stats(b)}, during {stats(d)}, after {stats(a)}; "
            f"missed {s['missed_neighbor_answers'] if s else '-'}, catch-ups "
            f"{s['catch_ups'] if s else '-'}; events {' '.join(what[:12]) or '-'}")
    return Row(outcome.scenario, outcome.action, f"{rounds}/{setup.config.rounds}",
               stats(before), stats(during), stats(after), f"{gap:.2f}", acc, missed, exits,
               details)


def table(rows: list[Row]) -> str:
    head = ["scenario", "rounds", "s/round before", "s/round during", "s/round after", "gap s",
            "acc (vs sim)", "missed", "exit"]
    cells = [[r.scenario, r.rounds, r.before, r.during, r.after, r.gap, r.acc, r.missed, r.exit]
             for r in rows]
    widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(head)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    lines = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line(c) for c in cells]
    for r in rows:
        lines += ["", *r.details]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", nargs="+", default=["all"], choices=(*SCENARIOS, "all"))
    p.add_argument("--out", type=Path, default=Path("runs/faults"))
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--algorithm", default="cga")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--victim", type=int, default=2)
    p.add_argument("--at", type=int, default=None, help="the victim's round (default rounds/4)")
    p.add_argument("--timeout", type=float, default=4.0, help="peer --timeout (s)")
    p.add_argument("--lease-seconds", type=float, default=3.0)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--down", type=float, default=10.0,
                   help="link-down: how long the link is down; bootstrap-restart: how long the "
                        "bootstrap is (s)")
    p.add_argument("--slow", type=float, default=30.0, help="straggler: how long (s)")
    p.add_argument("--rate", default="1mbit", help="straggler: tc rate")
    p.add_argument("--away", type=int, default=20,
                   help="*-resume: rounds the neighbors run before the victim comes back")
    p.add_argument("--run-timeout", type=float, default=900.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for var in PROXY_VARS:  # grpc would send namespace addresses to a proxy
        os.environ.pop(var, None)
        os.environ.pop(var.upper(), None)
    scenarios = list(SCENARIOS) if "all" in args.scenario else args.scenario
    why = unavailable()
    if why is not None and set(scenarios) & set(NAMESPACED):
        print(f"skipping {', '.join(s for s in scenarios if s in NAMESPACED)}: {why}",
              file=sys.stderr)
        scenarios = [s for s in scenarios if s not in NAMESPACED]
    config = RunConfig(nodes=args.nodes, topology="ring", algorithm=args.algorithm,
                       dataset=args.dataset, partition="modulo", rounds=args.rounds,
                       batch_size=32, eval_every=25, seed=args.seed, device="cpu")
    setup = Setup(config=config, victim=args.victim, at=args.at or args.rounds // 4,
                  timeout=args.timeout, lease=args.lease_seconds,
                  checkpoint_every=args.checkpoint_every, down=args.down, slow=args.slow,
                  rate=args.rate, away=args.away, run_timeout=args.run_timeout)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = args.out / stamp
    print(f"# bench/faults.py {' '.join(sys.argv[1:])}  ({stamp}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.nodes} peers "
          f"{args.algorithm} ring {args.dataset}, {args.rounds} rounds, --timeout "
          f"{args.timeout:g}, lease {args.lease_seconds:g} s)", flush=True)
    unfaulted = reference_accuracy(config, args.out / "reference")
    print(f"# unfaulted (simulator) mean final accuracy {unfaulted:.4f}", flush=True)
    rows = []
    for scenario in scenarios:
        out = root / scenario
        started = time.monotonic()
        outcome = run_scenario(scenario, setup, out)
        rows.append(report(outcome, out, setup, unfaulted))
        print(f"# {scenario}: {time.monotonic() - started:.0f} s; {out}", flush=True)
    print(table(rows), flush=True)
    return 0 if all(not r.details[0].count("ERROR") for r in rows) else 1


def reference_accuracy(config: RunConfig, cache: Path) -> float:
    """The simulator's mean final accuracy for `config`, kept in `cache` (minutes per run)."""
    key = hashlib.sha256(config.to_json().encode()).hexdigest()[:16]
    path = cache / f"{key}.json"
    if path.exists():
        return float(json.loads(path.read_text())["accuracy"])
    import torch

    from peer import simulate

    # One intra-op thread: 5 models of this size gain nothing from more, and on a loaded
    # 2-core machine the default (one per core) ran the simulator 8x slower.
    torch.set_num_threads(1)
    accuracy = float(simulate.run(config, cache / key).final.mean)
    path.write_text(json.dumps({"accuracy": accuracy, "config": json.loads(config.to_json())}))
    return accuracy


if __name__ == "__main__":
    sys.exit(main())
