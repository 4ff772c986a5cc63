"""The processes a test starts, owned by one object that stops them all on every outcome.

Every test that starts a process does it through a `ProcessGroup` (the `procs` fixture in
tests/conftest.py, or `with ProcessGroup() as group:` inside a module-scoped fixture):

    def test_something(procs: ProcessGroup) -> None:
        boot = procs.start(crossgrad("bootstrap", "--bind", "127.0.0.1:0", "--insecure"))
        address = boot.stdout.readline()...          # sync on what the child says, never sleep
        procs.signal(boot, signal.SIGTERM)           # the test's own signals, to the process...
        assert boot.wait(timeout=30) == 0
        # ...and when the test ends (pass, fail, error, Ctrl-C) every group left is stopped

What the group guarantees, and why:

* Each child leads its own session and process group (`start_new_session`), so that its own
  children (a demo's bootstrap and peers) can be found and stopped with it: `stop_all` sends
  SIGTERM to every group, waits `grace` seconds, then SIGKILL. A group whose leader exited but
  whose members live on is stopped too. Killing only the child, as `subprocess.run` does on a
  timeout, leaves its children running: that is how a demo was found still training 17 minutes
  after its test failed.
* Each child starts with SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGPIPE and SIGXFSZ at their default
  dispositions and unblocked, whatever the test run inherited. POSIX shells start a `cmd &` job
  with SIGINT and SIGQUIT ignored, `exec` keeps ignored signals ignored, and Python does not turn
  SIGINT into KeyboardInterrupt when it was ignored at start: without the reset, a Ctrl-C test
  passes in a terminal and fails in a background job. Signals cannot be reset between fork and
  exec without `preexec_fn` (unsafe with the gRPC threads of the test process), so the child
  first runs a few lines of Python (`python -I -S -c`: 20-50 ms) that reset them and exec the
  command under the same pid. A signal that reaches the child before its command runs is
  therefore lost or fatal: wait for a line from the child before signalling it.
* `cwd` defaults to the repository root, so that `python -m crossgrad` imports this checkout.
* stdin defaults to /dev/null, stdout and stderr to pipes, text mode. A long-lived child that
  writes more than a pipe holds (64 KiB) while nobody reads blocks: give it a log file instead.
* `run` is `subprocess.run(capture_output=True)` with a timeout that kills the whole group.

Use `as_background_job(args)` to start a command the way a shell starts `cmd &` (SIGINT and
SIGQUIT ignored), to test that a program sets the signal dispositions it relies on itself.
A child that starts a new session of its own leaves the group; the group cannot stop it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]

_DEFAULT_SIGNALS = ("SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGPIPE", "SIGXFSZ", "SIGXFZ")
# Runs in the child before its command: argv is [names, program path, *command].
_RESET_AND_EXEC = """\
import os, signal, sys
sigs = [getattr(signal, name) for name in sys.argv[1].split(",") if hasattr(signal, name)]
for sig in sigs:
    signal.signal(sig, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
os.execv(sys.argv[2], sys.argv[3:])
"""
_IGNORE_AND_EXEC = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGQUIT, signal.SIG_IGN)
os.execvp(sys.argv[1], sys.argv[1:])
"""
# start() sets these itself; letting a caller override them would break the guarantees above.
_OWNED_KWARGS = ("shell", "executable", "start_new_session", "process_group", "preexec_fn",
                 "restore_signals")
_POLL = 0.02  # s: how often stop_all looks whether a group's last member is gone


def crossgrad(*args: str) -> list[str]:
    """The command line of `python -m crossgrad ARGS` with this interpreter."""
    return [sys.executable, "-m", "crossgrad", *args]


def as_background_job(args: Sequence[str]) -> list[str]:
    """`args` started as a POSIX shell starts `args &` without job control: SIGINT and SIGQUIT
    ignored (POSIX.1-2017, Shell Command Language 2.11). Pass the result to `start`."""
    return [sys.executable, "-I", "-S", "-c", _IGNORE_AND_EXEC, *args]


class ProcessGroup:
    """Context manager owning every process a test starts."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, args: Sequence[str], *, cwd: Path | None = None,
              env: Mapping[str, str] | None = None, stdout: int | IO[Any] | None = subprocess.PIPE,
              stderr: int | IO[Any] | None = subprocess.PIPE, text: bool = True,
              **popen_kwargs: Any) -> subprocess.Popen[str]:
        """Start `args` in a new session and process group, with default signal dispositions,
        in `cwd` (default: the repository root); stop_all will stop it and its group."""
        owned = sorted(set(popen_kwargs) & set(_OWNED_KWARGS))
        if owned:
            raise TypeError(f"ProcessGroup.start sets {', '.join(owned)} itself; got "
                            f"{owned[0]}={popen_kwargs[owned[0]]!r}; drop it")
        if isinstance(args, str) or not args:
            raise TypeError(f"ProcessGroup.start expects the command as a non-empty list of "
                            f"arguments, got {args!r}; split it, e.g. with shlex.split")
        cwd = REPO if cwd is None else Path(cwd)
        program = _resolve(args[0], cwd, os.environ if env is None else env)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[str] = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RESET_AND_EXEC, ",".join(_DEFAULT_SIGNALS),
             program, *args],
            cwd=cwd, env=None if env is None else dict(env), stdout=stdout, stderr=stderr,
            text=text, start_new_session=True, **popen_kwargs)
        proc.args = list(args)  # what failure messages should show, not the reset lines
        self._procs.append(proc)
        return proc

    def run(self, args: Sequence[str], *, timeout: float, input: str | None = None,
            **start_kwargs: Any) -> subprocess.CompletedProcess[str]:
        """start(), wait and collect stdout and stderr, as subprocess.run(capture_output=True);
        past `timeout` the whole group is killed and subprocess.TimeoutExpired raised."""
        if input is not None:
            start_kwargs["stdin"] = subprocess.PIPE
        proc = self.start(args, **start_kwargs)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(proc, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def signal(self, proc: subprocess.Popen[Any], sig: int) -> None:
        """Send `sig` to `proc` only (not to its children); nothing if it was already reaped."""
        self._own(proc)
        proc.send_signal(sig)

    def signal_group(self, proc: subprocess.Popen[Any], sig: int) -> None:
        """Send `sig` to every process of `proc`'s group; nothing if the group is gone."""
        self._own(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every live group, wait up to `grace` s, then SIGKILL each group; reap all.

        Groups whose leader already exited but whose members live on are stopped too."""
        for proc in self._procs:
            proc.poll()  # reap exited leaders: a zombie leader keeps its group "alive"
        live = [proc for proc in self._procs if _group_alive(proc.pid)]
        for proc in live:
            self.signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            _wait_group(proc, deadline)
        for proc in live:
            if _group_alive(proc.pid) or proc.poll() is None:
                self.signal_group(proc, signal.SIGKILL)
        for proc in live:  # SIGKILL cannot be caught: this returns as soon as the kernel is done
            _wait_group(proc, time.monotonic() + 30.0)
        for proc in self._procs:
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def _own(self, proc: subprocess.Popen[Any]) -> None:
        # killpg(pid) on a process that does not lead its own group would signal another group,
        # perhaps the test runner's.
        if not any(proc is mine for mine in self._procs):
            raise ValueError(f"process {proc.pid} ({proc.args!r}) was not started by this "
                             f"ProcessGroup; start it with ProcessGroup.start")


def _resolve(program: str, cwd: Path, env: Mapping[str, str]) -> str:
    """The path the exec will run, checked here so that a typo fails in the test, as Popen does."""
    if os.sep in program:
        path = cwd / program
        found = str(path) if os.access(path, os.X_OK) and path.is_file() else None
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, f"no executable {program!r} (cwd {cwd}, PATH "
                                f"{env.get('PATH', os.defpath)})", program)
    return found


def _wait_group(proc: subprocess.Popen[Any], deadline: float) -> None:
    """Wait until `proc` exited and its group is empty, or until `deadline`."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(_POLL)  # members are not our children: nothing to wait on but the group


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. Zombies do not count: orphans wait there
    for their reaper, which is no business of this test."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():
        return True  # no /proc (not Linux): a zombie counts as alive
    for entry in proc_fs.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False
