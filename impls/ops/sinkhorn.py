r"""Entropic optimal transport by Sinkhorn scaling, in the log domain.

Given scores ``S`` (``[..., T, E]``, larger = better match), row marginals ``r`` (what each token
sends; 1 for a routed token, 0 for padding) and column marginals ``c`` (what each expert receives;
by default an equal share of the total, ``sum(r) / E``), the solver returns the plan

$$
\Pi^\star = \arg\max_{\Pi \ge 0,\ \Pi 1 = r,\ \Pi^\top 1 = c}
  \langle \Pi, S \rangle + \varepsilon H(\Pi),
\qquad H(\Pi) = -\sum_{te} \Pi_{te} (\log \Pi_{te} - 1),
$$

whose solution has the form ``Π = diag(e^f) exp(S / ε) diag(e^g)`` (Cuturi, "Sinkhorn
Distances", NeurIPS 2013). The scalings are found by alternating the two marginal constraints:

$$
g \leftarrow \log c - \operatorname{LSE}_t(S/\varepsilon + f), \qquad
f \leftarrow \log r - \operatorname{LSE}_e(S/\varepsilon + g).
$$

Numerics (against Megatron's ``sinkhorn``, which exponentiates raw logits and loops without a
cap): every step is a ``logsumexp`` of log-quantities, so logits in the thousands cannot overflow;
scores are cast to ``compute_dtype`` (float32 or float64) whatever their input dtype (bf16
included) and shifted by their row and then column maxima (absorbed into ``f`` and ``g``), so the
potentials stay small and float32 keeps its precision even for logits in the thousands.

Stopping: each iteration ends with the row update, so rows are exact and the reported
``marginal_error`` is the largest relative column deviation ``max_e |(Π^T 1)_e / c_e - 1|``. It is
read for free from the next column update (``|exp(g_old - g_new) - 1|``). Comparing it with
``tol`` needs a device-to-host sync, so it is done only every ``check_every`` iterations; with
``tol=None`` the solver runs exactly ``max_iters`` iterations with no sync at all. ``max_iters``
is a hard cap either way.

Scaling domain: after the two shifts every entry of ``L = S/ε`` is ``<= 0`` with a ``0`` in every
row and column. When no finite entry of a valid row is below ``-25`` (float32; ``-200`` in
float64), ``K = exp(L)`` and the scalings ``u = e^f``, ``v = e^g`` stay far inside the float range,
and the same iterations run as matrix-vector products, ``v <- c / (K^T u)``, ``u <- r / (K v)``
(Cuturi's original form): two small kernels per half-step instead of a ``logsumexp`` over the
whole matrix, which matters on GPUs where the log-domain loop is bound by kernel launches. Router
logits almost always qualify; logits spanning hundreds of ε (a dominant expert at +1000) do not,
and run in the log domain. ``domain="auto"`` picks with one host sync, and only when ``tol`` is
set (the run syncs at its checks anyway); ``tol=None`` keeps the sync-free log domain unless
``domain="exp"`` is forced. Both domains compute the same iterates up to rounding.

Gradients: the iterations are ordinary differentiable torch ops, so autograd differentiates the
unrolled solver (memory grows with the iteration count; wrap in ``torch.no_grad()`` when only
the selection is needed, as S-BASE does).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

_COMPUTE_DTYPES = (torch.float32, torch.float64)
#: lowest shifted score ``S/ε`` (a valid row's finite entries) for which the scaling form is used
_EXP_FLOOR = {torch.float32: -25.0, torch.float64: -200.0}


class SinkhornResult:
    """Output of ``sinkhorn()``.

    The plan, its log and the potentials are computed on first access from the solver's final
    state (log potentials, or in the scaling form the scalings ``u``, ``v`` and the kernel
    ``K``), so a router that reads only ``plan`` pays for nothing else.

    Attributes:
        iterations: long scalar tensor on the CPU (the count is known on the host), iterations
            run (at most ``max_iters``).
        marginal_error: ``[...]`` largest relative column-marginal deviation of ``plan``.
    """

    def __init__(
        self,
        L: torch.Tensor,
        row_shift: torch.Tensor,
        col_shift: torch.Tensor,
        iterations: int,
        marginal_error: torch.Tensor,
        *,
        log_potentials: tuple[torch.Tensor, torch.Tensor] | None = None,
        scalings: tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None = None,
    ) -> None:
        self._L, self._row_shift, self._col_shift = L, row_shift, col_shift
        self._log_potentials, self._scalings = log_potentials, scalings
        self.iterations = torch.tensor(iterations)
        self.marginal_error = marginal_error

    @functools.cached_property
    def _shifted_potentials(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._log_potentials is not None:
            return self._log_potentials
        u, v, _, positive = self._scalings
        return (u.log(), v.log()) if positive else (_safe_log(u), _safe_log(v))

    @functools.cached_property
    def plan(self) -> torch.Tensor:
        """``[..., T, E]`` the transport plan."""
        if self._scalings is not None:
            u, v, K, _ = self._scalings
            return u.unsqueeze(-1) * K * v.unsqueeze(-2)
        return self.log_plan.exp()

    @functools.cached_property
    def log_plan(self) -> torch.Tensor:
        """``[..., T, E]`` log of the transport plan (``-inf`` where no mass goes)."""
        f, g = self._shifted_potentials
        return self._L + f.unsqueeze(-1) + g.unsqueeze(-2)

    @functools.cached_property
    def f(self) -> torch.Tensor:
        """``[..., T]`` row log-scalings (dual potential of the tokens, divided by ε)."""
        return self._shifted_potentials[0] - self._row_shift.squeeze(-1)

    @functools.cached_property
    def g(self) -> torch.Tensor:
        """``[..., E]`` column log-scalings (dual potential of the experts, divided by ε)."""
        return self._shifted_potentials[1] - self._col_shift.squeeze(-2)


def _safe_lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` that returns 0 instead of ``-inf`` for an all ``-inf`` slice (no NaN later)."""
    lse = torch.logsumexp(x, dim=dim)
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _column_error(g: torch.Tensor, g_next: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """Largest relative column deviation of the plan with potentials ``g`` (``[...]``)."""
    err = torch.expm1(g - g_next).abs()
    err = torch.where(torch.isfinite(log_c), err, torch.zeros_like(err))
    return err.amax(dim=-1)


def _iterate_log(L, log_r, log_c, max_iters, tol, check_every):
    """Log-domain iterations from ``f = 0`` (``-inf`` on rows that send nothing) and ``g = 0``.

    Returns ``(f, g, error, iterations)``.
    """
    f = torch.where(torch.isfinite(log_r), torch.zeros_like(log_r), log_r)
    g = torch.zeros_like(log_c)
    err: torch.Tensor | None = None
    iters = 0
    for it in range(max_iters):
        g_next = log_c - _safe_lse(L + f.unsqueeze(-1), dim=-2)
        if tol is not None and it > 0 and it % check_every == 0:
            err = _column_error(g, g_next, log_c)
            if bool((err < tol).all()):  # host sync, once per check
                break
        g = g_next
        f = log_r - _safe_lse(L + g.unsqueeze(-2), dim=-1)
        iters = it + 1
        err = None
    if err is None:
        err = _column_error(g, log_c - _safe_lse(L + f.unsqueeze(-1), dim=-2), log_c)
    return f, g, err, iters


def _exp_domain_is_safe(L: torch.Tensor, row_mask: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether every finite shifted score of a valid row is above the floor (one host sync)."""
    finite = torch.nan_to_num(L, neginf=0.0)  # -inf (a forbidden pair) is exp'd to an exact 0
    if row_mask is not None:
        finite = torch.where(row_mask.unsqueeze(-1), finite, torch.zeros_like(finite))
    return bool(finite.amin() >= _EXP_FLOOR[dtype])


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` with ``-inf`` at ``x == 0`` and a finite gradient there (no ``0 * inf``)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).log(), -float("inf"))


def _iterate_exp(L, r, c, row_mask, max_iters, tol, check_every, positive):
    """The same iterations as matrix-vector products on ``K = exp(L)``: ``u = e^f``, ``v = e^g``.

    ``positive``: every row and column marginal is known to be > 0 (no padding, default
    marginals), so ``u`` and ``v`` stay positive and need no guarded logarithm; ``r`` and ``c``
    are then plain numbers (1 and ``T / E``), which saves creating them on the device.
    """
    K = L.exp()
    if row_mask is not None:
        K = torch.where(row_mask.unsqueeze(-1), K, torch.zeros_like(K))  # padding: no mass, no overflow
    tiny = torch.finfo(L.dtype).tiny
    # no padding, default marginals, one problem: v = c / (K^T u) is computed as 1 / (K^T u / c),
    # the constant riding in addmv's alpha, and u = 1 / (K v)
    scaled = positive and K.dim() == 2
    if K.dim() == 2:  # one problem: fused ``tiny + K^T u`` and ``tiny + K v`` (2 kernels a half-step)
        KT = K.t()
        tiny_1 = K.new_full((1,), tiny)  # broadcast by addmv
        col_scale = 1.0 / c if scaled else 1.0

        def col_sums(u):
            return torch.addmv(tiny_1, KT, u, alpha=col_scale)

        def row_sums(v):
            return torch.addmv(tiny_1, K, v)

    else:

        def col_sums(u):
            return (u.unsqueeze(-2) @ K).squeeze(-2).clamp_min(tiny)

        def row_sums(v):
            return (K @ v.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)

    def col_update(u):
        return col_sums(u).reciprocal() if scaled else c / col_sums(u)

    def row_update(v):
        return row_sums(v).reciprocal() if scaled else r / row_sums(v)

    u = K.new_ones(K.shape[:-1]) if positive else (r > 0).to(r.dtype)  # the log domain's start, f = 0
    v = None
    err: torch.Tensor | None = None
    iters = 0

    def col_error(v_old, v_new):
        e = v_old / v_new - 1
        if not positive:
            e = torch.where(c > 0, e, torch.zeros_like(e))
        return torch.linalg.vector_norm(e, ord=float("inf"), dim=-1)  # max |.| in one kernel

    for it in range(max_iters):
        v_next = col_update(u)
        if tol is not None and it > 0 and it % check_every == 0:
            err = col_error(v, v_next)
            if bool(err < tol if err.dim() == 0 else (err < tol).all()):  # host sync, once per check
                break
        v = v_next
        u = row_update(v)
        iters = it + 1
        err = None
    if err is None:
        err = col_error(v, col_update(u))
    return (u, v, K, positive), err, iters


def sinkhorn(
    scores: torch.Tensor,
    *,
    epsilon: float = 1.0,
    row_marginal: torch.Tensor | None = None,
    col_marginal: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    max_iters: int = 100,
    tol: float | None = 1e-4,
    check_every: int = 10,
    compute_dtype: torch.dtype = torch.float32,
    domain: Literal["auto", "log", "exp"] = "auto",
) -> SinkhornResult:
    """Solve the entropic OT problem above for ``scores`` of shape ``[..., T, E]``.

    Args:
        scores: token-expert scores (logits, log-probabilities, ...); any float dtype.
        epsilon: entropic regularization ε > 0 (smaller = closer to a hard assignment, slower).
        row_marginal: ``[..., T]`` mass each token sends; default 1 (0 for masked rows).
        col_marginal: ``[..., E]`` mass each expert receives; default ``sum(row_marginal) / E``.
            It must have the same total as the rows, or the columns cannot converge.
        row_mask: ``[..., T]`` bool, False rows (padding) send no mass.
        max_iters: hard cap on iterations.
        tol: stop once ``marginal_error < tol`` (checked every ``check_every`` iterations, one
            host sync per check); ``None`` runs exactly ``max_iters`` iterations without syncing.
        check_every: iterations between convergence checks.
        compute_dtype: ``torch.float32`` or ``torch.float64``.
        domain: ``"auto"`` (scaling form when the shifted scores allow it, see above), ``"log"``
            (always ``logsumexp``) or ``"exp"`` (always the scaling form; only for scores known
            to span a few dozen ε).
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() < 2:
        raise ValueError("sinkhorn: scores must be a floating-point tensor of shape [..., T, E]")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"sinkhorn: epsilon must be a finite number > 0, got {epsilon!r}")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"sinkhorn: max_iters must be an int >= 1, got {max_iters!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"sinkhorn: tol must be > 0 or None, got {tol!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"sinkhorn: check_every must be an int >= 1, got {check_every!r}")
    if domain not in ("auto", "log", "exp"):
        raise ValueError(f"sinkhorn: domain must be 'auto', 'log' or 'exp', got {domain!r}")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"sinkhorn: compute_dtype must be float32 or float64, got {compute_dtype}")

    *batch, T, E = scores.shape
    s = scores.to(compute_dtype)
    if row_mask is not None and (row_mask.dtype != torch.bool or tuple(row_mask.shape) != (*batch, T)):
        raise ValueError(f"sinkhorn: row_mask must be bool of shape {(*batch, T)}")
    # Centre rows, then columns: the shifts only move f and g, and keep float32 potentials small
    # (a dominant expert at +1000 would otherwise leave potentials near 1000, where float32 has
    # only ~1e-4 absolute precision).
    L = s / epsilon if epsilon != 1 else s
    row_max = torch.nan_to_num(L.amax(dim=-1, keepdim=True).detach(), posinf=0.0, neginf=0.0)
    L = L - row_max
    valid = L if row_mask is None else L.masked_fill(~row_mask.unsqueeze(-1), -float("inf"))
    col_max = torch.nan_to_num(valid.amax(dim=-2, keepdim=True).detach(), posinf=0.0, neginf=0.0)
    L = L - col_max

    # no padding and default marginals: every token sends 1 and every expert receives T / E
    positive = row_mask is None and row_marginal is None and col_marginal is None
    use_exp = domain == "exp" or (
        domain == "auto" and tol is not None and _exp_domain_is_safe(L, row_mask, compute_dtype)
    )
    if use_exp and positive:
        scalings, err, iters = _iterate_exp(L, 1.0, T / E, None, max_iters, tol, check_every, True)
        return SinkhornResult(L, row_max, col_max, iters, err.detach(), scalings=scalings)

    if row_marginal is None:
        r = scores.new_ones((*batch, T), dtype=compute_dtype)
    else:
        r = row_marginal.to(compute_dtype).expand(*batch, T)
    if row_mask is not None:
        r = torch.where(row_mask, r, torch.zeros_like(r))
    if positive:
        c = scores.new_full((*batch, E), T / E, dtype=compute_dtype)
    elif col_marginal is None:
        c = (r.sum(-1, keepdim=True) / E).expand(*batch, E)
    else:
        c = col_marginal.to(compute_dtype).expand(*batch, E)
    if use_exp:
        scalings, err, iters = _iterate_exp(L, r, c, row_mask, max_iters, tol, check_every, False)
        return SinkhornResult(L, row_max, col_max, iters, err.detach(), scalings=scalings)
    f, g, err, iters = _iterate_log(L, r.log(), c.log(), max_iters, tol, check_every)
    return SinkhornResult(L, row_max, col_max, iters, err.detach(), log_potentials=(f, g))
