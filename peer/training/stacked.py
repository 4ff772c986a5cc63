"""Gradients and evaluations of many models at once: torch.func.vmap over stacked parameters.

The batched simulator engine (peer/batched.py) holds every node's parameters as one tensor per
parameter with a leading node axis, (N, *shape). A round's gradients are tasks (m, d): model m
on node d's mini-batch; the self-gradient g_ii is the task (i, i), the cross-gradient g_il =
grad F_l(x_i; B_l) the task (i, l). All tasks of a round run as one vmapped
grad-and-value of the same loss the Trainer takes (peer/training/trainer.py), in chunks that
bound the memory.

Mini-batches are ragged when a node holds fewer samples than the batch size (b = min(batch, n),
as in Trainer.batch): batches are padded to the longest and the loss is a masked mean, which is
the plain mean over the real samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

Params = list[torch.Tensor]

# Tasks per vmapped call: 512 tasks of cganet on 8x8 digits with batch 32 hold about 0.6 GB of
# activations; the MLP needs far less. Larger chunks bought nothing measurable on 2 CPU cores.
CHUNK_TASKS = 512


def stack(models: Sequence[Params]) -> Params:
    """[(N, *shape) per parameter] from N models given as lists of tensors."""
    return [torch.stack([m[k] for m in models]) for k in range(len(models[0]))]


def unstack(stacked: Params, node: int) -> Params:
    """Node `node`'s parameters, as its own tensors (copies: the stack moves on)."""
    return [p[node].clone() for p in stacked]


class StackedModel:
    """One template module evaluated with many parameter sets (functional_call inside vmap)."""

    def __init__(self, model: nn.Module, names: Sequence[str],
                 chunk_tasks: int = CHUNK_TASKS) -> None:
        self.model = model
        self.names = list(names)
        self.chunk_tasks = chunk_tasks
        self._grad = vmap(grad_and_value(self._masked_loss))
        self._logits = vmap(self._forward, in_dims=(0, None))

    def _forward(self, params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))

    def _masked_loss(self, params: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        logits = self._forward(params, x)  # (b, K)
        per_sample = nn.functional.cross_entropy(logits, y, reduction="none")  # (b,)
        return (per_sample * mask).sum() / mask.sum()

    def gradients(self, stacked: Params, models: torch.Tensor, data: torch.Tensor,
                  x: torch.Tensor, y: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, Params]:
        """Per task t: (loss, grad) of model models[t] on node data[t]'s padded batch.

        stacked: [(N, *shape)]; models, data: (T,) node indices; x: (N, b, C, H, W) the padded
        batches, y: (N, b), mask: (N, b) 1 for a real sample. Returns (T,) losses and
        [(T, *shape)] gradients.
        """
        losses: list[torch.Tensor] = []
        grads: list[Params] = []
        for start in range(0, int(models.shape[0]), self.chunk_tasks):
            m = models[start:start + self.chunk_tasks]  # (c,)
            d = data[start:start + self.chunk_tasks]  # (c,)
            params = tuple(p[m] for p in stacked)  # (c, *shape) each
            g, loss = self._grad(params, x[d], y[d], mask[d])
            grads.append(list(g))
            losses.append(loss.detach())
        out = [torch.cat([chunk[k] for chunk in grads]) for k in range(len(stacked))]
        return torch.cat(losses), out

    @torch.no_grad()
    def evaluate(self, stacked: Params, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, accuracy) of every stacked model on (x, y): two (N,) tensors."""
        n_models = int(stacked[0].shape[0])
        per_chunk = max(1, self.chunk_tasks // 4)  # a test batch is larger than a train one
        loss = torch.zeros(n_models, dtype=torch.float64)
        correct = torch.zeros(n_models, dtype=torch.float64)
        for lo in range(0, n_models, per_chunk):
            params = tuple(p[lo:lo + per_chunk] for p in stacked)  # (c, *shape) each
            for start in range(0, int(y.shape[0]), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                logits = self._logits(params, xb)  # (c, b, K)
                ce = nn.functional.cross_entropy(logits.transpose(1, 2),  # (c, K, b)
                                                 yb.expand(logits.shape[0], -1),
                                                 reduction="none")  # (c, b)
                loss[lo:lo + per_chunk] += ce.sum(dim=1).double()
                hits = logits.argmax(dim=2) == yb  # (c, b)
                correct[lo:lo + per_chunk] += hits.sum(dim=1).double()
        n = max(1, int(y.shape[0]))
        return loss / n, correct / n
