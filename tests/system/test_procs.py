"""tests/procs.py, the helper every process-starting test uses: what it stops, and the signal
dispositions its children start with. Real processes (Python one-liners and cat), no mocks."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from procs import REPO, ProcessGroup, as_background_job

PY = sys.executable
# A child that says "ready" once its handlers are in place, then blocks until killed.
IGNORES_SIGTERM = ("import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('ready', flush=True); signal.pause()")
# A child that starts a grandchild ignoring SIGTERM, says its pid, and exits (unless told to
# wait): the grandchild stays in the child's process group.
STARTS_GRANDCHILD = (
    "import signal, subprocess, sys; "
    f"g = subprocess.Popen([sys.executable, '-c', {IGNORES_SIGTERM!r}], stdout=subprocess.PIPE,"
    " text=True); g.stdout.readline(); print(g.pid, flush=True); "
    "signal.pause() if sys.argv[1:] == ['wait'] else None")


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def gone_within(pid: int, seconds: float) -> bool:
    """Whether `pid` has ended (or is a zombie) within `seconds`: waits on a pidfd, which
    becomes readable when the process terminates."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True  # already gone
    try:
        readable, _, _ = select.select([fd], [], [], seconds)
        return bool(readable) or not running(pid)
    finally:
        os.close(fd)


def test_a_child_that_ignores_sigterm_is_killed(procs: ProcessGroup) -> None:
    child = procs.start([PY, "-c", IGNORES_SIGTERM])
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    procs.stop_all(grace=0.5)
    assert child.returncode == -signal.SIGKILL  # SIGTERM was ignored: SIGKILL after the grace


def test_grandchildren_are_killed_after_their_parent_exited(procs: ProcessGroup) -> None:
    child = procs.start([PY, "-c", STARTS_GRANDCHILD])
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    assert child.wait(timeout=30) == 0 and running(grandchild)  # the leader is gone, not its group
    procs.stop_all(grace=0.5)
    assert not running(grandchild)


def test_signal_reaches_the_process_and_signal_group_its_whole_group(
        procs: ProcessGroup) -> None:
    child = procs.start([PY, "-c", STARTS_GRANDCHILD, "wait"])
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    procs.signal(child, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert running(grandchild)  # signal() is for the process only
    procs.signal_group(child, signal.SIGKILL)
    procs.stop_all(grace=0.0)  # nothing left to stop; it only checks and reaps
    assert not running(grandchild)


def test_children_start_with_default_signals_when_the_run_ignores_sigint(
        procs: ProcessGroup) -> None:
    """The test run started as `pytest &` (SIGINT and SIGQUIT ignored): a child started through
    ProcessGroup still has SIGINT at its default and dies of it."""
    script = f"""\
import json, signal, subprocess, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from procs import ProcessGroup
with ProcessGroup() as group:
    status = group.run(["cat", "/proc/self/status"], timeout=30).stdout
    child = group.start([sys.executable, "-c", "print('ready', flush=True); input()"],
                        stdin=subprocess.PIPE)
    child.stdout.readline()
    group.signal(child, signal.SIGINT)
    code = child.wait(timeout=30)
print(json.dumps({{"own": signal.getsignal(signal.SIGINT) == signal.SIG_IGN, "code": code,
                  "ignored": [line for line in status.splitlines() if line.startswith("SigIgn")],
                  "blocked": [line for line in status.splitlines() if line.startswith("SigBlk")]}}))
"""
    result = procs.run(as_background_job([PY, "-c", script]), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["own"], "the checking process should have started with SIGINT ignored"
    assert report["code"] == -signal.SIGINT  # Python's KeyboardInterrupt ends as death by SIGINT
    ignored, blocked = (int(line.split()[1], 16) for line in report["ignored"] + report["blocked"])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGPIPE):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} ignored in the child"
        assert not blocked & (1 << (sig - 1)), f"{sig.name} blocked in the child"


def test_run_kills_the_whole_group_on_timeout(procs: ProcessGroup) -> None:
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        procs.run([PY, "-c", STARTS_GRANDCHILD, "wait"], timeout=3)
    assert raised.value.stdout is not None
    # the grandchild went with its parent: SIGKILL is delivered at once, but the kernel may take
    # a moment to tear the process down on a loaded machine
    assert gone_within(int(raised.value.stdout), seconds=10)


def test_a_process_from_elsewhere_is_refused(procs: ProcessGroup) -> None:
    """killpg on a process that does not lead its own group would hit another group."""
    other = ProcessGroup()
    with other:
        child = other.start([PY, "-c", "input()"], stdin=subprocess.PIPE)
        with pytest.raises(ValueError, match="not started by this ProcessGroup"):
            procs.signal_group(child, signal.SIGTERM)


def test_bad_commands_fail_in_the_test(procs: ProcessGroup) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-program"):
        procs.start(["no-such-program"])
    with pytest.raises(TypeError, match="drop it"):
        procs.start([PY, "-c", "pass"], start_new_session=False)
    with pytest.raises(TypeError, match="list of arguments"):
        procs.start(f"{PY} -c pass")


def test_cwd_defaults_to_the_repository_root(procs: ProcessGroup) -> None:
    result = procs.run([PY, "-c", "import os; print(os.getcwd())"], timeout=30)
    assert Path(result.stdout.strip()) == REPO
