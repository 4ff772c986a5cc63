"""Build the pieces of a run from a RunConfig: data, partitions, topology, and each node.

The simulator builds all nodes in one process; a networked peer builds only its own, from the
same config and its assignment. Both call these functions, so both start from the same state.

Being the composition root that knows every registry, the builder also checks a config's
names against them (validate_names): crossgrad.config checks ranges only, since the shared
kernel imports neither peer/ nor bootstrap/. validate_config and load_config do both, and are
what the CLI and a starting peer call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bootstrap.topology import Topology, build_topology, metropolis_hastings_weights
from crossgrad.config import RunConfig, load, uses_replicas, validate
from crossgrad.errors import ConfigError, UnknownNameError
from peer import algorithms
from peer.compression import ErrorFeedback
from peer.compression import make as make_compressor
from peer.compression.threepoint import ThreePoint, parse_feedback
from peer.node import Node
from peer.replicas import Replicas
from peer.rounds import Assignment
from peer.training.datasets import DATASETS, Dataset, load_dataset
from peer.training.layout import resolve_memory_format
from peer.training.models import MODELS, make_model
from peer.training.partitions import partition
from peer.training.trainer import Schedule, Trainer, seeded_model

THREE_POINT = ("compcga", "compngc")  # the algorithms --feedback ef21 / clag:Z applies to


def validate_names(config: RunConfig) -> RunConfig:
    """Check every name of `config` against the registry that builds it: the algorithm, the data
    set, the model, the topology (with its parameters and the node count) and the compressor
    (with k or s). Raises ConfigError; an unknown name lists the known ones."""
    if config.algorithm not in algorithms.ALGORITHMS:
        raise UnknownNameError("algorithm", config.algorithm, algorithms.ALGORITHMS)
    if config.dataset not in DATASETS:
        raise UnknownNameError("dataset", config.dataset, DATASETS)
    if config.model not in MODELS:
        raise UnknownNameError("model", config.model, MODELS)
    build_topology(config.topology, config.nodes, config.seed)
    make_compressor(config.compressor)
    if parse_feedback(config.feedback).three_point and config.algorithm not in THREE_POINT:
        raise ConfigError(f"--feedback {config.feedback} applies to {' and '.join(THREE_POINT)} "
                          f"(compressed cross-gradients), not to {config.algorithm}; drop it "
                          "or pick one of those")
    if config.model_compressor:
        make_compressor(config.model_compressor)
    return config


def validate_config(config: RunConfig) -> RunConfig:
    """crossgrad.config.validate (ranges), then validate_names: the whole check, once, early."""
    return validate_names(validate(config))


def load_config(overrides: Mapping[str, Any], config_file: str | None = None,
                environ: Mapping[str, str] | None = None) -> RunConfig:
    """crossgrad.config.load (defaults < TOML < environment < flags, ranges checked), then
    validate_names: what the CLI runs before it starts anything."""
    return validate_names(load(overrides, config_file, environ))


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU; cuda without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; "
                          "use --device auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class RunData:
    """The data set and every node's share of it (indices into the training set)."""

    dataset: Dataset
    parts: list[np.ndarray]


def load_run_data(config: RunConfig) -> RunData:
    dataset = load_dataset(config.dataset, config.data_dir)
    labels = dataset.train_y.numpy()
    if config.nodes > len(labels):
        raise ConfigError(f"--nodes {config.nodes} is more than the {len(labels)} training "
                          f"samples of {config.dataset}; use fewer nodes")
    parts = partition(labels, config.nodes, config.partition, config.seed,
                      num_classes=dataset.num_classes)
    return RunData(dataset=dataset, parts=parts)


def assignments(config: RunConfig) -> tuple[Topology, dict[int, Assignment]]:
    """Neighbors and Metropolis-Hastings weights of every node (what the bootstrap hands out)."""
    topo = build_topology(config.topology, config.nodes, config.seed)
    w = metropolis_hastings_weights(topo)  # (n, n)
    out = {}
    for i in range(config.nodes):
        nbrs = tuple(topo.neighbors(i))
        out[i] = Assignment(neighbors=nbrs, weights={l: float(w[i, l]) for l in (*nbrs, i)})
    return topo, out


def make_node(config: RunConfig, data: RunData, node_id: int, assignment: Assignment,
              device: torch.device) -> Node:
    ds = data.dataset
    model = seeded_model(lambda: make_model(config.model, ds.input_shape, ds.num_classes),
                         config.seed)
    idx = torch.as_tensor(data.parts[node_id])
    trainer = Trainer(node_id, model, ds.train_x[idx], ds.train_y[idx],
                      Schedule(config.batch_size, config.lr, config.lr_decay), config.seed, device,
                      resolve_memory_format(config.memory_format, config.model, device))
    hp = algorithms.Hyperparameters(momentum=config.momentum, margin=config.margin,
                                    gamma=config.gamma, alpha=config.alpha,
                                    compressor=config.compressor, feedback=config.feedback)
    algo = algorithms.make(config.algorithm, hp)
    params = [p.detach() for p in model.parameters()]
    replicas = (Replicas(node_id, make_compressor(config.model_compressor or "none"),
                         config.consensus_step, params, assignment.neighbors)
                if uses_replicas(config) else None)  # model updates (peer/replicas.py)
    rule = parse_feedback(config.feedback)
    if rule.three_point:  # EF21 / CLAG: estimates on both ends (peer/compression/threepoint.py)
        return Node(node_id, trainer, algo, assignment, params, replicas=replicas,
                    threepoint=ThreePoint(make_compressor(config.compressor), rule))
    feedback = (None if config.compressor == "none"
                else ErrorFeedback(make_compressor(config.compressor)))
    return Node(node_id, trainer, algo, assignment, params, feedback=feedback, replicas=replicas)
