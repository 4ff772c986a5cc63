"""Gradients and the generator's state from two threads at once do not deadlock.

torch's get_rng_state / set_rng_state hold the default generator's mutex while they make and free
Python objects; a garbage collection in there can free a tensor with autograd history, which lets
go of the GIL, and another thread in set_rng_state then holds the GIL and waits for the mutex for
ever. A deployed peer does exactly this when the round loop checkpoints (Node.state_dict reads the
generator's state) while a server thread computes a neighbor's cross-gradient (Trainer.gradient
forks the generator). With peer.training.trainer.GENERATOR_LOCK replaced by a no-op, the script
below hung in 2 runs of 2 (3 s each, killed after 30 s). It runs in a child process, so that a
hang fails this test, not the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECONDS = 3.0

SCRIPT = """
import gc, sys, threading, time
import torch
from peer.training.models import make_model
from peer.training.trainer import (Schedule, Trainer, generator_state, restore_generator,
                                   seeded_model)

torch.set_num_threads(1)
gc.set_threshold(50, 5, 5)  # collections often, so that some come inside the generator's calls
SECONDS = float(sys.argv[1])


class Cycle:
    pass


def garbage() -> None:
    # a cycle holding a tensor with autograd history: freeing it lets go of the GIL
    held = Cycle()
    held.loss = (torch.randn(8, requires_grad=True) * 2).sum()
    held.me = held


def gradients() -> None:
    net = seeded_model(lambda: make_model("mlp", (1, 8, 8), 10), 7)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    trainer = Trainer(0, net, x, y, Schedule(batch_size=8), 7, torch.device("cpu"))
    params = [p.detach() for p in net.parameters()]
    end, n = time.monotonic() + SECONDS, 0
    while time.monotonic() < end:
        garbage()
        trainer.gradient(params, n, "self")
        n += 1
    print("gradients", n, flush=True)


def checkpoints() -> None:
    end, n = time.monotonic() + SECONDS, 0
    while time.monotonic() < end:
        garbage()
        restore_generator(generator_state())
        n += 1
    print("states", n, flush=True)


threads = [threading.Thread(target=gradients), threading.Thread(target=checkpoints)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done", flush=True)
"""


def test_gradients_and_checkpoints_of_the_generator_state_in_two_threads_end() -> None:
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(SECONDS)], cwd=REPO,
                              capture_output=True, text=True, timeout=SECONDS + 60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"deadlocked: no end within {SECONDS + 60:g} s; it printed "
                             f"{exc.stdout!r}") from None
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[-1] == "done", done.stdout
    counts = dict(zip(lines[:-1:2], map(int, lines[1:-1:2]), strict=True))
    assert counts["gradients"] > 10 and counts["states"] > 10, counts  # both really ran
