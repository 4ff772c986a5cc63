"""Partitions: the rules of docs/algorithms.md, "Partitions", determinism and error messages."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from crossgrad.errors import ConfigError, UnknownNameError
from peer.training.partitions import PARTITION_NAMES, partition, summarize

DIGITS = np.asarray(load_digits().target, dtype=np.int64)  # (1797,), classes of 174..183
DIGIT_COUNTS = np.bincount(DIGITS)
BALANCED = np.random.default_rng(7).permutation(np.repeat(np.arange(10), 30))  # (300,)
RANDOM_SPECS = ("iid", "modulo", "shards:2", "shards:3", "dirichlet:0.5")
ALL_SPECS = (*RANDOM_SPECS, "sorted")


def check_parts(labels: np.ndarray, parts: list[np.ndarray], num_nodes: int) -> None:
    """Sorted int64 indices, in range, disjoint, none empty."""
    assert len(parts) == num_nodes
    for part in parts:
        assert part.dtype == np.int64 and len(part) > 0
        assert np.all(np.diff(part) > 0) and part[0] >= 0 and part[-1] < len(labels)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)


def classes_of(labels: np.ndarray, part: np.ndarray) -> set[int]:
    return set(np.unique(labels[part]).tolist())


def per_class(labels: np.ndarray, part: np.ndarray) -> np.ndarray:
    return np.bincount(labels[part], minlength=10)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("num_nodes", [5, 10])
def test_every_spec_gives_disjoint_sorted_parts(spec: str, num_nodes: int) -> None:
    check_parts(DIGITS, partition(DIGITS, num_nodes, spec, seed=3), num_nodes)


@pytest.mark.parametrize("num_nodes", [1, 3, 5, 7])
def test_iid_gives_floor_of_every_class(num_nodes: int) -> None:
    parts = partition(DIGITS, num_nodes, "iid", seed=1)
    for part in parts:
        np.testing.assert_array_equal(per_class(DIGITS, part), DIGIT_COUNTS // num_nodes)


def test_modulo_five_nodes_gets_classes_r_and_r_plus_5_trimmed_equal() -> None:
    parts = partition(DIGITS, 5, "modulo", seed=1)
    smallest = DIGIT_COUNTS.min()  # 174
    for r, part in enumerate(parts):
        assert classes_of(DIGITS, part) == {r, r + 5}
        counts = per_class(DIGITS, part)
        assert counts[r] == counts[r + 5] == smallest


def test_modulo_twenty_nodes_share_each_class_evenly() -> None:
    parts = partition(DIGITS, 20, "modulo", seed=1)
    for r, part in enumerate(parts):
        assert classes_of(DIGITS, part) == {r % 10}
        assert len(part) == DIGIT_COUNTS.min() // 2


def test_modulo_rejects_node_counts_that_do_not_fit() -> None:
    with pytest.raises(ConfigError) as err:
        partition(DIGITS, 3, "modulo", seed=1)
    message = str(err.value)
    assert "number of nodes (3)" in message and "number of classes (10)" in message
    assert "divide" in message and "multiple" in message and "1, 2, 5, 10, 20" in message
    with pytest.raises(ConfigError, match=r"class\(es\) \[10\] have no samples"):
        partition(DIGITS, 11, "modulo", seed=1, num_classes=11)


def test_sorted_gives_contiguous_label_chunks() -> None:
    parts = partition(BALANCED, 5, "sorted", seed=1)
    for r, part in enumerate(parts):
        assert classes_of(BALANCED, part) == {2 * r, 2 * r + 1} and len(part) == 60
    parts = partition(DIGITS, 5, "sorted", seed=1)
    order = np.argsort(DIGITS, kind="stable")
    assert all(len(p) == 1797 // 5 for p in parts)  # remainder of 2 dropped
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.sort(order[:1795]))
    assert parts[0].tolist() == np.sort(order[:359]).tolist()


def test_shards_two_on_five_nodes_uses_every_class_once() -> None:
    parts = partition(DIGITS, 5, "shards:2", seed=4)
    seen: list[int] = []
    for part in parts:
        held = classes_of(DIGITS, part)
        assert len(held) == 2
        seen += sorted(held)
        for c in held:  # sole holder: the whole class
            assert per_class(DIGITS, part)[c] == DIGIT_COUNTS[c]
    assert sorted(seen) == list(range(10))


def test_shards_balances_class_use_and_splits_evenly() -> None:
    parts = partition(DIGITS, 10, "shards:3", seed=2)
    holders = np.zeros(10, dtype=np.int64)
    for part in parts:
        held = classes_of(DIGITS, part)
        assert len(held) == 3
        holders[list(held)] += 1
    np.testing.assert_array_equal(holders, np.full(10, 3))
    for c in range(10):
        shares = [per_class(DIGITS, p)[c] for p in parts if c in classes_of(DIGITS, p)]
        assert max(shares) - min(shares) <= 1 and sum(shares) == DIGIT_COUNTS[c]
    few = partition(DIGITS, 3, "shards:2", seed=2)  # 6 slots < 10 classes: all distinct
    assert len(set().union(*(classes_of(DIGITS, p) for p in few))) == 6


def test_dirichlet_is_deterministic_and_uses_each_sample_once() -> None:
    first = partition(DIGITS, 5, "dirichlet:0.3", seed=9)
    again = partition(DIGITS, 5, "dirichlet:0.3", seed=9)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(len(DIGITS)))
    sizes = [len(p) for p in first]
    assert max(sizes) > 1.2 * min(sizes)  # skewed, unlike iid


@pytest.mark.parametrize("spec", RANDOM_SPECS)
def test_random_specs_depend_on_seed_only(spec: str) -> None:
    a = partition(DIGITS, 5, spec, seed=11)
    b = partition(DIGITS, 5, spec, seed=11)
    c = partition(DIGITS, 5, spec, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_sorted_ignores_the_seed() -> None:
    a, b = partition(DIGITS, 4, "sorted", seed=1), partition(DIGITS, 4, "sorted", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_unknown_spec_lists_the_forms() -> None:
    with pytest.raises(UnknownNameError) as err:
        partition(DIGITS, 5, "shard:2", seed=1)
    message = str(err.value)
    assert "'shard:2'" in message
    for form in ("iid", "modulo", "sorted", "shards:C", "dirichlet:A"):
        assert form in message


@pytest.mark.parametrize(("spec", "expected"), [
    ("shards", "needs a parameter: write shards:C, e.g. shards:2"),
    ("shards:x", "expects shards:C with C an integer"),
    ("shards:1.5", "expects shards:C with C an integer"),
    ("shards:11", "more classes per node than classes"),
    ("shards:0", "C must be in 1..10"),
    ("dirichlet", "write dirichlet:A, e.g. dirichlet:0.5"),
    ("dirichlet:-1", "expects dirichlet:A with A a number > 0"),
    ("dirichlet:0", "expects dirichlet:A with A a number > 0"),
    ("dirichlet:abc", "expects dirichlet:A with A a number > 0"),
    ("iid:2", "takes no parameter"),
])
def test_malformed_parameters(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        partition(DIGITS, 5, spec, seed=1)
    assert expected in str(err.value)
    assert not isinstance(err.value, UnknownNameError)


def test_node_count_and_label_checks() -> None:
    with pytest.raises(ConfigError, match=r"num_nodes must be in 1\.\.1797"):
        partition(DIGITS, 0, "iid", seed=1)
    with pytest.raises(ConfigError, match=r"got 1798"):
        partition(DIGITS, 1798, "sorted", seed=1)
    with pytest.raises(ConfigError, match=r"labels must lie in 0\.\.8"):
        partition(DIGITS, 2, "iid", seed=1, num_classes=9)
    with pytest.raises(ConfigError, match="1-D integer array"):
        partition(DIGITS.astype(np.float32), 2, "iid", seed=1)


def test_empty_node_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        partition(np.array([0, 0, 1, 1]), 3, "iid", seed=1)  # floor(2 / 3) = 0 of each class
    assert "leaves node 0 of 3 with no samples" in str(err.value)
    assert "fewer nodes" in str(err.value)
    with pytest.raises(ConfigError, match="a larger A"):
        partition(DIGITS, 20, "dirichlet:0.001", seed=1)


def test_summarize_table() -> None:
    parts = partition(DIGITS, 5, "modulo", seed=1)
    table = summarize(DIGITS, parts, 10).splitlines()
    assert len(table) == 6 and len({len(line) for line in table}) == 1
    assert table[0].split() == ["node", "samples", *map(str, range(10))]
    assert table[1].split() == ["0", "348", "174", "0", "0", "0", "0", "174", "0", "0", "0", "0"]


def test_partition_names_match_the_specs() -> None:
    assert PARTITION_NAMES == ("iid", "modulo", "sorted", "shards", "dirichlet")
    for name in PARTITION_NAMES:
        spec = {"shards": "shards:1", "dirichlet": "dirichlet:1"}.get(name, name)
        check_parts(DIGITS, partition(DIGITS, 2, spec, seed=0), 2)
