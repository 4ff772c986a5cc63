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
from collections.abc import Mapping
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


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Every node of a run shares it."""

    nodes: int = 5  # N, the number of peers
    topology: str = "ring"  # ring, torus, full, regular:d, erdos-renyi:p, bipartite, file:PATH
    algorithm: str = "cga"  # dpsgd, cga, ngc
    dataset: str = "digits"  # digits is embedded (scikit-learn); others read --data-dir
    data_dir: str | None = None  # directory holding the data set's files
    partition: str = "modulo"  # iid, modulo, sorted, shards:c, dirichlet:a (ALGORITHMS.md)
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
    model_compressor: str = ""  # model messages: only "" / "none" (see docs/algorithms.md)

    def __post_init__(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", DEFAULT_MODEL.get(self.dataset, "mlp"))
        if not self.compressor:
            default = "sign" if self.algorithm.startswith("comp") else "none"
            object.__setattr__(self, "compressor", default)

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
    for name in ("nodes", "rounds", "batch_size", "eval_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; "
                              f"got {getattr(config, name)}")
    if not config.lr > 0:
        raise ConfigError(f"--lr must be positive; got {config.lr}")
    if not 0 < config.lr_decay <= 1:
        raise ConfigError(f"--lr-decay must be in (0, 1]; got {config.lr_decay}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1); got {config.momentum}")
    if config.margin < 0:
        raise ConfigError(f"--margin must be >= 0; got {config.margin}")
    if not 0 < config.gamma <= 1:
        raise ConfigError(f"--gamma must be in (0, 1]; got {config.gamma}")
    if not 0 <= config.alpha <= 1:
        raise ConfigError(f"--alpha must be in [0, 1]; got {config.alpha}")
    if config.model_compressor not in ("", "none"):
        raise ConfigError(
            f"--model-compressor {config.model_compressor} is refused: compressing model "
            "messages breaks the algorithms' mixing step (a node would average its exact model "
            "with its neighbors' lossy copies, and error feedback cannot repair a model that "
            "was never sent); it needs CHOCO-style replicas, which crossgrad does not have "
            "yet. Compress cross-gradients with --compressor instead")
    return config


def _coerce(field_type: Any, raw: Any, name: str) -> Any:
    """Turn a TOML or environment value into the field's type, or say what was expected."""
    kind = field_type if isinstance(field_type, str) else getattr(field_type, "__name__", "")
    try:
        if "int" in kind and "str" not in kind:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if "float" in kind:
            return float(raw)
        return None if raw in ("", None) and "None" in kind else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} expects a {kind.split(' ')[0]}; got {raw!r}") from None


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
        table = table.get("run", table)
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UnknownNameError("config key", key, known)
            values[name] = _coerce(known[name], raw, f"{path}: {key}")
    env = os.environ if environ is None else environ
    for name, ftype in known.items():
        var = f"CROSSGRAD_{name.upper()}"
        if var in env:
            values[name] = _coerce(ftype, env[var], var)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(RunConfig(**values))
