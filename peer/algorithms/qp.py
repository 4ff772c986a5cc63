"""The CGA projection: a small dual QP per parameter tensor, solved with cvxopt.

ALGORITHMS.md, "cga", steps 1-4 (Esfandiari et al., ICML 2021, eq. 5-7; GEM's project2cone2 with a
margin). With g the pi-weighted self-gradient and M the t pi-weighted cross-gradient rows:

    minimize_v  1/2 v^T (M M^T + eps I) v + (M g)^T v     subject to  v >= margin
    g~ = g + M^T v

g~ is the Euclidean projection of g + margin * sum_l M_l onto the cone {z : <z, M_l> >= 0 for all l}
(tests check this identity).

cvxopt is confined to this module. Deliberate differences from the reference code:
- The Gram matrix M M^T and M g are computed on the tensors' device (GPU when present), in
  float64; only the t x t matrix and the t-vector go to the CPU for the solve. The reference code
  copies whole gradients to the CPU.
- The problem is scaled by the mean of diag(M M^T) before the solve. Scaling the objective by a
  positive constant leaves the minimiser unchanged, and it keeps cvxopt's absolute tolerances
  meaningful whether gradients are 1e-6 or 1e3 in norm. eps is therefore relative to that scale.
- When v = margin already satisfies the KKT conditions (no neighbor's gradient conflicts with
  the aggregate), it is returned without calling cvxopt: it is the exact minimiser.
- After cvxopt, an active-set polish re-solves the KKT system exactly on the active set cvxopt
  found, so primal feasibility <g~, M_l> >= 0 holds to round-off instead of to solver tolerance.
  If the polished point is not KKT-consistent, cvxopt's answer is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cvxopt
import numpy as np
import torch

from crossgrad.errors import SolverError

MARGIN = 0.5


@dataclass(frozen=True)
class QPOptions:
    """Solver settings for one projection.

    margin: lower bound on the dual variables (0.5 in the CGA paper and code). margin = 0 gives
        GEM's plain projection of the pi-weighted self-gradient.
    eps: ridge added to the scaled Gram matrix so cvxopt sees a positive definite P even when
        cross-gradients are collinear. 1e-12 (relative to the mean squared row norm) is what
        ALGORITHMS.md asks for; cvxopt has been stable with it on collinear rows here.
    maxiters, abstol, reltol, feastol: cvxopt's per-call options (never the global ones).
        Tight tolerances cost little at t <= 16 variables.
    polish: re-solve exactly on the active set after cvxopt (see module docstring).
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


def _cvxopt(p: np.ndarray, q: np.ndarray, options: QPOptions) -> np.ndarray:
    """min 1/2 v^T p v + q^T v s.t. v >= margin, by cvxopt with per-call options."""
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
    if result["status"] != "optimal":
        raise SolverError(f"cvxopt stopped with status {result['status']!r} after "
                          f"{result['iterations']} iterations (maxiters={options.maxiters})")
    v = np.array(result["x"], dtype=np.float64).reshape(t)
    if not np.all(np.isfinite(v)):
        raise SolverError("cvxopt returned a non-finite solution")
    return v


def _finish(problem: _Scaled, v: np.ndarray, options: QPOptions) -> np.ndarray:
    v = np.maximum(v, options.margin)  # the solver may sit a hair below the bound
    return _polish(problem.gram, problem.q, v, options.margin) if options.polish else v


def solve_dual(gram: np.ndarray, mg: np.ndarray, options: QPOptions) -> np.ndarray:
    """Solve min 1/2 v^T P v + q^T v s.t. v >= margin, with P = gram + eps*I, q = mg.

    gram: (t, t) float64, M M^T; mg: (t,) float64, M g. Returns v: (t,) float64.
    Raises SolverError when cvxopt fails or returns a non-finite or infeasible v.
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
    every tensor but one. If the joint solve fails, each problem is solved on its own, so a
    failure (and its fallback) stays confined to the tensor that caused it.
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
            v = _cvxopt(p, np.concatenate([pr.q for _, pr in pending]), options)
        except SolverError:
            pass  # solve each on its own below
        else:
            at = 0
            for (k, pr), n in zip(pending, sizes, strict=True):
                out[k] = _finish(pr, v[at:at + n], options)
                at += n
            return out
    for k, pr in pending:
        try:
            out[k] = _finish(pr, _cvxopt(pr.p, pr.q, options), options)
        except SolverError as exc:
            out[k] = exc
    return out


def _polish(p: np.ndarray, q: np.ndarray, v: np.ndarray, margin: float) -> np.ndarray:
    """Exact KKT solve on the active set that the interior-point answer suggests.

    Free variables F (v > margin): (P v + q)_F = 0; active A: v_A = margin and (P v + q)_A >= 0.
    P here is the scaled Gram matrix without the ridge, so the result is the exact projection;
    a singular P_FF (collinear rows) takes the least-squares solution.
    """
    t = v.shape[0]
    tol = 1e-6 * max(1.0, float(np.max(np.abs(v))))
    active = v <= margin + tol
    polished = np.full(t, margin)
    free = ~active
    if free.any():
        rhs = -(q[free] + p[np.ix_(free, active)] @ polished[active])
        try:
            polished[free] = np.linalg.lstsq(p[np.ix_(free, free)], rhs, rcond=None)[0]
        except np.linalg.LinAlgError:
            return v
    grad = p @ polished + q  # (t,) the multipliers of the bound constraints
    scale = max(1.0, float(np.max(np.abs(q))))
    if np.all(polished[free] >= margin - 1e-12) and np.all(grad[active] >= -1e-9 * scale):
        return polished
    return v


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


def project_many(
    self_grads: list[torch.Tensor],
    rows: list[list[torch.Tensor]],
    options: QPOptions,
    previous_v: dict[int, np.ndarray],
) -> list[Projection]:
    """CGA steps 1-4 for every parameter tensor k: self_grads[k] is pi_ii * g_ii[k] (any
    shape), rows[k] the pi_il * g_il[k] of the same shape. All-zero rows are dropped. Where
    the QP of tensor k fails, previous_v[k] is reused when its length still matches, else
    v = margin * 1 (the plain weighted aggregate); fell_back says so.
    """
    prepared: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    problems: list[tuple[np.ndarray, np.ndarray]] = []
    for own, rs in zip(self_grads, rows, strict=True):
        g = own.reshape(-1).to(torch.float64)  # (d,)
        if not rs:
            prepared.append(None)
            continue
        m = torch.stack([r.reshape(-1) for r in rs]).to(torch.float64)  # (t, d)
        nonzero = (m * m).sum(dim=1) > 0  # (t,) on the device
        if not bool(nonzero.all()):
            m = m[nonzero]  # drop all-zero rows (a neighbor with nothing to say)
        if m.shape[0] == 0:
            prepared.append(None)
            continue
        gram = (m @ m.T).cpu().numpy()  # (t, t) on the device, then to the CPU
        mg = (m @ g).cpu().numpy()  # (t,)
        if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(mg))):
            # Never step with NaN: a non-finite row or self-gradient makes any v useless.
            raise SolverError("a gradient row or the self-gradient holds NaN or Inf")
        prepared.append((g, m))
        problems.append((gram, mg))
    solutions = iter(solve_duals(problems, options))
    out: list[Projection] = []
    for k, (own, item) in enumerate(zip(self_grads, prepared, strict=True)):
        if item is None:
            out.append(Projection(grad=own.clone(), v=None, fell_back=False))
            continue
        g, m = item
        t = m.shape[0]
        solution = next(solutions)
        fell_back = isinstance(solution, SolverError)
        if isinstance(solution, np.ndarray):
            v = solution
        else:
            prev = previous_v.get(k)
            ok = prev is not None and prev.shape == (t,) and bool(np.all(np.isfinite(prev)))
            v = prev.copy() if ok and prev is not None else np.full(t, options.margin)
        v_t = torch.as_tensor(v, dtype=torch.float64, device=m.device)  # (t,)
        g_tilde = g + m.T @ v_t  # (d,)
        out.append(Projection(grad=g_tilde.reshape(own.shape).to(own.dtype), v=v,
                              fell_back=fell_back))
    return out
