"""The final table's marks: what happened to each node (crossgrad.demo.node_marks)."""

from __future__ import annotations

from crossgrad.demo import node_marks
from crossgrad.v1 import bootstrap_pb2

DONE = {"round": 300, "rounds": 300, "resumes": 0}


def test_a_node_without_results_is_dead() -> None:
    assert node_marks(None, None) == "dead"
    assert node_marks(None, bootstrap_pb2.PeerInfo(state="EXPIRED")) == "dead"


def test_marks_say_done_stopped_resumed_and_returned() -> None:
    assert node_marks(DONE, bootstrap_pb2.PeerInfo(state="LEFT")) == "done"
    assert node_marks({**DONE, "round": 120}, None) == "stopped"
    assert node_marks({**DONE, "resumes": 1}, bootstrap_pb2.PeerInfo(state="LEFT", returns=1,
                                                                     resumes=1)) == \
        "done,resumed,returned"
    # expired at the bootstrap but its results are there: it died after writing them
    assert node_marks(DONE, bootstrap_pb2.PeerInfo(state="EXPIRED")) == "dead,done"
