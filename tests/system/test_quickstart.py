"""README.md's quick start, run as written: the commands between the quickstart markers go to
bash one by one, with this interpreter's bin directory (the project's .venv/bin) first on PATH,
in a scratch directory that holds a copy of examples/, as a person who just cloned would run
them from the repository's root. A README that drifts from the CLI fails here."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from procs import REPO, ProcessGroup

TIMEOUT = 300.0  # s: importing torch and 20 rounds of 5 nodes on a busy 2-core machine
BLOCK = re.compile(r"<!-- quickstart\b.*?-->(.*?)<!-- /quickstart -->", re.S)
FENCE = re.compile(r"```sh\n(.*?)```", re.S)


def quickstart_commands(markdown: str) -> list[str]:
    """The commands of the marked block's sh fences, continuation lines joined, comments and
    blank lines left out."""
    blocks = BLOCK.findall(markdown)
    assert len(blocks) == 1, "README.md needs exactly one <!-- quickstart --> block"
    commands: list[str] = []
    for fence in FENCE.findall(blocks[0]):
        joined = re.sub(r"\\\n\s*", "", fence)
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
    return commands


COMMANDS = quickstart_commands((REPO / "README.md").read_text())
# Trainings take more than a few seconds: they run with the slow tests (CI runs those).
SLOW = ("simulate", "demo")


def marked(command: str) -> object:
    slow = any(f"crossgrad {word}" in command for word in SLOW)
    return pytest.param(command, marks=[pytest.mark.slow] if slow else [], id=command[:60])


def test_the_quick_start_has_a_training_and_only_crossgrad_commands() -> None:
    assert any("crossgrad simulate" in c for c in COMMANDS), COMMANDS
    assert all(c.startswith("crossgrad ") for c in COMMANDS), COMMANDS


def check_output(command: str, stdout: str, cwd: Path) -> None:
    """What each kind of command must have said or written, beyond exit code 0."""
    out_dir = re.search(r"--out (\S+)", command)
    if command == "crossgrad --help":
        for word in ("simulate", "peer", "bootstrap", "certs", "status"):
            assert word in stdout
    elif command.startswith("crossgrad simulate"):
        assert "average model accuracy" in stdout and "round    20/20" in stdout, stdout
        assert out_dir is not None, "a quick-start simulation names its --out"
        summary = json.loads((cwd / out_dir.group(1) / "summary.json").read_text())
        assert summary, "summary.json is empty"
    elif command.startswith("crossgrad certs"):
        assert out_dir is not None
        assert (cwd / out_dir.group(1) / "ca.pem").exists() and "wrote" in stdout


@pytest.mark.parametrize("command", [marked(c) for c in COMMANDS])
def test_quick_start_command_runs_as_written(procs: ProcessGroup, tmp_path: Path,
                                             command: str) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = procs.run(["bash", "-c", command], timeout=TIMEOUT, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{command}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    check_output(command, proc.stdout, tmp_path)
