#!/usr/bin/env python3
"""Set-up and everyday commands, with nothing but a Python >= 3.10 to start from.

    python3 dev.py demo [ARGS...]       create .venv if needed, then `crossgrad demo ARGS`
    python3 dev.py simulate [ARGS...]   create .venv if needed, then `crossgrad simulate ARGS`
    python3 dev.py test [PYTEST ARGS]   create .venv if needed, then ruff, mypy and pytest

The virtual environment is (re)installed when pyproject.toml changes. torch is installed first,
pinned (CROSSGRAD_TORCH overrides the pin), so that the project's torch range never pulls a
multi-GB CUDA build where a CPU build is at hand.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".crossgrad-installed"
TORCH = os.environ.get("CROSSGRAD_TORCH", "torch==2.13.0")


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PY.exists():
        return
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "--quiet", TORCH)
    run(PY, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "simulate", "test", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    command, rest = argv[0], argv[1:]
    try:
        if command in ("demo", "simulate"):
            run(BIN / "crossgrad", command, *rest)
        elif command == "test":
            run(BIN / "ruff", "check", ".")
            run(BIN / "mypy")
            run(PY, "-m", "pytest", *rest)
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
