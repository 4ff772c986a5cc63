"""The real `crossgrad simulate` seen through a pipe (plain lines, one per evaluation, no escape
codes), with --quiet (the final table alone), and in a pseudo-terminal (the live table)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import termios
from pathlib import Path

import pytest

from procs import ProcessGroup, crossgrad

TIMEOUT = 120.0  # s: importing torch and 20 rounds on a busy 2-core machine
RUN = ("simulate", "--rounds", "20", "--eval-every", "5", "--batch-size", "16")
EVALUATION = re.compile(r"round +(\d+)/20  train loss \d\.\d{4}  test acc mean \d\.\d{4} ")


def test_through_a_pipe_one_plain_line_per_evaluation(procs: ProcessGroup,
                                                      tmp_path: Path) -> None:
    proc = procs.run(crossgrad(*RUN, "--out", str(tmp_path / "run")), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    evaluations = [m.group(1) for m in map(EVALUATION.match, proc.stdout.splitlines()) if m]
    assert evaluations == ["5", "10", "15", "20"], proc.stdout
    assert "┃" not in proc.stdout and "━" not in proc.stdout  # no live table, no bar
    assert "average model accuracy" in proc.stdout  # the final table


def test_quiet_keeps_only_the_final_table(procs: ProcessGroup, tmp_path: Path) -> None:
    proc = procs.run(crossgrad(*RUN, "--rounds", "5", "--quiet", "--out", str(tmp_path / "r")),
                     timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["node", "test", "acc", "test", "loss", "QP", "fallbacks"]
    assert lines[-1].startswith("rounds 5,")


@pytest.mark.slow  # a second simulate run: 5 s on an idle machine, 15 s on a busy one
def test_in_a_terminal_a_live_table_of_every_node_and_a_progress_bar(
        procs: ProcessGroup, tmp_path: Path) -> None:
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, cols
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = procs.start(crossgrad(*RUN, "--out", str(tmp_path / "run")), stdout=child, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=TIMEOUT) == 0
    screen = b"".join(chunks).decode()
    assert "\x1b[" in screen  # drawn in place
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    frame = text[text.rindex("simulate: cga"):]  # the last frame of the live view
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in frame.splitlines()
            if line.startswith("│")]
    assert [r[0] for r in rows[:5]] == ["0", "1", "2", "3", "4"], frame
    for _, round_, loss, acc, sent, received, state in rows[:5]:
        assert round_ == "20/20" and state == "done"
        assert re.fullmatch(r"\d\.\d{4}", loss) and re.fullmatch(r"\d\.\d{4}", acc)
        assert sent.endswith(" MiB") and float(received.split()[0]) > 0
    bar = next(line for line in frame.splitlines() if line.startswith("rounds"))
    assert "100/100" in bar and "ETA" in bar
