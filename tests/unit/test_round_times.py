"""The round-time histograms (peer/metrics.py, RoundTimes) and the Prometheus helpers that
turn plain numbers into families (crossgrad/exporter.py), with no network but where a port
is the point."""

from __future__ import annotations

import socket

import pytest

from crossgrad.demo import metrics_flags
from crossgrad.errors import ConfigError
from crossgrad.exporter import MetricsEndpoint, histogram, metrics_host
from peer.metrics import RoundTimes, Tally


def test_round_times_count_each_round_and_phase_in_its_bucket() -> None:
    times = RoundTimes(bounds=(0.1, 1.0))
    times.observe(0.05, {"compute": 0.04, "wait": 0.01})
    times.observe(0.5, {"compute": 0.1, "wait": 0.4})
    times.observe(3.0, {"compute": 2.0, "wait": 1.0})
    assert times.rounds() == Tally((0.1, 1.0), (1, 1, 1), 3.55)
    phases = times.phases()
    assert phases["compute"] == Tally((0.1, 1.0), (2, 0, 1), pytest.approx(2.14))
    assert phases["wait"].counts == (1, 2, 0)  # 0.01; 0.4 and 1.0 (a bound is inclusive)
    assert RoundTimes(bounds=(1.0,)).rounds() == Tally((1.0,), (0, 0), 0.0)


def test_histogram_families_are_cumulative_and_end_at_inf() -> None:
    family = histogram("crossgrad_round_seconds", "doc", ["phase"],
                       {("qp",): ((0.1, 1.0), (2, 0, 1), 2.5)})
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got == {("crossgrad_round_seconds_bucket", "0.1"): 2,
                   ("crossgrad_round_seconds_bucket", "1.0"): 2,
                   ("crossgrad_round_seconds_bucket", "+Inf"): 3,
                   ("crossgrad_round_seconds_count", None): 3,
                   ("crossgrad_round_seconds_sum", None): 2.5}


@pytest.mark.parametrize(("bind", "host"), [
    ("0.0.0.0:50051", "0.0.0.0"), ("127.0.0.1:0", "127.0.0.1"), ("[::]:50051", "::"),
    ("[::1]:50051", "::1"), ("*:50051", "0.0.0.0"), ("peer3:50051", "peer3"),
])
def test_metrics_listen_on_the_host_of_the_bind_address(bind: str, host: str) -> None:
    assert metrics_host(bind) == host


def test_a_taken_or_impossible_metrics_port_is_a_clear_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}: "
                                              ".*choose another --metrics-port"):
            MetricsEndpoint("127.0.0.1", port, [])
    with pytest.raises(ConfigError, match=r"--metrics-port must be in 0\.\.65535"):
        MetricsEndpoint("127.0.0.1", 70000, [])


def test_the_demo_gives_each_process_its_own_metrics_port() -> None:
    assert metrics_flags(0, 3) == []  # off
    assert metrics_flags(9100, 0) == ["--metrics-port", "9100"]  # the bootstrap
    assert metrics_flags(9100, 4) == ["--metrics-port", "9104"]  # peer 3
    with pytest.raises(ConfigError, match="needs ports 65535 to 65537"):
        metrics_flags(65535, 2)
    with pytest.raises(ConfigError, match="got -1"):
        metrics_flags(-1, 0)
