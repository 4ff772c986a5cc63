"""Topologies: graph invariants, seeded randomness, error messages, Metropolis-Hastings weights."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bootstrap import topology
from bootstrap.topology import (
    TOPOLOGY_NAMES,
    Topology,
    build_topology,
    metropolis_hastings_weights,
    repair,
    torus_shape,
    uniform_weights,
)
from crossgrad.errors import ConfigError, UnknownNameError

# (spec, n) pairs that must build.
CASES = [
    *[("ring", n) for n in (2, 3, 5, 16)],
    *[("torus", n) for n in (4, 6, 9, 12, 16, 25)],
    *[("full", n) for n in (2, 3, 7)],
    *[("regular:3", n) for n in (4, 8, 20)],
    *[("regular:4", n) for n in (5, 9, 30)],
    *[("erdos-renyi:0.5", n) for n in (2, 10, 25)],
    *[("bipartite", n) for n in (2, 5, 10)],
]


def _check_invariants(topo: Topology) -> None:
    adj = topo.adjacency
    assert adj.dtype == bool and adj.shape == (topo.n, topo.n)
    assert np.array_equal(adj, adj.T)
    assert not adj.diagonal().any()
    assert topo.is_connected()
    for i in range(topo.n):
        nbrs = topo.neighbors(i)
        assert nbrs == sorted(nbrs) and i not in nbrs
        assert topo.degree(i) == len(nbrs)


def _check_weights(topo: Topology, w: np.ndarray) -> None:
    assert w.dtype == np.float64 and w.shape == (topo.n, topo.n)
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (w >= 0).all()
    assert (w.diagonal() > 0).all()
    off_diag = ~np.eye(topo.n, dtype=bool)
    assert ((w > 0) & off_diag == topo.adjacency).all(), "weights on edges, zeros elsewhere"


@pytest.mark.parametrize(("spec", "n"), CASES)
def test_invariants_and_weights(spec: str, n: int) -> None:
    topo = build_topology(spec, n, seed=0)
    assert (topo.n, topo.spec) == (n, spec)
    _check_invariants(topo)
    _check_weights(topo, metropolis_hastings_weights(topo))


@pytest.mark.parametrize("n", [3, 4, 10])
def test_ring_and_full_degrees(n: int) -> None:
    assert set(build_topology("ring", n, 0).degrees()) == {2}
    assert set(build_topology("full", n, 0).degrees()) == {n - 1}


def test_ring_of_two_is_one_edge() -> None:
    assert build_topology("ring", 2, 0).edges() == [(0, 1)]


@pytest.mark.parametrize(("n", "shape"), [(9, (3, 3)), (12, (3, 4)), (16, (4, 4)), (20, (4, 5))])
def test_torus_is_most_square_and_4_regular(n: int, shape: tuple[int, int]) -> None:
    assert torus_shape(n) == shape
    topo = build_topology("torus", n, 0)
    assert set(topo.degrees()) == {4}
    cols = shape[1]
    assert topo.neighbors(0) == sorted({1, cols - 1, cols, n - cols})


def test_torus_with_a_side_of_two_collapses_wraparound() -> None:
    assert set(build_topology("torus", 6, 0).degrees()) == {3}  # 2 x 3
    assert set(build_topology("torus", 4, 0).degrees()) == {2}  # 2 x 2: a 4-cycle


@pytest.mark.parametrize("n", [2, 3, 5, 7, 13])
def test_torus_rejects_prime_and_tiny_n(n: int) -> None:
    with pytest.raises(ConfigError, match=f"rows, cols >= 2.*got n={n}"):
        build_topology("torus", n, 0)


def test_bipartite_connects_halves_only() -> None:
    topo = build_topology("bipartite", 5, 0)
    assert topo.neighbors(0) == [2, 3, 4]
    assert topo.neighbors(4) == [0, 1]
    assert not topo.adjacency[:2, :2].any() and not topo.adjacency[2:, 2:].any()


@pytest.mark.parametrize(
    ("spec", "n"), [("regular:3", 20), ("regular:6", 9), ("erdos-renyi:0.3", 20)]
)
def test_random_graphs_are_seeded(spec: str, n: int) -> None:
    a, b, c = build_topology(spec, n, 1), build_topology(spec, n, 1), build_topology(spec, n, 2)
    assert a == b and hash(a) == hash(b)
    assert a != c


@pytest.mark.parametrize(("d", "n"), [(2, 12), (3, 10), (5, 6), (7, 10), (9, 10)])
def test_regular_degrees(d: int, n: int) -> None:
    topo = build_topology(f"regular:{d}", n, 0)
    assert set(topo.degrees()) == {d}
    assert topo.is_connected()


@pytest.mark.parametrize("spec", ["ring", "torus", "full", "regular:3", "erdos-renyi:0.1",
                                  "bipartite", "file:/does/not/exist"])  # fmt: skip
def test_single_node_is_isolated_with_weight_one(spec: str) -> None:
    topo = build_topology(spec, 1, 0)
    assert topo.neighbors(0) == [] and topo.is_connected()
    np.testing.assert_array_equal(metropolis_hastings_weights(topo), [[1.0]])
    np.testing.assert_array_equal(uniform_weights(topo), [[1.0]])


def test_unknown_topology_lists_the_known_forms() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_topology("star", 5, 0)
    for form in TOPOLOGY_NAMES:
        assert form in str(info.value)
    assert set(TOPOLOGY_NAMES) >= {"ring", "regular:d", "erdos-renyi:p", "file:PATH"}


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        ("regular:3", 5, "regular:d needs n*d even and 0 < d < n; got n=5, d=3"),
        ("regular:5", 5, "0 < d < n; got n=5, d=5"),
        ("regular:0", 4, "0 < d < n; got n=4, d=0"),
        ("regular:1", 4, "perfect matching"),
        ("regular:x", 4, "integer degree d, as in regular:4; got 'x'"),
        ("regular", 4, "needs a parameter: write 'regular:d'"),
        ("ring:3", 4, "takes no parameter"),
        ("erdos-renyi:1.5", 4, "0 < p <= 1"),
        ("erdos-renyi:abc", 4, "0 < p <= 1"),
        ("erdos-renyi:0.01", 50, "disconnected in all 100 draws; use p well above ln(n)/n"),
        ("file:", 4, "needs a path"),
        ("ring", 0, "n >= 1"),
    ],
)
def test_errors_say_the_expected_form(spec: str, n: int, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_topology(spec, n, 0)


def test_file_topology(tmp_path: Path) -> None:
    path = tmp_path / "graph.txt"
    path.write_text("# a path with a chord\n0 1\n1 2  # middle\n\n2 3\n3 0\n1 0\n")
    topo = build_topology(f"file:{path}", 4, 0)
    assert topo.edges() == [(0, 1), (0, 3), (1, 2), (2, 3)]
    _check_invariants(topo)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 1\n1 4\n", "line 2: node ids must be in 0..3 for n=4; got 1 4"),
        ("0 1\n2 2\n", "line 2: self loop 2 2"),
        ("0 1\n1 two\n", "line 2: expected two node ids 'i j'; got '1 two'"),
        ("0 1 2\n", "line 1: expected two node ids"),
        ("0 1\n2 3\n", "does not connect all 4 nodes"),
    ],
)
def test_bad_file_topology(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "graph.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_topology(f"file:{path}", 4, 0)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        build_topology(f"file:{tmp_path / 'nope.txt'}", 4, 0)


def test_metropolis_hastings_on_a_path(tmp_path: Path) -> None:
    """Degrees 1, 2, 1: every edge weight is 1/(1+2); the ends keep 2/3, the middle 1/3."""
    path = tmp_path / "path.txt"
    path.write_text("0 1\n1 2\n")
    w = metropolis_hastings_weights(build_topology(f"file:{path}", 3, 0))
    third = 1.0 / 3.0
    np.testing.assert_allclose(
        w, [[2 * third, third, 0], [third, third, third], [0, third, 2 * third]], atol=1e-15
    )


@pytest.mark.parametrize(
    ("spec", "n"), [("ring", 8), ("torus", 16), ("full", 5), ("regular:3", 10)]
)
def test_uniform_weights_equal_metropolis_hastings_on_regular_graphs(spec: str, n: int) -> None:
    topo = build_topology(spec, n, 0)
    np.testing.assert_allclose(uniform_weights(topo), metropolis_hastings_weights(topo), atol=1e-15)


def test_uniform_weights_need_a_regular_graph() -> None:
    with pytest.raises(ConfigError, match="regular graph"):
        uniform_weights(build_topology("bipartite", 5, 0))


def test_topology_validates_and_freezes_adjacency() -> None:
    with pytest.raises(ConfigError, match="symmetric"):
        Topology(2, "hand", np.array([[False, True], [False, False]]))
    with pytest.raises(ConfigError, match="self loops"):
        Topology(2, "hand", np.eye(2, dtype=bool))
    with pytest.raises(ConfigError, match=r"\(3, 3\)"):
        Topology(3, "hand", np.zeros((2, 2), dtype=bool))
    topo = build_topology("ring", 4, 0)
    with pytest.raises(ValueError):
        topo.adjacency[0, 2] = True


SPECS = st.sampled_from(["ring", "torus", "full", "regular:3", "regular:4", "erdos-renyi:0.4",
                         "bipartite"])  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(spec=SPECS, n=st.integers(min_value=1, max_value=40), seed=st.integers(0, 2**31))
def test_metropolis_hastings_is_doubly_stochastic(spec: str, n: int, seed: int) -> None:
    if n > 1 and spec == "torus":
        assume(any(n % r == 0 for r in range(2, n // 2 + 1)))  # not prime, n >= 4
    if n > 1 and spec.startswith("regular:"):
        d = int(spec.split(":")[1])
        assume(d < n and n * d % 2 == 0)
    topo = build_topology(spec, n, seed)
    _check_invariants(topo)
    _check_weights(topo, metropolis_hastings_weights(topo))


# ---- repair: the graph over the live nodes ----


def alive(n: int, dead: list[int]) -> np.ndarray:
    live = np.ones(n, dtype=bool)  # (n,)
    live[dead] = False
    return live


def test_all_alive_is_the_original_graph() -> None:
    topo = build_topology("regular:3", 10, 0)
    assert repair(topo, alive(10, [])) == topo


def test_a_ring_that_loses_one_node_is_the_ring_of_the_others() -> None:
    assert repair(build_topology("ring", 5, 0), alive(5, [2])).edges() == [
        (0, 1), (0, 4), (1, 3), (3, 4)]  # fmt: skip
    assert repair(build_topology("ring", 5, 0), alive(5, [0])).edges() == [
        (1, 2), (1, 4), (2, 3), (3, 4)]  # fmt: skip


@pytest.mark.parametrize("dead", [[1, 2], [4, 0]])
def test_a_ring_that_loses_two_adjacent_nodes_is_the_ring_of_three(dead: list[int]) -> None:
    remaining = sorted(set(range(5)) - set(dead))
    repaired = repair(build_topology("ring", 5, 0), alive(5, dead))
    assert repaired.edges() == [(remaining[0], remaining[1]), (remaining[0], remaining[2]),
                                (remaining[1], remaining[2])]


def test_a_ring_that_loses_two_nodes_apart_stays_a_ring() -> None:
    repaired = repair(build_topology("ring", 8, 0), alive(8, [1, 5]))
    assert repaired.edges() == [(0, 2), (0, 7), (2, 3), (3, 4), (4, 6), (6, 7)]
    degrees = repaired.degrees()
    assert set(degrees[[0, 2, 3, 4, 6, 7]]) == {2} and set(degrees[[1, 5]]) == {0}


def test_a_ring_that_loses_a_run_of_nodes_links_its_ends() -> None:
    repaired = repair(build_topology("ring", 10, 0), alive(10, [3, 4, 5, 6]))
    assert repaired.edges() == [(0, 1), (0, 9), (1, 2), (2, 7), (7, 8), (8, 9)]


def test_a_dead_torus_node_is_bypassed_by_a_path_through_its_neighbors() -> None:
    topo = build_topology("torus", 16, 0)  # 4 x 4; node 5 borders 1, 4, 6, 9
    repaired = repair(topo, alive(16, [5]))
    added = set(repaired.edges()) - set(topo.edges())
    # ring order after 5: 6, 9, 1, 4 (ids 1, 4, 12, 15 steps past 5, wrapping at 16)
    assert added == {(6, 9), (1, 9), (1, 4)}
    assert repaired.degree(5) == 0
    assert _connected_over(repaired, [i for i in range(16) if i != 5])


def test_a_returning_node_gets_its_edges_back_and_the_bypass_goes() -> None:
    topo = build_topology("ring", 6, 0)
    assert (1, 3) in repair(topo, alive(6, [2])).edges()
    assert repair(topo, alive(6, [])) == topo
    assert repair(topo, alive(6, [4])).edges() == [(0, 1), (0, 5), (1, 2), (2, 3), (3, 5)]


def test_a_disconnected_original_is_chained_by_smallest_ids() -> None:
    adj = np.zeros((6, 6), dtype=bool)
    for i, j in [(0, 1), (2, 3), (4, 5)]:
        adj[i, j] = adj[j, i] = True
    repaired = repair(Topology(6, "hand", adj), alive(6, [1]))
    assert repaired.edges() == [(0, 2), (2, 3), (2, 4), (4, 5)]


def test_nobody_or_one_node_left_has_no_edges() -> None:
    ring = build_topology("ring", 4, 0)
    assert repair(ring, alive(4, [0, 1, 2, 3])).edges() == []
    assert repair(ring, alive(4, [0, 1, 3])).edges() == []
    with pytest.raises(ConfigError, match=r"shape \(4,\)"):
        repair(ring, np.ones(3, dtype=bool))


def _connected_over(topo: Topology, nodes: list[int]) -> bool:
    sub = topo.adjacency[np.ix_(nodes, nodes)]
    return len(nodes) == 0 or topology._is_connected(sub)


REPAIR_SPECS = st.sampled_from(["ring", "torus", "full", "regular:3", "regular:4",
                                "erdos-renyi:0.3"])  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(spec=REPAIR_SPECS, n=st.integers(min_value=2, max_value=30), seed=st.integers(0, 2**31),
       data=st.data())
def test_repair_keeps_the_live_nodes_connected_with_valid_weights(
        spec: str, n: int, seed: int, data: st.DataObject) -> None:
    if spec == "torus":
        assume(any(n % r == 0 for r in range(2, n // 2 + 1)))
    if spec.startswith("regular:"):
        d = int(spec.split(":")[1])
        assume(d < n and n * d % 2 == 0)
    topo = build_topology(spec, n, seed)
    live = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))  # (n,)
    repaired = repair(topo, live)
    _check_invariants_except_connected(repaired)
    induced = topo.adjacency & live[:, None] & live[None, :]
    assert (repaired.adjacency >= induced).all(), "contains the induced subgraph"
    assert not repaired.adjacency[~live].any(), "dead nodes have no edges"
    assert _connected_over(repaired, [int(i) for i in np.flatnonzero(live)])
    w = metropolis_hastings_weights(repaired)
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (w >= 0).all()
    if live.all():
        assert repaired == topo
    if spec == "ring" and n >= 3:
        assert repaired.degrees().max() <= 2


def _check_invariants_except_connected(topo: Topology) -> None:
    adj = topo.adjacency
    assert np.array_equal(adj, adj.T) and not adj.diagonal().any()


def test_topology_module_imports_neither_torch_nor_grpc() -> None:
    tree = ast.parse(Path(topology.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m.startswith(("torch", "grpc", "crossgrad.v1")) for m in imported), imported


# ---- the sparse computations against their dense definitions ----


def dense_metropolis_hastings(adj: np.ndarray) -> np.ndarray:
    """The module docstring's formula over whole matrices (how it was computed before)."""
    deg = adj.sum(axis=1).astype(np.float64)  # (n,)
    pairwise = 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :]))  # (n, n)
    weights = np.where(adj, pairwise, 0.0)  # (n, n)
    np.fill_diagonal(weights, 1.0 - weights.sum(axis=1))
    return weights


def dense_components(adj: np.ndarray, nodes: np.ndarray) -> list[list[int]]:
    """Components by reachability: the transitive closure of the induced subgraph."""
    n = adj.shape[0]
    reach = (adj & nodes[:, None] & nodes[None, :]) | np.eye(n, dtype=bool)  # (n, n)
    while True:
        wider = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0  # (n, n)
        if np.array_equal(wider, reach):
            break
        reach = wider
    found = {tuple(int(j) for j in np.flatnonzero(reach[i])) for i in np.flatnonzero(nodes)}
    return [list(c) for c in sorted(found)]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(min_value=1, max_value=40), p=st.floats(0.0, 1.0), data=st.data())
def test_weights_and_components_equal_their_dense_definitions(
        n: int, p: float, data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    upper = np.triu(rng.random((n, n)) < p, 1)  # (n, n)
    topo = Topology(n, "drawn", upper | upper.T)
    weights, dense = metropolis_hastings_weights(topo), dense_metropolis_hastings(topo.adjacency)
    assert weights.shape == dense.shape and weights.tobytes() == dense.tobytes()  # bit for bit
    nodes = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))  # (n,)
    assert topology._components(topo.adjacency, nodes) == dense_components(topo.adjacency, nodes)
