"""The CGA projection: a small dual QP per parameter tensor, solved with cvxopt.

docs/algorithms.md, "cga", steps 1-4 (Esfandiari et al., ICML 2021, eq. 5-7; GEM's project2cone2
with a margin). With g the pi-weighted self-gradient and M the t pi-weighted cross-gradient rows:

    minimize_v  1/2 v^T (M M^T + eps I) v + (M g)^T v     subject to  v >= margin
    g~ = g + M^T v

g~ is the Euclidean projection of g + margin * sum_l M_l onto the cone {z : <z, M_l> >= 0 for all l}
(tests check this identity).

cvxopt is confined to this module. Deliberate differences from the reference code:
- The Gram matrix M M^T and M g are computed on the tensors' device (GPU when present), in
  float64; only the t x t matrix and the t-vector go to the CPU for the solve. The reference code
  copies whole gradients to the CPU.
- The float64 copies are made a block of BLOCK elements at a time, for the Gram matrix and
  again for g~, never of a whole gradient: beside its answer, the projection holds t + 2 float64
  blocks, not t + 1 float64 copies of the model. A tensor of at most BLOCK elements is one
  block, so its arithmetic (and its bits) are those of a single float64 product.
- The problem is scaled by the mean of diag(M M^T) before the solve. Scaling the objective by a
  positive constant leaves the minimiser unchanged, and it keeps cvxopt's absolute tolerances
  meaningful whether gradients are 1e-6 or 1e3 in norm. eps is therefore relative to that scale.
- When v = margin already satisfies the KKT conditions (no neighbor's gradient conflicts with
  the aggregate), it is returned without calling cvxopt: it is the exact minimiser.
- After cvxopt, an active-set polish re-solves the KKT system exactly on the active set cvxopt
  found, so primal feasibility <g~, M_l> >= 0 holds to round-off instead of to solver tolerance.
  If the polished point does not pass the KKT check, cvxopt's answer is kept.
- When cvxopt stops short of 'optimal' (status 'unknown': it reached maxiters, which happens on
  ill-conditioned problems and on some well-conditioned ones at these tight tolerances), its
  last iterate is not thrown away: the polish tries the active set it suggests, the one its
  multipliers and slacks suggest and the bound-free one, each followed by a few primal-dual
  active-set steps, and accepts the first point that passes the same KKT check. A verified
  point is the exact minimiser, so only an unverified one is a failure (SolverError, and the
  caller's counted fallback). On 12,000 random conflicting problems this took the fallbacks
  from 38 to 0 (docs/algorithms.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cvxopt
import numpy as np
import torch

from crossgrad.errors import SolverError

MARGIN = 0.5
BLOCK = 1 << 20  # elements per float64 block of a tensor's rows: 8 MiB per row


@dataclass(frozen=True)
class QPOptions:
    """Solver settings for one projection.

    margin: lower bound on the dual variables (0.5 in the CGA paper and code). margin = 0 gives
        GEM's plain projection of the pi-weighted self-gradient.
    eps: ridge added to the scaled Gram matrix so cvxopt sees a positive definite P even when
        cross-gradients are collinear. 1e-12 (relative to the mean squared row norm) is what
        docs/algorithms.md states; cvxopt has been stable with it on collinear rows here.
    maxiters, abstol, reltol, feastol: cvxopt's per-call options (never the global ones).
        Tight tolerances cost little at t <= 16 variables.
    polish: re-solve exactly on the active set after cvxopt, and rescue an iterate cvxopt
        stopped short of 'optimal' when a KKT-verified point lies near it (module docstring).
        False takes cvxopt's answer as it is and every non-optimal stop as a failure.
    """

    margin: float = MARGIN
    eps: float = 1e-12
    maxiters: int = 100
    abstol: float = 1e-12
    reltol: float = 1e-12
    feastol: float = 1e-12
    polish: bool = True


@dataclass(frozen=True)
class _Scaled:
    """One tensor's QP, scaled by the mean of diag(M M^T) (the minimiser is unchanged)."""

    gram: np.ndarray  # (t, t) M M^T / scale
    p: np.ndarray  # (t, t) gram + eps I
    q: np.ndarray  # (t,) M g / scale


def _scale(gram: np.ndarray, mg: np.ndarray, options: QPOptions) -> _Scaled | np.ndarray:
    """The scaled problem, or its solution v = margin when that already satisfies KKT."""
    t = gram.shape[0]
    scale = float(np.mean(np.diag(gram)))
    if not math.isfinite(scale) or scale <= 0.0:
        raise SolverError(f"Gram matrix has a non-positive or non-finite mean diagonal ({scale})")
    p = gram / scale + options.eps * np.eye(t)  # (t, t)
    q = mg / scale  # (t,)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
        raise SolverError("QP data contain NaN or Inf")
    if np.all(p @ np.full(t, options.margin) + q >= 0.0):
        # v = margin already satisfies every KKT condition (the bound's multipliers P v + q are
        # nonnegative), so it is the minimiser: no conflict to resolve, no solver call needed.
        return np.full(t, options.margin)
    return _Scaled(gram=gram / scale, p=p, q=q)


@dataclass(frozen=True)
class _Iterate:
    """cvxopt's last iterate, whether or not it reached status 'optimal'."""

    v: np.ndarray  # (t,) primal iterate
    z: np.ndarray  # (t,) multipliers of v >= margin
    s: np.ndarray  # (t,) slacks v - margin
    status: str
    iterations: int


def _cvxopt(p: np.ndarray, q: np.ndarray, options: QPOptions) -> _Iterate:
    """min 1/2 v^T p v + q^T v s.t. v >= margin, by cvxopt with per-call options.

    Returns the last iterate even when cvxopt stops short of 'optimal' (_finish decides whether
    it can be used); raises SolverError when cvxopt raises or the iterate is not finite.
    """
    t = q.shape[0]
    solver_options = {
        "show_progress": False,
        "maxiters": options.maxiters,
        "abstol": options.abstol,
        "reltol": options.reltol,
        "feastol": options.feastol,
    }
    try:
        result = cvxopt.solvers.qp(
            cvxopt.matrix(np.ascontiguousarray(p, dtype=np.float64)),
            cvxopt.matrix(np.ascontiguousarray(q, dtype=np.float64)),
            cvxopt.matrix(-np.eye(t, dtype=np.float64)),
            cvxopt.matrix(np.full(t, -options.margin, dtype=np.float64)),
            options=solver_options,
        )
    except (ValueError, ArithmeticError, TypeError) as exc:
        raise SolverError(f"cvxopt raised {type(exc).__name__}: {exc}") from exc
    parts = [np.array(result[key], dtype=np.float64).reshape(t) if result[key] is not None
             else np.full(t, np.nan) for key in ("x", "z", "s")]
    if not np.all(np.isfinite(parts[0])):
        raise SolverError(f"cvxopt returned a non-finite solution (status {result['status']!r}); "
                          "the QP data are likely too ill-conditioned")
    return _Iterate(v=parts[0], z=parts[1], s=parts[2], status=str(result["status"]),
                    iterations=int(result["iterations"]))


def _solve_on(p: np.ndarray, q: np.ndarray, active: np.ndarray, margin: float) -> np.ndarray:
    """The exact stationary point with v_A = margin: (P v + q)_F = 0 on the free set F.

    A singular P_FF (collinear rows) takes the least-squares solution; _kkt rejects it when
    the system has none.
    """
    v = np.full(q.shape[0], margin)
    free = ~active
    if free.any():
        rhs = -(q[free] + p[np.ix_(free, active)] @ v[active])
        v[free] = np.linalg.lstsq(p[np.ix_(free, free)], rhs, rcond=None)[0]
    return v


def _kkt(p: np.ndarray, q: np.ndarray, v: np.ndarray, margin: float,
         tol: float = 1e-10) -> bool:
    """Whether v solves min 1/2 v^T P v + q^T v s.t. v >= margin (P positive semidefinite).

    KKT for this box: v >= margin; the bound's multiplier P v + q is nonnegative where
    v = margin and zero where v > margin. The tolerances are relative to the problem's scale:
    P v + q sums terms of size max|P| * sum|v| and |q|, and round-off cancels among them, so no
    solver can do better than a few eps times that size. 1e-10 leaves room for the round-off
    of ill-conditioned problems (exact points measured up to 3e-11) and rejected every inexact
    candidate in our experiments (1e-9 let one through, 1.5e-8 above the optimal objective).
    """
    if not np.all(np.isfinite(v)):
        return False
    grad = p @ v + q  # (t,) multipliers of v >= margin
    size = float(np.max(np.abs(p)) * np.sum(np.abs(v)) + np.max(np.abs(q)))
    at_bound = v <= margin + tol * max(1.0, float(np.max(np.abs(v))))
    return bool(np.all(v >= margin - tol * max(1.0, abs(margin)))
                and np.all(grad[at_bound] >= -tol * size)
                and np.all(np.abs(grad[~at_bound]) <= tol * size))


def _polish(problem: _Scaled, starts: list[np.ndarray], margin: float,
            steps: int) -> np.ndarray | None:
    """The first exact solve on a candidate active set that _kkt verifies, or None.

    From each start, up to `steps` primal-dual active-set steps follow (Hintermueller, Ito and
    Kunisch, SIAM J. Optim. 13(3), 2002): bind the variables that fell below the bound, free
    the bounds whose multiplier came out negative. Every candidate is verified, so a wrong
    guess costs one t x t solve and nothing else.
    """
    tried: list[np.ndarray] = []
    for start in starts:
        active = start
        for _ in range(steps + 1):
            if any(np.array_equal(active, seen) for seen in tried):
                break
            tried.append(active)
            try:
                v = _solve_on(problem.gram, problem.q, active, margin)
            except np.linalg.LinAlgError:
                break
            if _kkt(problem.gram, problem.q, v, margin):
                return np.maximum(v, margin)
            active = (problem.gram @ v + problem.q) + (margin - v) > 0.0
    return None


def _finish(problem: _Scaled, iterate: _Iterate, options: QPOptions) -> np.ndarray:
    """The polished solution, or cvxopt's own when it was optimal; else SolverError.

    Optimal: one exact solve on the active set the answer sits on, kept when _kkt verifies it
    (else cvxopt's answer, already within its tolerances). Stopped short (status 'unknown' at
    maxiters): three starts, each with active-set steps, and an answer only when one
    verifies: the bounds the iterate sits on,
    the bounds whose multiplier exceeds their slack (the usual interior-point guess, better
    when it stopped early) and no bound at all. A verified point is the exact minimiser
    whatever cvxopt's status, so only an unverified one counts as a failure.
    """
    margin = options.margin
    v = np.maximum(iterate.v, margin)  # the solver may sit a hair below the bound
    optimal = iterate.status == "optimal"
    if options.polish:
        t = v.shape[0]
        suggested = v <= margin + 1e-6 * max(1.0, float(np.max(np.abs(v))))
        if optimal:
            polished = _polish(problem, [suggested], margin, steps=0)
        else:
            starts = [suggested, iterate.z > iterate.s, np.zeros(t, dtype=bool)]
            polished = _polish(problem, starts, margin, steps=t)
        if polished is not None:
            return polished
    if optimal:
        return v
    raise SolverError(f"cvxopt stopped with status {iterate.status!r} after "
                      f"{iterate.iterations} iterations (maxiters={options.maxiters}) and no "
                      "active set near its last iterate satisfies the KKT conditions; this "
                      "tensor falls back and the fallback is counted")


def solve_dual(gram: np.ndarray, mg: np.ndarray, options: QPOptions) -> np.ndarray:
    """Solve min 1/2 v^T P v + q^T v s.t. v >= margin, with P = gram + eps*I, q = mg.

    gram: (t, t) float64, M M^T; mg: (t,) float64, M g. Returns v: (t,) float64, v >= margin.
    Raises SolverError when the data are not finite, cvxopt raises or returns a non-finite
    iterate, or it stops short of 'optimal' and no point near its iterate passes the KKT check.
    """
    problem = _scale(gram, mg, options)
    if isinstance(problem, np.ndarray):
        return problem
    return _finish(problem, _cvxopt(problem.p, problem.q, options), options)


def solve_duals(problems: list[tuple[np.ndarray, np.ndarray]],
                options: QPOptions) -> list[np.ndarray | SolverError]:
    """Many independent per-tensor QPs, in one cvxopt call where they conflict.

    The problems are separable, so the block-diagonal QP of all of them has exactly their
    solutions as its blocks; one call saves cvxopt's fixed per-call cost (about 1 ms here) for
    every tensor but one. Each block of the joint answer is finished (polished, verified) on its
    own; a block that does not verify, or every block when the joint call fails, is solved on
    its own, so a failure (and its fallback) stays confined to the tensor that caused it.
    """
    out: list[np.ndarray | SolverError] = []
    pending: list[tuple[int, _Scaled]] = []
    for k, (gram, mg) in enumerate(problems):
        try:
            scaled = _scale(gram, mg, options)
        except SolverError as exc:
            out.append(exc)
            continue
        out.append(scaled if isinstance(scaled, np.ndarray) else SolverError("pending"))
        if not isinstance(scaled, np.ndarray):
            pending.append((k, scaled))
    if len(pending) > 1:
        sizes = [pr.q.shape[0] for _, pr in pending]
        total = sum(sizes)
        p = np.zeros((total, total))
        at = 0
        for (_, pr), n in zip(pending, sizes, strict=True):
            p[at:at + n, at:at + n] = pr.p
            at += n
        try:
            joint = _cvxopt(p, np.concatenate([pr.q for _, pr in pending]), options)
        except SolverError:
            pass  # solve each on its own below
        else:
            alone: list[tuple[int, _Scaled]] = []
            at = 0
            for (k, pr), n in zip(pending, sizes, strict=True):
                block = _Iterate(v=joint.v[at:at + n], z=joint.z[at:at + n],
                                 s=joint.s[at:at + n], status=joint.status,
                                 iterations=joint.iterations)
                try:
                    out[k] = _finish(pr, block, options)
                except SolverError:
                    alone.append((k, pr))  # its block did not verify: solve it on its own
                at += n
            pending = alone
    for k, pr in pending:
        try:
            out[k] = _finish(pr, _cvxopt(pr.p, pr.q, options), options)
        except SolverError as exc:
            out[k] = exc
    return out


@dataclass(frozen=True)
class Projection:
    """The result of one per-tensor projection."""

    grad: torch.Tensor  # g~, the tensor's shape and dtype
    v: np.ndarray | None  # (t,) dual solution actually used; None when there were no rows
    fell_back: bool


def project(
    self_grad: torch.Tensor,
    rows: list[torch.Tensor],
    options: QPOptions,
    previous_v: np.ndarray | None = None,
) -> Projection:
    """CGA steps 1-4 for one parameter tensor (see project_many)."""
    return project_many([self_grad], [rows], options, {0: previous_v} if previous_v is not None
                        else {})[0]


def _kept(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The flat rows that take part: those with a nonzero entry and no NaN.

    The same rows as a float64 sum of squares > 0 would keep (a float32 square never underflows
    in float64), without making that copy. A row with NaN is left out like an all-zero one, as
    a neighbor that did not answer; an infinite row is kept, and the Gram check raises. One
    transfer to the host per tensor, whatever t.
    """
    flags = torch.stack([(r.count_nonzero() > 0) & ~torch.isnan(r).any() for r in rows])
    return [r for r, keep in zip(rows, flags.tolist(), strict=True) if keep]


class _Blocks:
    """A tensor's self-gradient and rows in float64, a block of at most BLOCK elements at a
    time, in buffers made for one pass over the tensor: t + 1 blocks of float64 at a time.

    A tensor of at most BLOCK elements is one block whose buffer is exactly the (t, d) matrix
    of the whole-tensor formula, so the products below give that formula's bits.
    """

    def __init__(self, g: torch.Tensor, rows: list[torch.Tensor]) -> None:
        self.g, self.rows = g, rows  # flat, in their own dtype; views where they can be
        self.width = max(1, min(BLOCK, g.numel()))

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, M's columns [start, start + b) as (t, b), g's as (b,)), block by block."""
        d, width, device = self.g.numel(), self.width, self.g.device
        m_buf = torch.empty((len(self.rows), width), dtype=torch.float64, device=device)
        g_buf = torch.empty(width, dtype=torch.float64, device=device)
        for at in range(0, d, width):
            n = min(width, d - at)
            m, g = m_buf[:, :n], g_buf[:n]
            for row, r in zip(m, self.rows, strict=True):
                row.copy_(r[at:at + n])
            g.copy_(self.g[at:at + n])
            yield at, m, g


def _gram(blocks: _Blocks) -> tuple[np.ndarray, np.ndarray]:
    """M M^T (t, t) and M g (t,) in float64, on the tensors' device."""
    t, device = len(blocks.rows), blocks.g.device
    gram = torch.zeros((t, t), dtype=torch.float64, device=device)
    mg = torch.zeros(t, dtype=torch.float64, device=device)
    for _, m, g in blocks:
        gram += m @ m.T
        mg += m @ g
    return gram.cpu().numpy(), mg.cpu().numpy()


def _step(blocks: _Blocks, v: np.ndarray) -> torch.Tensor:
    """g~ = g + M^T v in float64, returned flat in g's dtype."""
    v_t = torch.as_tensor(v, dtype=torch.float64, device=blocks.g.device)  # (t,)
    out = torch.empty_like(blocks.g)
    scratch = torch.empty(blocks.width, dtype=torch.float64, device=blocks.g.device)
    for at, m, g in blocks:
        n = g.shape[0]
        step = torch.mv(m.T, v_t, out=scratch[:n])  # (b,) M^T v
        out[at:at + n] = step.add_(g)  # g + M^T v (IEEE addition commutes: the same bits)
    return out


def project_many(
    self_grads: list[torch.Tensor],
    rows: list[list[torch.Tensor]],
    options: QPOptions,
    previous_v: dict[int, np.ndarray],
) -> list[Projection]:
    """CGA steps 1-4 for every parameter tensor k: self_grads[k] is pi_ii * g_ii[k] (any
    shape), rows[k] the pi_il * g_il[k] of the same shape. All-zero rows are dropped (and rows
    holding NaN: _kept). Where the QP of tensor k fails, previous_v[k] is reused when its length
    still matches, else v = margin * 1 (the plain weighted aggregate); fell_back says so.
    """
    prepared: list[_Blocks | None] = []
    problems: list[tuple[np.ndarray, np.ndarray]] = []
    for own, rs in zip(self_grads, rows, strict=True):
        g = own.reshape(-1)  # (d,) a view where the tensor is contiguous
        kept = _kept([r.reshape(-1) for r in rs]) if rs else []
        if not kept:
            prepared.append(None)  # no rows, or none with anything to say
            continue
        blocks = _Blocks(g, kept)
        gram, mg = _gram(blocks)
        if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(mg))):
            # Never step with NaN: a non-finite row or self-gradient makes any v useless.
            raise SolverError("a gradient row or the self-gradient holds NaN or Inf")
        prepared.append(blocks)
        problems.append((gram, mg))
    solutions = iter(solve_duals(problems, options))
    out: list[Projection] = []
    for k, (own, item) in enumerate(zip(self_grads, prepared, strict=True)):
        if item is None:
            out.append(Projection(grad=own.clone(), v=None, fell_back=False))
            continue
        t = len(item.rows)
        solution = next(solutions)
        fell_back = isinstance(solution, SolverError)
        if isinstance(solution, np.ndarray):
            v = solution
        else:
            prev = previous_v.get(k)
            ok = prev is not None and prev.shape == (t,) and bool(np.all(np.isfinite(prev)))
            v = prev.copy() if ok and prev is not None else np.full(t, options.margin)
        out.append(Projection(grad=_step(item, v).reshape(own.shape), v=v,
                              fell_back=fell_back))
    return out
