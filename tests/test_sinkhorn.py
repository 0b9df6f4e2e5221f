"""The log-domain Sinkhorn solver: marginals, numerics, caps, precision and gradients."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.ops.sinkhorn import sinkhorn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _column_error(plan: torch.Tensor, share: torch.Tensor | float) -> float:
    return float((plan.sum(-2) / share - 1).abs().max())


def _check_marginals(res, T_valid: int, E: int, tol: float, mask: torch.Tensor | None = None) -> None:
    plan = res.plan
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    rows = plan.sum(-1) if mask is None else plan.sum(-1)[mask]
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)
    share = T_valid / E
    assert _column_error(plan, share) < tol
    assert float(res.marginal_error.max()) < tol
    assert abs(float(res.marginal_error.max()) - _column_error(plan, share)) < 1e-5


ADVERSARIAL = {
    "random": lambda g: torch.randn(96, 8, generator=g),
    "huge_logits_pm1000": lambda g: torch.randint(0, 2, (64, 8), generator=g).float() * 2000 - 1000,
    "all_ties": lambda g: torch.zeros(64, 8),
    "all_ties_at_1000": lambda g: torch.full((64, 8), 1000.0),
    "fewer_tokens_than_experts": lambda g: 5 * torch.randn(3, 16, generator=g),
    "one_dominant_expert": lambda g: torch.randn(64, 8, generator=g) + torch.tensor([1000.0] + [0.0] * 7),
    "dominant_expert_in_every_token_with_ties": lambda g: torch.tensor([[50.0, 0, 0, 0]]).repeat(12, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_plan_meets_marginals_within_tolerance_on_random_and_adversarial_scores(case, dtype):
    S = ADVERSARIAL[case](_gen(0))
    res = sinkhorn(S, epsilon=1.0, max_iters=500, tol=1e-4, compute_dtype=dtype)
    assert 1 <= int(res.iterations) <= 500
    _check_marginals(res, S.shape[0], S.shape[1], 1e-4)


@pytest.mark.parametrize("scale", [1.0, 100.0, 1000.0])
def test_large_logits_never_overflow_and_scale_with_epsilon(scale):
    S = torch.randn(128, 8, generator=_gen(1))
    small = sinkhorn(S, epsilon=0.5, max_iters=300)
    big = sinkhorn(S * scale, epsilon=0.5 * scale, max_iters=300)
    assert torch.isfinite(big.log_plan).all()
    torch.testing.assert_close(big.plan, small.plan, atol=1e-5, rtol=1e-4)


def test_bf16_scores_are_solved_in_float32():
    S = (300 * torch.randn(64, 8, generator=_gen(2))).bfloat16()
    res = sinkhorn(S, epsilon=100.0)
    ref = sinkhorn(S.float(), epsilon=100.0)
    assert res.log_plan.dtype == torch.float32
    torch.testing.assert_close(res.plan, ref.plan)
    _check_marginals(res, 64, 8, 1e-4)


def test_float32_and_float64_converge_to_the_same_plan():
    S = 3 * torch.randn(256, 16, generator=_gen(3))
    p32 = sinkhorn(S, tol=1e-6, max_iters=2000, compute_dtype=torch.float32).plan
    p64 = sinkhorn(S.double(), tol=1e-10, max_iters=2000, compute_dtype=torch.float64).plan
    torch.testing.assert_close(p32.double(), p64, atol=1e-5, rtol=1e-4)


def test_the_iteration_cap_is_never_exceeded_and_the_error_is_reported_honestly():
    # expert shares that do not add up to the token mass: the columns can never converge
    S = torch.randn(32, 4, generator=_gen(4))
    res = sinkhorn(S, col_marginal=torch.tensor([20.0, 10.0, 5.0, 5.0]) * 2, max_iters=37, tol=1e-4)
    assert int(res.iterations) == 37
    assert float(res.marginal_error) > 0.5  # reported, not hidden
    # an ill-conditioned problem (range / epsilon ~ 1e4) stops at the cap without NaN
    hard = sinkhorn(1000 * torch.randn(64, 8, generator=_gen(5)), max_iters=50, tol=1e-6)
    assert int(hard.iterations) == 50 and torch.isfinite(hard.plan).all()


def test_fixed_iteration_mode_runs_exactly_max_iters():
    S = torch.randn(16, 4, generator=_gen(6))
    res = sinkhorn(S, tol=None, max_iters=7)
    assert int(res.iterations) == 7
    # the reported error is the true one for that plan
    assert abs(float(res.marginal_error) - _column_error(res.plan, 4.0)) < 1e-6


def test_convergence_is_checked_only_every_check_every_iterations():
    S = torch.zeros(8, 4)  # converged after one iteration
    assert int(sinkhorn(S, check_every=5).iterations) == 5
    assert int(sinkhorn(S, check_every=1).iterations) == 1


def test_masked_rows_send_no_mass_and_leave_the_rest_unchanged():
    S = torch.randn(20, 4, generator=_gen(7))
    mask = torch.ones(20, dtype=torch.bool)
    mask[[2, 5, 11, 12]] = False
    res = sinkhorn(S, row_mask=mask, tol=1e-7, max_iters=1000)
    ref = sinkhorn(S[mask], tol=1e-7, max_iters=1000)
    assert (res.plan[~mask] == 0).all()
    torch.testing.assert_close(res.plan[mask], ref.plan, atol=1e-6, rtol=1e-5)
    _check_marginals(res, int(mask.sum()), 4, 1e-6, mask)


def test_all_rows_masked_gives_an_empty_plan_without_nan():
    res = sinkhorn(torch.randn(5, 3), row_mask=torch.zeros(5, dtype=torch.bool))
    assert (res.plan == 0).all() and torch.isfinite(res.marginal_error).all()


def test_leading_batch_dimensions_solve_independent_problems():
    S = torch.randn(3, 2, 24, 6, generator=_gen(8))
    res = sinkhorn(S, tol=1e-7, max_iters=500)
    assert res.log_plan.shape == S.shape and res.marginal_error.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            one = sinkhorn(S[i, j], tol=1e-7, max_iters=500)
            torch.testing.assert_close(res.plan[i, j], one.plan, atol=1e-6, rtol=1e-5)


def test_explicit_marginals_give_experts_their_capacity_share():
    S = torch.randn(30, 3, generator=_gen(9))
    share = torch.tensor([15.0, 10.0, 5.0])
    res = sinkhorn(S, col_marginal=share, tol=1e-6, max_iters=1000)
    torch.testing.assert_close(res.plan.sum(0), share, atol=1e-4, rtol=0)


@pytest.mark.parametrize("epsilon", [0.5, 0.2, 0.1])
def test_two_by_two_plan_matches_the_closed_form_entropic_solution(epsilon):
    # token 0 prefers expert 1, but the total is larger on the diagonal: 1 + 5 - (3 + 2) = 1.
    # With unit marginals the entropic optimum puts sigmoid(1 / (2 eps)) on the diagonal.
    S = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    res = sinkhorn(S, epsilon=epsilon, tol=1e-9, max_iters=5000, compute_dtype=torch.float64)
    d = torch.sigmoid(torch.tensor(1 / (2 * epsilon), dtype=torch.float64))
    expected = torch.stack([torch.stack([d, 1 - d]), torch.stack([1 - d, d])])
    torch.testing.assert_close(res.plan, expected, atol=1e-7, rtol=0)


def test_gradients_through_the_unrolled_iterations_pass_gradcheck():
    S = torch.randn(5, 3, generator=_gen(10), dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=_gen(11), dtype=torch.float64)

    def f(s):
        return (sinkhorn(s, epsilon=0.7, tol=None, max_iters=15, compute_dtype=torch.float64).plan * w).sum()

    assert torch.autograd.gradcheck(f, (S,))


def test_gradients_with_masked_rows_are_finite():
    S = torch.randn(6, 3, generator=_gen(12), requires_grad=True)
    mask = torch.tensor([True, True, False, True, False, True])
    sinkhorn(S, row_mask=mask, tol=None, max_iters=10).plan.sum().backward()
    assert torch.isfinite(S.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"max_iters": 0}, "max_iters"),
        ({"tol": -1.0}, "tol"),
        ({"check_every": 0}, "check_every"),
        ({"compute_dtype": torch.float16}, "compute_dtype"),
        ({"row_mask": torch.ones(3)}, "row_mask"),
        ({"domain": "linear"}, "domain"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.randn(4, 2), **kwargs)


# ------------------------------------------------------------------------------ scaling (exp) domain


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaling_and_log_domains_compute_the_same_iterates(dtype, masked):
    S = 3 * torch.randn(2, 40, 8, generator=_gen(20))
    mask = torch.rand(2, 40, generator=_gen(21)) > 0.2 if masked else None
    kw = dict(epsilon=0.5, row_mask=mask, max_iters=37, tol=1e-6, check_every=4, compute_dtype=dtype)
    a = sinkhorn(S, domain="log", **kw)
    b = sinkhorn(S, domain="exp", **kw)
    assert int(a.iterations) == int(b.iterations)
    torch.testing.assert_close(a.plan, b.plan, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.marginal_error, b.marginal_error, atol=1e-6, rtol=1e-3)
    if masked:
        assert (b.plan[~mask] == 0).all() and torch.isneginf(b.f[~mask]).all()


def test_auto_domain_takes_logs_only_for_scores_spanning_hundreds_of_epsilon():
    kw = dict(epsilon=1.0, max_iters=500, tol=1e-4)
    wide = ADVERSARIAL["huge_logits_pm1000"](_gen(0))  # shifted scores 0 or -2000
    auto = sinkhorn(wide, **kw)
    assert torch.equal(auto.log_plan, sinkhorn(wide, domain="log", **kw).log_plan)
    _check_marginals(auto, wide.shape[0], wide.shape[1], 1e-4)
    narrow = torch.randn(64, 8, generator=_gen(22)) + torch.tensor([1000.0] + [0.0] * 7)
    auto = sinkhorn(narrow, **kw)  # a dominant expert alone is absorbed by the column shift
    assert torch.equal(auto.log_plan, sinkhorn(narrow, domain="exp", **kw).log_plan)
    _check_marginals(auto, 64, 8, 1e-4)
    fixed = sinkhorn(narrow, epsilon=1.0, max_iters=20, tol=None)  # no tolerance: no sync, logs
    assert torch.equal(
        fixed.log_plan, sinkhorn(narrow, epsilon=1.0, max_iters=20, tol=None, domain="log").log_plan
    )


def test_scaling_domain_gradients_pass_gradcheck_and_stay_finite_with_masked_rows():
    S = torch.randn(5, 3, generator=_gen(23), dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=_gen(24), dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, True])

    def f(s):
        res = sinkhorn(s, epsilon=0.7, tol=None, max_iters=15, compute_dtype=torch.float64, domain="exp")
        return (res.plan * w).sum()

    assert torch.autograd.gradcheck(f, (S,))
    S32 = S.detach().float().requires_grad_()
    sinkhorn(S32, row_mask=mask, max_iters=10, domain="exp").plan.sum().backward()
    assert torch.isfinite(S32.grad).all()


@pytest.mark.parametrize("std", [0.1, 1.0, 2.0])
def test_router_scale_logits_converge_at_the_first_check(std):
    """The Sinkhorn routers check every 5 iterations because router-scale logits need no more."""
    router = impls.build_router("s_base", d_model=8, num_experts=64)
    S = torch.randn(4096, 64, generator=torch.Generator().manual_seed(3)) * std
    cfg = router.config
    res = router.solve(S, None)
    assert int(res.iterations) == cfg.check_every == 5
    assert float(res.marginal_error) < cfg.sinkhorn_tol
