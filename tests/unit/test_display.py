"""The live display fed snapshots (crossgrad.display, crossgrad.watch's conversions): rich's
recording console for the terminal view, a plain console for the log lines."""

from __future__ import annotations

import io
import math

from rich.console import Console

from crossgrad.display import DisplayMode, PeerRow, RunDisplay, Snapshot, state_label
from crossgrad.v1 import bootstrap_pb2, peer_pb2
from crossgrad.watch import rows_of_run

MIB = 2**20
SNAPSHOT = Snapshot(rows=(
    PeerRow(0, 12, loss=0.4321, accuracy=0.8125, evaluated=10, sent=3 * MIB, received=2 * MIB),
    PeerRow(1, 11, loss=0.5, accuracy=0.75, evaluated=10, sent=MIB, received=MIB // 2,
            state="waiting on neighbor 2"),
    PeerRow(2, 7, sent=MIB, received=MIB, state="down"),
), rounds=20, nodes=3)


def console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, record=True, width=120)


def written(console: Console) -> str:
    """Everything the console wrote, escape codes included."""
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_the_terminal_view_has_one_row_per_peer_and_a_progress_bar() -> None:
    term = console(terminal=True)
    with RunDisplay(term, title="demo: 3 peers") as display:
        assert display.mode is DisplayMode.LIVE
        display.update(SNAPSHOT)
    text = term.export_text()
    frame = text[text.rindex("demo: 3 peers"):]  # the live view redraws: its last frame
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in frame.splitlines() if line.startswith("│")}
    assert rows == {
        "0": ["12/20", "0.4321", "0.8125", "3.00 MiB", "2.00 MiB", "training"],
        "1": ["11/20", "0.5000", "0.7500", "1.00 MiB", "0.50 MiB", "waiting on neighbor 2"],
        "2": ["7/20", "-", "-", "1.00 MiB", "1.00 MiB", "down"],
    }
    bar = next(line for line in frame.splitlines() if line.startswith("rounds"))
    assert "━" in bar and "30/60" in bar and "ETA" in bar and "elapsed" in bar
    assert "\x1b[" in written(term)  # drawn in place, in colour


def test_off_a_terminal_plain_lines_one_per_evaluation_or_change_of_state() -> None:
    plain = console(terminal=False)
    with RunDisplay(plain) as display:
        assert display.mode is DisplayMode.PLAIN
        display.update(SNAPSHOT)  # first sight of every peer: three lines
        display.update(Snapshot(rows=(  # a round on, no evaluation: nothing new to log ...
            PeerRow(0, 13, loss=0.4, accuracy=0.8125, evaluated=10, sent=3 * MIB, received=0),
            PeerRow(1, 12, loss=0.5, accuracy=0.75, evaluated=10, state="training"),
            PeerRow(2, 7, state="down")), rounds=20, nodes=3))
        display.update(Snapshot(rows=(  # ... an evaluation and a peer back: two lines
            PeerRow(0, 15, loss=0.3, accuracy=0.875, evaluated=15, sent=4 * MIB, received=MIB),
            PeerRow(1, 15, loss=0.5, accuracy=0.75, evaluated=10),
            PeerRow(2, 8, state="resumed")), rounds=20, nodes=3))
    out = written(plain)
    assert "\x1b" not in out
    assert out.splitlines() == [
        "node 0  round 12/20  loss 0.4321  acc 0.8125  sent 3.00 MiB  recv 2.00 MiB  training",
        "node 1  round 11/20  loss 0.5000  acc 0.7500  sent 1.00 MiB  recv 0.50 MiB  "
        "waiting on neighbor 2",
        "node 2  round 7/20  loss -  acc -  sent 1.00 MiB  recv 1.00 MiB  down",
        "node 0  round 15/20  loss 0.3000  acc 0.8750  sent 4.00 MiB  recv 1.00 MiB  training",
        "node 2  round 8/20  loss -  acc -  sent -  recv -  resumed",
    ]


def test_quiet_shows_nothing() -> None:
    term = console(terminal=True)
    with RunDisplay(term, quiet=True) as display:
        display.note("bootstrap on 127.0.0.1:1")
        display.update(SNAPSHOT)
    assert written(term) == ""


def test_state_labels() -> None:
    assert state_label("TRAINING") == "training"
    assert state_label("TRAINING", waiting_on=[3]) == "waiting on neighbor 3"
    assert state_label("TRAINING", waiting_on=[1, 3]) == "waiting on neighbors 1, 3"
    assert state_label("TRAINING", resumed=True) == "resumed"
    assert state_label("DONE", resumed=True) == "done"
    assert state_label("TRAINING", waiting_on=[3], down=True) == "down"
    assert state_label("CATCHING_UP") == "catching up"
    assert state_label("SOMETHING_NEW") == "something_new"  # a newer peer's state, as it is


def test_rows_of_run_merge_the_bootstrap_and_each_peer() -> None:
    listed = bootstrap_pb2.ListPeersResponse(expected=4, peers=[
        bootstrap_pb2.PeerInfo(node_id=0, state="ACTIVE", round=9, loss=0.9),
        bootstrap_pb2.PeerInfo(node_id=1, state="EXPIRED", round=5, loss=0.7),
        bootstrap_pb2.PeerInfo(node_id=2, state="LEFT", round=20, loss=0.2),
        bootstrap_pb2.PeerInfo(node_id=3, state="ACTIVE", round=4, loss=math.nan)])
    statuses = {0: peer_pb2.PeerStatus(node_id=0, round=10, last_loss=0.8, last_accuracy=0.5,
                                       evaluated_round=10, bytes_sent=5, bytes_received=6,
                                       state="TRAINING", waiting_on=[3], resumes=1)}
    previous = {1: PeerRow(1, 4, sent=7, received=8), 2: PeerRow(2, 19, state="done")}
    rows = {r.node: r for r in rows_of_run(listed, statuses, previous)}
    assert rows[0] == PeerRow(0, 10, 0.8, 0.5, 10, 5, 6, "waiting on neighbor 3")
    assert rows[1] == PeerRow(1, 5, 0.7, sent=7, received=8, state="down")  # last figures kept
    assert rows[2].state == "done" and rows[2].round == 20  # finished, then left
    assert rows[3].state == "down" and math.isnan(rows[3].loss)  # listed but silent
    assert not Snapshot(tuple(rows.values()), rounds=20, nodes=4).finished


def test_a_peer_that_finished_between_two_looks_reads_done_at_the_last_round() -> None:
    """Its last heartbeat said round 28, then it ran to 60 and left "done": not "left" at 28."""
    listed = bootstrap_pb2.ListPeersResponse(
        expected=2, settings=bootstrap_pb2.RunSettings(rounds=60), peers=[
            bootstrap_pb2.PeerInfo(node_id=0, state="LEFT", round=28, health="left: done"),
            bootstrap_pb2.PeerInfo(node_id=1, state="LEFT", round=28, health="left: draining")])
    previous = {0: PeerRow(0, 28, state="training"), 1: PeerRow(1, 28, state="training")}
    rows = {r.node: r for r in rows_of_run(listed, {}, previous)}
    assert (rows[0].state, rows[0].round) == ("done", 60)
    assert (rows[1].state, rows[1].round) == ("left", 28)  # stopped: it did not finish
