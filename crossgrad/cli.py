"""The `crossgrad` command.

    crossgrad simulate [--nodes N --topology T --algorithm A --dataset D --partition P ...]

Bad input (unknown names, impossible settings, missing data files) ends in one line on stderr
and exit code 2, never a traceback. Choices shown in --help come from the registries.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from crossgrad.config import DEVICES, RunConfig, load
from crossgrad.errors import ConfigError, DataError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _help(name: str) -> str:
    from bootstrap.topology import TOPOLOGY_NAMES
    from peer.algorithms import ALGORITHMS
    from peer.training.datasets import DATASETS
    from peer.training.models import MODELS
    from peer.training.partitions import PARTITION_NAMES

    default = getattr(RunConfig(), name)
    known = {
        "algorithm": sorted(ALGORITHMS), "dataset": sorted(DATASETS), "model": sorted(MODELS),
        "topology": list(TOPOLOGY_NAMES), "partition": list(PARTITION_NAMES),
        "device": list(DEVICES),
    }.get(name)
    text = f"default {default!r}" if default not in ("", None) else "default: per data set"
    return f"one of {', '.join(known)}; {text}" if known else text


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; None means 'not given', so TOML and env can fill it."""
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        ftype = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, dest=f.name, type=ftype, default=None, help=_help(f.name))
    parser.add_argument("--config", help="TOML file with run settings (flags override it)")


def build_parser() -> Parser:
    parser = Parser(prog="crossgrad", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sim = sub.add_parser("simulate", help="run every node of a run in this process")
    add_run_flags(sim)
    sim.add_argument("--out", type=Path, default=None,
                     help="run directory for metrics and models (default runs/<timestamp>-...)")
    sim.add_argument("--quiet", action="store_true", help="print only the final table")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {f.name: getattr(args, f.name) for f in fields(RunConfig)}


def cmd_simulate(args: argparse.Namespace) -> int:
    from peer import simulate

    config = load(_overrides(args), args.config)
    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    result = simulate.run(config, args.out, progress=say)
    print(simulate.table(result), flush=True)
    return 0


COMMANDS = {"simulate": cmd_simulate}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as exc:
        print(f"crossgrad {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"crossgrad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
