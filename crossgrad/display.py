"""The live view of a run in a terminal: `crossgrad demo`, `simulate` and `status --watch`.

One row per peer (round, loss, test accuracy, bytes sent and received, state) and a run-wide
progress bar with an ETA, redrawn in place with rich. When stdout is not a terminal (CI, compose
logs, `| tee`) the same figures come as plain lines instead, one per evaluation and one per
change of state, with no escape codes. `--quiet` shows neither: only the final table.

The pure part (PeerRow, Snapshot, state_label, peer_table, plain_line, plain_events) takes
snapshots, so tests feed it figures; RunDisplay is the shell that draws them. Where the figures
come from is the caller's business: the simulator's rounds, or crossgrad/watch.py's polling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# How PeerStatus.state reads in the table (peer.proto); an unknown state shows in lower case.
STATE_LABELS = {"STARTING": "starting", "CATCHING_UP": "catching up", "TRAINING": "training",
                "ALONE": "alone", "DRAINING": "stopping", "DONE": "done"}
# States a run can end in: a watcher stops when every peer is in one of them.
FINAL_STATES = frozenset({"done", "left"})
_STYLES = {"down": "bold red", "left": "dim", "done": "green", "alone": "yellow",
           "resumed": "cyan", "catching up": "cyan"}


@dataclass(frozen=True)
class PeerRow:
    """What the display shows of one peer at one moment."""

    node: int
    round: int  # rounds done (the round it works on)
    loss: float = math.nan  # training loss of the last round
    accuracy: float = math.nan  # test accuracy at the last evaluation
    evaluated: int = 0  # the round of that evaluation (0: none yet)
    sent: int | None = None  # bytes on the wire; None where nobody counts them
    received: int | None = None
    state: str = "training"  # a state_label


@dataclass(frozen=True)
class Snapshot:
    """Every peer's row and the run's length: enough for the table and the progress bar."""

    rows: tuple[PeerRow, ...]
    rounds: int  # rounds of the run, per peer
    nodes: int  # peers the run expects; one not listed yet counts as no rounds done

    @property
    def total(self) -> int:
        return self.rounds * max(self.nodes, len(self.rows))

    @property
    def completed(self) -> int:
        return sum(min(row.round, self.rounds) for row in self.rows)

    @property
    def finished(self) -> bool:
        """Every expected peer is listed and done (or left after it was)."""
        return len(self.rows) >= self.nodes > 0 and all(r.state in FINAL_STATES
                                                        for r in self.rows)


def state_label(state: str, *, waiting_on: Sequence[int] = (), down: bool = False,
                left: bool = False, resumed: bool = False) -> str:
    """"training", "waiting on neighbor 3", "down", "resumed" ...: a peer's state in words.

    Down (its lease expired, or it does not answer) and left come first, since what a dead
    peer last said is stale; then the neighbors it waits for; a peer that restarted from a
    checkpoint reads "resumed" while it trains."""
    if down:
        return "down"
    if left:
        return "left"
    if waiting_on:
        return ("waiting on neighbor " if len(waiting_on) == 1 else "waiting on neighbors ") \
            + ", ".join(str(j) for j in waiting_on)
    label = STATE_LABELS.get(state, state.lower())
    return "resumed" if resumed and label == "training" else label


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _figure(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4f}"


def peer_table(snapshot: Snapshot, title: str = "") -> Table:
    """The live table: one row per peer, by node id."""
    table = Table(title=title or None, title_justify="left", expand=False)
    table.add_column("node", justify="right")
    table.add_column("round", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("sent", justify="right")
    table.add_column("received", justify="right")
    table.add_column("state")
    for row in sorted(snapshot.rows, key=lambda r: r.node):
        style = "yellow" if row.state.startswith("waiting") else _STYLES.get(row.state, "")
        table.add_row(str(row.node), f"{row.round}/{snapshot.rounds}", _figure(row.loss),
                      _figure(row.accuracy), _mib(row.sent), _mib(row.received),
                      f"[{style}]{row.state}[/]" if style else row.state)
    return table


def plain_line(row: PeerRow, rounds: int) -> str:
    """One peer's figures on one line, for logs."""
    return (f"node {row.node}  round {row.round}/{rounds}  loss {_figure(row.loss)}  "
            f"acc {_figure(row.accuracy)}  sent {_mib(row.sent)}  recv {_mib(row.received)}  "
            f"{row.state}")


def _phase(state: str) -> str:
    # Waiting on a neighbor comes and goes within every round: in logs it is training.
    return "training" if state.startswith("waiting") else state


def plain_events(previous: Mapping[int, PeerRow], rows: Iterable[PeerRow]) -> list[PeerRow]:
    """The rows worth a log line: a peer seen for the first time, a new evaluation, a change of
    state (down, resumed, done ...; not the waits inside a round)."""
    out = []
    for row in rows:
        before = previous.get(row.node)
        if before is None or row.evaluated > before.evaluated \
                or _phase(row.state) != _phase(before.state):
            out.append(row)
    return out


class DisplayMode(Enum):
    LIVE = "live"  # a terminal: the table and the bar, redrawn in place
    PLAIN = "plain"  # a pipe or a file: log lines
    QUIET = "quiet"  # nothing until the final table


def choose_mode(console: Console, quiet: bool) -> DisplayMode:
    if quiet:
        return DisplayMode.QUIET
    return DisplayMode.LIVE if console.is_terminal else DisplayMode.PLAIN


class RunDisplay:
    """Draws snapshots as the mode says; a context manager, since the live view owns the
    terminal (and stdout and stderr, whose lines it shows above itself) until it exits."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False,
                 title: str = "") -> None:
        self.console = console or Console(highlight=False)
        self.mode = choose_mode(self.console, quiet)
        self.title = title
        self._seen: dict[int, PeerRow] = {}
        self._progress = Progress(TextColumn("[bold]rounds"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("elapsed"),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=self.console)
        self._task: TaskID | None = None
        self._snapshot = Snapshot(rows=(), rounds=0, nodes=0)
        self._live: Live | None = None

    @property
    def live(self) -> bool:
        return self.mode is DisplayMode.LIVE

    def _renderable(self) -> Group:
        return Group(peer_table(self._snapshot, self.title), self._progress)

    def __enter__(self) -> RunDisplay:
        if self.live:
            self._live = Live(self._renderable(), console=self.console, refresh_per_second=4)
            self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.update(self._renderable(), refresh=True)
            self._live.stop()
            self._live = None

    def note(self, line: str) -> None:
        """A line of the run's own (a start-up line, the simulator's evaluation summary): above
        the live view, or as it is in plain mode."""
        if self.mode is not DisplayMode.QUIET:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def update(self, snapshot: Snapshot) -> None:
        if self.mode is DisplayMode.QUIET:
            return
        if self.mode is DisplayMode.PLAIN:
            for row in plain_events(self._seen, snapshot.rows):
                self.note(plain_line(row, snapshot.rounds))
            self._seen.update({row.node: row for row in snapshot.rows})
            return
        self._snapshot = snapshot
        if self._task is None:
            self._task = self._progress.add_task("run", total=snapshot.total)
        self._progress.update(self._task, total=snapshot.total, completed=snapshot.completed)
        if self._live is not None:
            self._live.update(self._renderable())
