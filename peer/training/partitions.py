"""How the training set is split over nodes: the non-IID settings CGA and NGC are evaluated on.

The specs follow docs/algorithms.md, "Partitions"; results must name the spec used.

    iid          each node gets floor(|class c| / N) samples of every class c (seeded choice)
    modulo       CGA code: every class trimmed to the smallest class size (seeded choice of which
                 samples stay); class c goes to node c mod N. N must divide the class count K, or
                 be a multiple of K: then node r holds class r mod K and the N / K nodes sharing a
                 class split it into equal chunks (remainder dropped)
    sorted       NGC code: stable sort by label, N contiguous chunks of floor(len / N), the
                 remainder (the tail of the highest labels) dropped; no randomness
    shards:C     each node holds C distinct classes; every class's samples are split as evenly
                 as possible (sizes differ by at most one) among the nodes holding it. Classes are
                 dealt so that usage stays balanced: each node takes the C least-used classes, ties
                 broken at random, so every class is used as soon as N * C >= K
    dirichlet:A  per class, proportions p ~ Dirichlet(A * 1_N); the class's samples, in a seeded
                 random order, are cut at the cumulative proportions; every sample is used once

Every partition is a pure function of (labels, N, spec, seed): the generator is
numpy_rng(seed, "partition", spec), so every node computes the same split without talking.
A node left with no samples is an error, not a silently idle peer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from crossgrad.errors import ConfigError, UnknownNameError
from crossgrad.seeding import numpy_rng

PARTITION_NAMES = ("iid", "modulo", "sorted", "shards", "dirichlet")
_FORMS = ("iid", "modulo", "sorted", "shards:C", "dirichlet:A")

# (labels, num_nodes, num_classes, parameter, rng) -> per-node index arrays (unsorted)
_Splitter = Callable[[np.ndarray, int, int, str, np.random.Generator], list[np.ndarray]]


def _by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Indices of each class in original order; list position = class."""
    order = np.argsort(labels, kind="stable")  # (n,) grouped by class, original order within
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def _no_parameter(name: str, param: str) -> None:
    if param:
        raise ConfigError(f"partition {name!r} takes no parameter, got {name}:{param}; "
                          f"write just {name!r}")


def _iid(labels: np.ndarray, n: int, k: int, param: str, rng: np.random.Generator
         ) -> list[np.ndarray]:
    _no_parameter("iid", param)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for members in _by_class(labels, k):
        shuffled, share = rng.permutation(members), len(members) // n
        for r in range(n):
            parts[r].append(shuffled[r * share : (r + 1) * share])
    return [np.concatenate(p) for p in parts]


def _modulo(labels: np.ndarray, n: int, k: int, param: str, rng: np.random.Generator
            ) -> list[np.ndarray]:
    _no_parameter("modulo", param)
    if k % n and n % k:
        fits = [d for d in range(1, k + 1) if k % d == 0] + [2 * k, 3 * k]
        raise ConfigError(f"partition 'modulo' needs the number of nodes ({n}) to divide the "
                          f"number of classes ({k}) or to be a multiple of it, e.g. "
                          f"{', '.join(map(str, fits))} nodes; or use shards:C or dirichlet:A")
    classes = _by_class(labels, k)
    smallest = min(len(m) for m in classes)
    if smallest == 0:
        empty = [c for c, m in enumerate(classes) if len(m) == 0]
        raise ConfigError(f"partition 'modulo' trims every class to the smallest class size, but "
                          f"class(es) {empty} have no samples; use another partition")
    kept = [rng.permutation(m)[:smallest] for m in classes]  # seeded trim, equal sizes
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    if n <= k:  # class c -> node c mod n
        for c, members in enumerate(kept):
            parts[c % n].append(members)
    else:  # n = m * k: nodes c, c + k, c + 2k, ... share class c in equal chunks
        sharing = n // k
        share = smallest // sharing
        for c, members in enumerate(kept):
            for j in range(sharing):
                parts[c + j * k].append(members[j * share : (j + 1) * share])
    return [np.concatenate(p) for p in parts]


def _sorted(labels: np.ndarray, n: int, k: int, param: str, rng: np.random.Generator
            ) -> list[np.ndarray]:
    _no_parameter("sorted", param)
    order = np.argsort(labels, kind="stable")  # (len,)
    share = len(labels) // n
    return [order[r * share : (r + 1) * share] for r in range(n)]


def _shards(labels: np.ndarray, n: int, k: int, param: str, rng: np.random.Generator
            ) -> list[np.ndarray]:
    try:
        per_node = int(param)
    except ValueError:
        raise ConfigError(f"partition 'shards' expects shards:C with C an integer number of "
                          f"classes per node, e.g. shards:2; got 'shards:{param}'") from None
    if not 1 <= per_node <= k:
        raise ConfigError(f"shards:{per_node} asks for {per_node} classes per node, but C must be "
                          f"in 1..{k}: there are {k} classes (more classes per node than classes "
                          f"is impossible)")
    used = np.zeros(k, dtype=np.int64)  # how many nodes hold each class so far
    held: list[np.ndarray] = []
    for _ in range(n):
        # least-used classes first, random among equals: keeps usage within one of balanced
        pick = np.lexsort((rng.random(k), used))[:per_node]
        used[pick] += 1
        held.append(pick)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c, members in enumerate(_by_class(labels, k)):
        holders = [r for r in range(n) if c in held[r]]
        if holders:
            chunks = np.array_split(rng.permutation(members), len(holders))
            for r, chunk in zip(holders, chunks, strict=True):
                parts[r].append(chunk)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, n: int, k: int, param: str, rng: np.random.Generator
               ) -> list[np.ndarray]:
    try:
        alpha = float(param)
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"partition 'dirichlet' expects dirichlet:A with A a number > 0 (small "
                          f"A = more skew), e.g. dirichlet:0.5; got 'dirichlet:{param}'")
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for members in _by_class(labels, k):
        proportions = rng.dirichlet(np.full(n, alpha))  # (n,)
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)  # (n - 1,)
        for r, chunk in enumerate(np.split(rng.permutation(members), cuts)):
            parts[r].append(chunk)
    return [np.concatenate(p) for p in parts]


_SPLITTERS: dict[str, _Splitter] = {
    "iid": _iid, "modulo": _modulo, "sorted": _sorted, "shards": _shards, "dirichlet": _dirichlet,
}


def partition(labels: np.ndarray, num_nodes: int, spec: str, seed: int,
              num_classes: int | None = None) -> list[np.ndarray]:
    """Per node, the sorted int64 indices into labels it trains on; parts are disjoint.

    num_classes defaults to max(labels) + 1; pass it when a class may be absent from labels.
    Raises UnknownNameError for an unknown spec name, ConfigError for a malformed parameter, an
    impossible node count, or a node left without samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"partition: labels must be a 1-D integer array, got {labels.dtype} "
                          f"shape {labels.shape}")
    spec = spec.strip()
    name, _, param = spec.partition(":")
    if name not in _SPLITTERS:
        raise UnknownNameError("partition", spec, _FORMS)
    if name in ("shards", "dirichlet") and not param.strip():
        example = "shards:2" if name == "shards" else "dirichlet:0.5"
        raise ConfigError(f"partition {name!r} needs a parameter: write {name}:"
                          f"{'C' if name == 'shards' else 'A'}, e.g. {example}")
    if not 1 <= num_nodes <= len(labels):
        raise ConfigError(f"partition: num_nodes must be in 1..{len(labels)} (the number of "
                          f"samples), got {num_nodes}")
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= k:
        raise ConfigError(f"partition: labels must lie in 0..{k - 1}, found "
                          f"{int(labels.min())}..{int(labels.max())}")
    rng = numpy_rng(seed, "partition", spec)
    parts = _SPLITTERS[name](labels.astype(np.int64), num_nodes, k, param.strip(), rng)
    for r, part in enumerate(parts):
        if len(part) == 0:
            hint = ", a larger A" if name == "dirichlet" else ""
            raise ConfigError(f"partition {spec!r} (seed {seed}) leaves node {r} of {num_nodes} "
                              f"with no samples; use fewer nodes{hint} or another partition")
    return [np.sort(p).astype(np.int64) for p in parts]


def summarize(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> str:
    """A fixed-width table, one row per node: id, sample count, samples of each class 0..K-1.

    Printed by the CLI at start, so a run's log shows what data each node actually had.
    """
    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes]
                       for p in parts]) if parts else np.zeros((0, num_classes), np.int64)
    totals = counts.sum(axis=1)  # (nodes,)
    width = max(4, len(str(int(totals.max(initial=0)))), len(str(num_classes - 1)))
    head = ["node".rjust(4), "samples".rjust(7)] + [str(c).rjust(width) for c in range(num_classes)]
    lines = [" ".join(head)]
    for r, row in enumerate(counts):
        cells = [str(r).rjust(4), str(int(totals[r])).rjust(7)]
        lines.append(" ".join(cells + [str(int(v)).rjust(width) for v in row]))
    return "\n".join(lines)
