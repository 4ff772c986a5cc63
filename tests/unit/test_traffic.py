"""Bytes on the wire per link and per message kind (peer/metrics.py, Traffic) and how
`crossgrad status` shows them (crossgrad/status.py, format_peer): no sockets.

Every view of one Traffic adds up whichever way it is read: over kinds to the link, over links
to the kind, and both to the totals; the known kinds are always listed, zeros included.
"""

from __future__ import annotations

import threading

from crossgrad.status import format_peer, kind_columns
from crossgrad.v1 import peer_pb2
from peer.metrics import KINDS, Traffic, kind_totals, kinds_json, pair_sum
from peer.service import PeerOptions, PeerRuntime


def sample() -> Traffic:
    t = Traffic()
    t.add_sent(2, "model", 1000)
    t.add_sent(2, "model", 500)
    t.add_received(2, "model", 1400)
    t.add_received(2, "cross_gradient", 70)
    t.add_sent(1, "cross_gradient", 90)
    t.add_received(1, "model", 1400)
    return t


def test_views_add_up_to_the_totals() -> None:
    t = sample()
    per_link = t.per_link()
    assert list(per_link) == [1, 2]  # sorted by peer
    assert per_link[2] == {"cross_gradient": (0, 70), "model": (1500, 1400)}
    assert per_link[1] == {"cross_gradient": (90, 0), "model": (0, 1400)}
    assert t.per_peer() == {1: (90, 1400), 2: (1500, 1470)}
    assert t.per_kind() == kind_totals(per_link) == {"cross_gradient": (90, 70),
                                                     "model": (1500, 2800)}
    assert t.totals() == (1590, 2870)
    assert pair_sum(t.per_kind().values()) == pair_sum(t.per_peer().values()) == t.totals()
    assert kinds_json(t.per_kind()) == {"cross_gradient": {"sent": 90, "received": 70},
                                        "model": {"sent": 1500, "received": 2800}}


def test_known_kinds_are_always_listed_and_others_sorted_in() -> None:
    empty = Traffic()
    assert empty.per_link() == {}
    assert empty.per_kind() == {k: (0, 0) for k in sorted(KINDS)}
    assert empty.totals() == (0, 0)

    t = Traffic()
    t.add_received(3, "model", 10)  # a dpsgd node: models only
    t.add_sent(3, "a_new_kind", 5)
    assert list(t.per_kind()) == sorted(["model", "cross_gradient", "a_new_kind"])
    assert t.per_kind()["cross_gradient"] == (0, 0)
    assert t.per_link()[3] == {"a_new_kind": (5, 0), "cross_gradient": (0, 0), "model": (0, 10)}
    assert [label for _, label in kind_columns(t.per_kind())] == ["model", "xgrad",
                                                                  "a_new_kind"]


def test_counting_from_many_threads_loses_nothing() -> None:
    t = Traffic()

    def count(peer: int) -> None:
        for _ in range(2000):
            t.add_sent(peer, "model", 3)
            t.add_received(peer, "cross_gradient", 1)

    threads = [threading.Thread(target=count, args=(p % 3,)) for p in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.totals() == (8 * 2000 * 3, 8 * 2000)
    assert t.per_kind() == {"cross_gradient": (0, 8 * 2000), "model": (8 * 2000 * 3, 0)}


def status_of(t: Traffic) -> peer_pb2.PeerStatus:
    """What a runtime counting `t` answers to GetStatus (no server, no node), with the
    assignment fields filled in as a node would fill them."""
    runtime = PeerRuntime(PeerOptions(node_id=0, bootstrap="unused:1"))
    runtime.traffic = t
    status = runtime.status()
    status.neighbor_ids.extend([2, 1])
    status.weights.update({1: 0.25, 2: 0.25})
    status.self_weight = 0.5
    return status


def test_get_status_reports_links_and_kinds_from_one_view() -> None:
    status = status_of(sample())
    assert [link.peer_id for link in status.links] == [1, 2]
    assert [k.kind for k in status.kinds] == ["cross_gradient", "model"]
    assert [(k.sent_bytes, k.received_bytes) for k in status.kinds] == [(90, 70), (1500, 2800)]
    assert (status.bytes_sent, status.bytes_received) == (1590, 2870)
    for link in status.links:
        assert [k.kind for k in link.kinds] == ["cross_gradient", "model"]
        assert link.sent_bytes == sum(k.sent_bytes for k in link.kinds)
        assert link.received_bytes == sum(k.received_bytes for k in link.kinds)


def test_the_status_table_shows_bytes_per_neighbor_and_kind() -> None:
    t = Traffic()
    t.add_sent(2, "model", 3 * 2**20)
    t.add_received(2, "model", 2 * 2**20)
    t.add_received(2, "cross_gradient", 2**19)
    t.add_received(1, "model", 2**20)
    t.add_sent(5, "cross_gradient", 2**18)  # a former neighbor: no weight, still counted
    lines = format_peer(status_of(t)).splitlines()
    head = lines.index(next(line for line in lines if line.strip().startswith("neighbor")))
    assert lines[head].split() == ["neighbor", "weight", "sent", "MiB", "recv", "MiB", "model",
                                   "sent", "model", "recv", "xgrad", "sent", "xgrad", "recv"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[head + 1:]}
    assert list(rows) == ["2", "1", "5", "all"]  # assignment order, former neighbors, total
    assert rows["2"] == ["0.2500", "3.00", "2.50", "3.00", "2.00", "0.00", "0.50"]
    assert rows["1"] == ["0.2500", "0.00", "1.00", "0.00", "1.00", "0.00", "0.00"]
    assert rows["5"] == ["-", "0.25", "0.00", "0.00", "0.00", "0.25", "0.00"]
    assert rows["all"] == ["3.25", "3.50", "3.00", "3.00", "0.25", "0.50"]
    assert "bytes sent 3.25 MiB, received 3.50 MiB" in lines[2]
