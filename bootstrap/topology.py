"""Communication graphs by name, and the mixing weights the algorithms average with.

The bootstrap assigns each node its neighbors N(i) from a `Topology` and the mixing weights pi_il
from `metropolis_hastings_weights` (docs/architecture.md, "Bootstrap";
docs/algorithms.md, "Notation"):

    w_ij = 1 / (1 + max(d_i, d_j))   for every edge ij,
    w_ii = 1 - sum_j w_ij,           zero elsewhere.

The matrix is symmetric and doubly stochastic on any undirected graph, and each node can compute
its row from its own and its neighbors' degrees alone. `uniform_weights` (1 / (d + 1)) is the
simpler alternative on regular graphs.

Specs are `name` or `name:parameter`: ring, torus, full, regular:d, erdos-renyi:p, bipartite,
file:PATH. Random graphs draw from `numpy_rng(seed, "topology", spec, n, attempt)` (spec written
canonically), so every process given the same (spec, n, seed) builds the same graph. Every
topology is checked to be connected, because decentralized averaging over a disconnected graph
never reaches consensus.

n = 1 gives one isolated node with w_11 = 1 for every spec (local training); the spec's form and
parameter syntax are still checked, but nothing that depends on n (and a file is not read).

When nodes die, `repair(topology, live)` gives the graph the run uses over the live ones (the
bootstrap computes it at every topology epoch, always from the original graph and the live set,
so a returning node gets its original edges back and bypasses that no longer apply go away):

1. the subgraph induced by the live nodes;
2. for every cluster of dead nodes (dead nodes adjacent to each other in the original graph form
   one cluster), the live nodes adjacent to the cluster are linked in a path, in ring order
   (ascending ids, starting after the cluster's smallest id and wrapping around n - 1 -> 0), each
   edge only where the two are not adjacent already. A ring that loses one node d, or a run of
   consecutive nodes, becomes the ring of the remaining ones (d-1 is linked to d+1); a full graph
   gains nothing; a node gains at most two edges per dead cluster it borders;
3. if the live nodes are still not connected (only possible when the original graph was not),
   their components, ordered by smallest id, are chained by one edge each between those ids.

Any path in the original graph between two live nodes crosses dead clusters only between two
live nodes that border the same cluster, and step 2 connects those, so the repaired graph of a
connected topology is connected. Dead nodes have no edges.

Pure numpy: no torch, no grpc, so the bootstrap and tests use it without either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from crossgrad.errors import ConfigError, UnknownNameError
from crossgrad.seeding import numpy_rng

# Random graphs are redrawn with a fresh derived seed until connected, at most this many times.
MAX_ATTEMPTS = 100


@dataclass(frozen=True, eq=False)
class Topology:
    """An undirected simple graph on nodes 0..n-1.

    adjacency is a read-only (n, n) bool matrix: symmetric, False on the diagonal. Validated here,
    so a Topology built by hand (tests, a bootstrap restoring its state) is as sound as a built one.
    """

    n: int
    spec: str
    adjacency: np.ndarray

    def __post_init__(self) -> None:
        adj = np.array(self.adjacency, dtype=bool, copy=True)
        if self.n < 1 or adj.shape != (self.n, self.n):
            raise ConfigError(
                f"adjacency must be ({self.n}, {self.n}) for n={self.n}; got {adj.shape}"
            )
        if not np.array_equal(adj, adj.T):
            raise ConfigError(f"topology {self.spec!r}: adjacency must be symmetric (undirected)")
        if adj.diagonal().any():
            raise ConfigError(f"topology {self.spec!r}: self loops are not allowed")
        adj.setflags(write=False)
        object.__setattr__(self, "adjacency", adj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return (self.n, self.spec) == (other.n, other.spec) and bool(
            np.array_equal(self.adjacency, other.adjacency)
        )

    def __hash__(self) -> int:
        return hash((self.n, self.spec, self.adjacency.tobytes()))

    def neighbors(self, i: int) -> list[int]:
        """N(i), sorted: node i itself is never included."""
        return [int(j) for j in np.flatnonzero(self.adjacency[i])]

    def degree(self, i: int) -> int:
        return int(self.adjacency[i].sum())

    def degrees(self) -> np.ndarray:
        return np.count_nonzero(self.adjacency, axis=1).astype(np.int64)  # (n,)

    def edges(self) -> list[tuple[int, int]]:
        """Each edge once, as (i, j) with i < j, sorted."""
        rows, cols = np.nonzero(np.triu(self.adjacency))
        return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)]

    def is_connected(self) -> bool:
        return _is_connected(self.adjacency)

    def is_regular(self) -> bool:
        return bool(np.all(self.degrees() == self.degrees()[0]))


def _is_connected(adj: np.ndarray) -> bool:
    """Breadth-first search from node 0."""
    seen = np.zeros(adj.shape[0], dtype=bool)
    seen[0] = True
    frontier = np.array([0])
    while frontier.size:
        reached = adj[frontier].any(axis=0) & ~seen
        seen |= reached
        frontier = np.flatnonzero(reached)
    return bool(seen.all())


def _from_edges(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    adj = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        adj[i, j] = adj[j, i] = True
    return adj


# ---- builders: (n >= 2, parsed parameter, seed) -> adjacency ----


def _ring(n: int, _: None, seed: int) -> np.ndarray:
    """i ~ i+1 mod n; for n = 2 the two directions are one edge."""
    return _from_edges(n, [(i, (i + 1) % n) for i in range(n)])


def torus_shape(n: int) -> tuple[int, int]:
    """The most square rows x cols = n with 2 <= rows <= cols; ConfigError if there is none."""
    rows = max((r for r in range(2, math.isqrt(n) + 1) if n % r == 0), default=0)
    if rows == 0:
        raise ConfigError(
            f"torus needs n = rows * cols with rows, cols >= 2 (n >= 4 and not prime); got n={n}; "
            f"use ring or regular:4 instead"
        )
    return rows, n // rows


def _torus(n: int, _: None, seed: int) -> np.ndarray:
    """2-D grid with wraparound, node (r, c) = r * cols + c. Degree 4 when both sides are >= 3;
    a side of 2 makes its two wraparound neighbors the same node (degree 3, or 2 on 2x2)."""
    rows, cols = torus_shape(n)
    edges = []
    for r in range(rows):
        for c in range(cols):
            edges.append((r * cols + c, r * cols + (c + 1) % cols))
            edges.append((r * cols + c, ((r + 1) % rows) * cols + c))
    return _from_edges(n, edges)


def _full(n: int, _: None, seed: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def _bipartite(n: int, _: None, seed: int) -> np.ndarray:
    """Complete bipartite between 0..n//2-1 and n//2..n-1 (the second half is the larger)."""
    half = n // 2
    adj = np.zeros((n, n), dtype=bool)
    adj[:half, half:] = True
    adj[half:, :half] = True
    return adj


def _parse_degree(arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise ConfigError(
            f"regular:d needs an integer degree d, as in regular:4; got {arg!r}"
        ) from None


def _try_regular(n: int, d: int, rng: np.random.Generator) -> np.ndarray | None:
    """One draw of a simple d-regular graph by random stub pairing (Steger and Wormald 1999).

    Pairs shuffled stubs; a pair that would make a loop or a repeated edge goes back into the
    pool. None if the pool stops making progress (the caller redraws with a new seed).
    """
    adj = np.zeros((n, n), dtype=bool)
    stubs = np.repeat(np.arange(n), d)
    stalls = 0
    while stubs.size and stalls < 50:
        rng.shuffle(stubs)
        left: list[int] = []
        for a, b in stubs.reshape(-1, 2):
            if a != b and not adj[a, b]:
                adj[a, b] = adj[b, a] = True
            else:
                left += [int(a), int(b)]
        stalls = stalls + 1 if len(left) == stubs.size else 0
        stubs = np.array(left, dtype=np.int64)
    return None if stubs.size else adj


def _regular(n: int, d: int, seed: int) -> np.ndarray:
    """A random connected d-regular graph. For d > (n-1)/2 the complement of an (n-1-d)-regular
    graph is drawn instead: fewer edges to place, so the stub pairing rarely stalls."""
    if not (0 < d < n) or (n * d) % 2:
        raise ConfigError(f"regular:d needs n*d even and 0 < d < n; got n={n}, d={d}")
    if d == 1 and n > 2:
        raise ConfigError(f"regular:1 is a perfect matching, connected only for n=2; got n={n}")
    complement = d > (n - 1) / 2
    for attempt in range(MAX_ATTEMPTS):
        rng = numpy_rng(seed, "topology", f"regular:{d}", n, attempt)
        adj = _try_regular(n, n - 1 - d if complement else d, rng)
        if adj is None:
            continue
        if complement:
            adj = ~adj & ~np.eye(n, dtype=bool)
        if _is_connected(adj):
            return adj
    raise ConfigError(
        f"no connected regular:{d} graph on n={n} nodes in {MAX_ATTEMPTS} draws; raise d"
    )


def _parse_probability(arg: str) -> float:
    try:
        p = float(arg)
    except ValueError:
        p = math.nan
    if not 0.0 < p <= 1.0:
        raise ConfigError(
            f"erdos-renyi:p needs an edge probability 0 < p <= 1, as in "
            f"erdos-renyi:0.3; got {arg!r}"
        )
    return p


def _erdos_renyi(n: int, p: float, seed: int) -> np.ndarray:
    """G(n, p), redrawn until connected. Connected with high probability once p > ln(n) / n."""
    for attempt in range(MAX_ATTEMPTS):
        rng = numpy_rng(seed, "topology", f"erdos-renyi:{p!r}", n, attempt)
        upper = np.triu(rng.random((n, n)) < p, k=1)  # (n, n)
        adj = upper | upper.T
        if _is_connected(adj):
            return adj
    raise ConfigError(
        f"erdos-renyi:{p} on n={n} nodes was disconnected in all {MAX_ATTEMPTS} draws; "
        f"use p well above ln(n)/n = {math.log(n) / n:.3f}"
    )


def _parse_path(arg: str) -> str:
    if not arg.strip():
        raise ConfigError("file:PATH needs a path, as in file:graph.txt")
    return arg


def _from_file(n: int, path: str, seed: int) -> np.ndarray:
    """Edges "i j" (0-based ids), one per line, '#' starts a comment. "i j" and "j i" are the same
    edge and repeats are allowed; ids out of range, self loops and a disconnected graph are not."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"topology file {path!r} cannot be read: {exc.strerror or exc}") from None
    edges = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"topology file {path!r} line {lineno}"
        try:
            i, j = (int(f) for f in fields)
        except ValueError:
            raise ConfigError(
                f"{where}: expected two node ids 'i j'; got {raw.strip()!r}"
            ) from None
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(f"{where}: node ids must be in 0..{n - 1} for n={n}; got {i} {j}")
        if i == j:
            raise ConfigError(f"{where}: self loop {i} {j} is not allowed")
        edges.append((i, j))
    adj = _from_edges(n, edges)
    if not _is_connected(adj):
        raise ConfigError(f"topology file {path!r} does not connect all {n} nodes")
    return adj


@dataclass(frozen=True)
class TopologyKind:
    """One registry entry: how its spec is written, its parameter parser, its builder."""

    form: str  # "regular:d": for CLI help and error messages
    build: Callable[[int, Any, int], np.ndarray]  # (n >= 2, parameter, seed) -> adjacency
    parse: Callable[[str], Any] | None = None  # None: the spec takes no parameter


TOPOLOGIES: dict[str, TopologyKind] = {
    "ring": TopologyKind("ring", _ring),
    "torus": TopologyKind("torus", _torus),
    "full": TopologyKind("full", _full),
    "regular": TopologyKind("regular:d", _regular, _parse_degree),
    "erdos-renyi": TopologyKind("erdos-renyi:p", _erdos_renyi, _parse_probability),
    "bipartite": TopologyKind("bipartite", _bipartite),
    "file": TopologyKind("file:PATH", _from_file, _parse_path),
}

TOPOLOGY_NAMES: tuple[str, ...] = tuple(kind.form for kind in TOPOLOGIES.values())


def build_topology(spec: str, n: int, seed: int) -> Topology:
    """The graph `spec` on n nodes; random graphs are drawn from `seed`. Always connected."""
    spec = spec.strip()
    name, colon, arg = spec.partition(":")
    kind = TOPOLOGIES.get(name)
    if kind is None:
        raise UnknownNameError("topology", name, TOPOLOGY_NAMES)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"a topology needs n >= 1 nodes; got n={n!r}")
    n = int(n)
    if kind.parse is None and colon:
        raise ConfigError(
            f"topology {name!r} takes no parameter; write {kind.form!r}, got {spec!r}"
        )
    if kind.parse is not None and not colon:
        raise ConfigError(f"topology {name!r} needs a parameter: write {kind.form!r}, got {spec!r}")
    param = kind.parse(arg) if kind.parse is not None else None
    if n == 1:
        return Topology(1, spec, np.zeros((1, 1), dtype=bool))
    return Topology(n, spec, kind.build(n, param, int(seed)))


def _edges(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every edge of an (n, n) adjacency matrix, each way, as (rows, cols), row-major order.
    (np.nonzero on the matrix gives the same, 15x slower at n = 1,000.)"""
    rows, cols = np.divmod(np.flatnonzero(adj), adj.shape[0])
    return rows, cols


def _components(adj: np.ndarray, nodes: np.ndarray) -> list[list[int]]:
    """Connected components of the subgraph induced by `nodes` ((n,) bool), each a sorted list
    of ids, ordered by their smallest id.

    Breadth-first over neighbor lists: O(n + edges) steps after one pass over the matrix, where a
    frontier of matrix rows took one step per hop (a ring of 1,000 has 500), each over all n."""
    rows, cols = _edges(adj)
    inside = nodes[rows] & nodes[cols]
    rows, cols = rows[inside], cols[inside]  # still row-major: a node's neighbors are one run
    bounds = np.searchsorted(rows, np.arange(adj.shape[0] + 1)).tolist()  # (n + 1,)
    ends = cols.tolist()
    seen = (~nodes).tolist()  # nodes outside the subgraph count as seen
    found = []
    for start in np.flatnonzero(nodes).tolist():
        if seen[start]:
            continue
        seen[start] = True
        member, frontier = [start], [start]
        while frontier:
            reached = []
            for i in frontier:
                for j in ends[bounds[i]:bounds[i + 1]]:
                    if not seen[j]:
                        seen[j] = True
                        reached.append(j)
            member += reached
            frontier = reached
        found.append(sorted(member))
    return found


def repair(topology: Topology, live: np.ndarray) -> Topology:
    """The graph over the live nodes ((n,) bool) that the run uses while the others are dead:
    the induced subgraph, plus bypass edges around every dead cluster, plus (for a disconnected
    original) one edge between consecutive components; the module docstring gives the rule.
    With every node live it is `topology` itself."""
    n = topology.n
    live = np.asarray(live, dtype=bool)
    if live.shape != (n,):
        raise ConfigError(f"repair needs one live flag per node, shape ({n},); got {live.shape}")
    if live.all():
        return topology
    original = topology.adjacency  # (n, n)
    adj = original & live[:, None] & live[None, :]  # (n, n): step 1, the induced subgraph

    def link(i: int, j: int) -> None:
        adj[i, j] = adj[j, i] = True

    for cluster in _components(original, ~live):  # step 2: bypass each dead cluster
        border = np.flatnonzero(original[cluster].any(axis=0) & live)
        start = cluster[0]
        ring_order = sorted((int(j) for j in border), key=lambda j: (j - start) % n)
        for i, j in pairwise(ring_order):
            link(i, j)  # a no-op where i and j are adjacent already
    parts = _components(adj, live)  # step 3: chain what is still apart
    for a, b in pairwise(parts):
        link(a[0], b[0])
    return Topology(n, topology.spec, adj)


def metropolis_hastings_weights(topo: Topology) -> np.ndarray:
    """(n, n) float64: w_ij = 1/(1 + max(d_i, d_j)) on edges, w_ii = 1 - sum_j w_ij.

    Symmetric by construction, so rows and columns both sum to 1; nonnegative because a row's
    off-diagonal sum is at most d_i / (1 + d_i).
    """
    deg = topo.degrees().astype(np.float64)  # (n,)
    rows, cols = _edges(topo.adjacency)  # only edges get a weight
    weights = np.zeros((topo.n, topo.n))  # (n, n)
    weights[rows, cols] = 1.0 / (1.0 + np.maximum(deg[rows], deg[cols]))
    np.fill_diagonal(weights, 1.0 - weights.sum(axis=1))
    return weights


def uniform_weights(topo: Topology) -> np.ndarray:
    """(n, n) float64: 1/(d+1) on edges and the diagonal (ConfigError unless regular)."""
    if not topo.is_regular():
        raise ConfigError(
            f"uniform weights need a regular graph; {topo.spec!r} on n={topo.n} has degrees "
            f"{topo.degrees().min()}..{topo.degrees().max()}; use Metropolis-Hastings weights"
        )
    d = topo.degree(0)
    weights = (topo.adjacency | np.eye(topo.n, dtype=bool)).astype(np.float64)  # (n, n)
    return weights / (d + 1)
