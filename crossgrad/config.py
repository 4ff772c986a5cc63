"""Run configuration: one frozen dataclass, validated once, early.

Precedence: defaults < TOML file (--config) < environment (CROSSGRAD_<FIELD>, e.g.
CROSSGRAD_ROUNDS=50) < command-line flags. The effective configuration is logged at start and
saved beside the metrics and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from crossgrad.errors import ConfigError, UnknownNameError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = {"digits": "mlp", "mnist": "cnn5", "fashion-mnist": "cnn5", "cifar10": "resnet20"}
DEVICES = ("auto", "cpu", "cuda")
# Layout of the gradient passes (peer/training/layout.py); auto: a fixed rule per device and model.
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

# What each numeric setting allows, as a test and in words. One table, so that a flag, an
# environment variable and a key of a config file are refused with the same words.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "nodes": (lambda v: v >= 1, "at least 1"),
    "rounds": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "eval_every": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "positive"),
    "lr_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "margin": (lambda v: v >= 0, ">= 0"),
    "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "consensus_step": (lambda v: 0 <= v <= 1, "in (0, 1], or 0 for no replicas"),
}
# Tables of a config file that other readers own (crossgrad.security.read_security_table).
OTHER_TABLES = ("security",)


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Every node of a run shares it."""

    nodes: int = 5  # N, the number of peers
    topology: str = "ring"  # ring, torus, full, regular:d, erdos-renyi:p, bipartite, file:PATH
    algorithm: str = "cga"  # dpsgd, cga, ngc
    dataset: str = "digits"  # digits is embedded (scikit-learn); others read --data-dir
    data_dir: str | None = None  # directory holding the data set's files
    partition: str = "modulo"  # iid, modulo, sorted, shards:c, dirichlet:a (docs/algorithms.md)
    model: str = ""  # empty: the data set's default (DEFAULT_MODEL)
    rounds: int = 300  # communication rounds; each is one local step per node
    batch_size: int = 32  # samples per node per round (CGA code 128, NGC code 32)
    lr: float = 0.01  # initial learning rate (both papers' default)
    lr_decay: float = 0.981  # multiplied in once per local epoch (CGA code)
    momentum: float = 0.9  # Nesterov momentum mu (both papers)
    margin: float = 0.5  # CGA's QP margin on the dual variables (CGA code)
    gamma: float = 0.1  # NGC's consensus step size (NGC code)
    alpha: float = 1.0  # NGC's data-variant weight; 0 skips the cross-gradient round
    seed: int = 123  # run seed: model init, partitions, batches (CGA code's seed)
    device: str = "auto"  # auto uses a GPU when there is one
    eval_every: int = 25  # rounds between evaluations on the test set (and the last round)
    compressor: str = ""  # cross-gradient compressor ("": none for cga/ngc, sign for comp*)
    model_compressor: str = ""  # model updates under replicas ("": none; docs/algorithms.md)
    consensus_step: float = 0.0  # gamma_c of the replicas' gossip; 0: no replicas (simulator)
    # compcga / compngc: ef (error feedback), ef21 or clag:Z (three-point compressors, shared
    # estimates on both ends of a link; docs/algorithms.md); simulate only for now
    feedback: str = "ef"
    # Layout of every gradient pass: auto (channels_last for the conv models but vgg11 on a CPU:
    # faster, same gradients within 1e-5), contiguous (PyTorch's default) or channels_last. A
    # run setting: every node takes the same path, so runs stay bit-identical
    # (peer/training/layout.py)
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", DEFAULT_MODEL.get(self.dataset, "mlp"))
        if not self.compressor:
            default = "sign" if self.algorithm.startswith("comp") else "none"
            object.__setattr__(self, "compressor", default)
        if not self.memory_format:  # a bootstrap from before the setting sends ""
            object.__setattr__(self, "memory_format", "auto")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def validate(config: RunConfig) -> RunConfig:
    """Check values against their ranges; raise ConfigError.

    The names that registries own (algorithm, data set, model, topology, compressor) are checked
    by peer.builder.validate_names: the registries live in peer/ and bootstrap/, which this
    shared kernel never imports. Every composition root (the CLI, a starting peer) runs both,
    through peer.builder.validate_config or peer.builder.load_config.
    """
    if config.device not in DEVICES:
        raise UnknownNameError("device", config.device, DEVICES)
    if config.memory_format not in MEMORY_FORMATS:
        raise UnknownNameError("memory format", config.memory_format, MEMORY_FORMATS)
    for name, (allowed, words) in RANGES.items():
        if not allowed(getattr(config, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {words}; "
                              f"got {getattr(config, name)}")
    if uses_replicas(config) and config.consensus_step == 0:
        raise ConfigError(
            f"--model-compressor {config.model_compressor} needs --consensus-step G in (0, 1]: "
            "compressed models travel as updates of replicas, gossiped with step size G "
            "(CHOCO uses 0.2-0.6 with top-k keeping 1-5%; docs/algorithms.md, \"Compressed "
            "models: replicas\")")
    return config


def uses_replicas(config: RunConfig) -> bool:
    """Model replicas (docs/algorithms.md, "Compressed models: replicas"): a model compressor
    other than none, or a consensus step; `none` with a consensus step keeps exact replicas."""
    return config.model_compressor not in ("", "none") or config.consensus_step > 0


_KIND_WORDS = {"int": "an integer", "float": "a number", "str": "a string"}


def _coerce(field_type: Any, raw: Any, name: str) -> Any:
    """Turn a TOML or environment value into the field's type, or say what was expected.

    Booleans are refused for numbers (TOML's `true` is not 1 here), and numbers for strings (a
    file that says `algorithm = 5` has a typo, not a name)."""
    kind = field_type if isinstance(field_type, str) else getattr(field_type, "__name__", "")
    base = kind.split(" ")[0]
    try:
        if isinstance(raw, bool):
            raise ValueError
        if "int" in kind and "str" not in kind:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if "float" in kind:
            return float(raw)
        if raw in ("", None) and "None" in kind:
            return None
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except (TypeError, ValueError):
        raise ConfigError(f"{name} expects {_KIND_WORDS.get(base, base)}; got {raw!r}") from None


def _check(name: str, value: Any, where: str) -> Any:
    """Refuse a value of a file or the environment where it was written, before the flags are
    merged in: `run.toml: lr = -1.0 is out of range; lr must be positive`."""
    if name in RANGES:
        allowed, words = RANGES[name]
        if not allowed(value):
            raise ConfigError(f"{where} = {value!r} is out of range; "
                              f"{name.replace('_', '-')} must be {words}")
    if name == "device" and value not in DEVICES:
        raise ConfigError(f"{where} = {value!r} is not a device; known devices: "
                          f"{', '.join(DEVICES)}")
    if name == "memory_format" and value not in MEMORY_FORMATS:
        raise ConfigError(f"{where} = {value!r} is not a memory format; known formats: "
                          f"{', '.join(MEMORY_FORMATS)}")
    return value


def _run_table(document: Mapping[str, Any], path: Path) -> Mapping[str, Any]:
    """The run settings of a config file: its [run] table, or its top level when it has none.

    Beside a [run] table, a top-level setting would be silently ignored, so it is refused."""
    if "run" not in document:
        return {k: v for k, v in document.items() if k not in OTHER_TABLES}
    stray = sorted(k for k in document if k not in ("run", *OTHER_TABLES))
    if stray:
        raise ConfigError(f"{path}: {', '.join(stray)} outside [run] would be ignored; move "
                          f"{'it' if len(stray) == 1 else 'them'} under [run]")
    if not isinstance(document["run"], Mapping):
        raise ConfigError(f"{path}: run must be a table ([run]); got {document['run']!r}")
    return document["run"]


def load(overrides: Mapping[str, Any], config_file: str | None = None,
         environ: Mapping[str, str] | None = None) -> RunConfig:
    """defaults < TOML file < CROSSGRAD_* environment < overrides (flags given on the CLI),
    checked by validate (ranges; peer.builder.load_config adds the registry names)."""
    known = {f.name: f.type for f in fields(RunConfig)}
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            table = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, raw in _run_table(table, path).items():
            name = key.replace("-", "_")
            if name not in known:
                raise UnknownNameError("config key", key, known, where=str(path))
            values[name] = _check(name, _coerce(known[name], raw, f"{path}: {key}"),
                                  f"{path}: {key}")
    env = os.environ if environ is None else environ
    for name, ftype in known.items():
        var = f"CROSSGRAD_{name.upper()}"
        if var in env:
            values[name] = _check(name, _coerce(ftype, env[var], var), var)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(RunConfig(**values))
