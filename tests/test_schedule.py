"""Cubic sparsity schedule, exact-count mask selection and GraNet regeneration (pure functions)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from optimum_mosaic.schedule import cubic_sparsity, prune_mask, regrow


def test_cubic_values_by_hand():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3 with s_i = 0.1, s_f = 0.7, t0 = 10, t_end = 50
    args = dict(initial=0.1, final=0.7, start_step=10, end_step=50)
    assert cubic_sparsity(0, **args) == pytest.approx(0.1)  # held at s_i before the start
    assert cubic_sparsity(10, **args) == pytest.approx(0.1)
    assert cubic_sparsity(30, **args) == pytest.approx(0.7 - 0.6 * 0.5**3)  # 0.625
    assert cubic_sparsity(20, **args) == pytest.approx(0.7 - 0.6 * 0.75**3)  # 0.446875
    assert cubic_sparsity(50, **args) == pytest.approx(0.7)
    assert cubic_sparsity(1000, **args) == pytest.approx(0.7)  # held at s_f after the end


def test_cubic_monotonic_and_front_loaded():
    values = [cubic_sparsity(t, 0.0, 0.9, 5, 105) for t in range(0, 120)]
    assert all(b >= a for a, b in pairwise(values))
    steps = [values[t + 1] - values[t] for t in range(5, 104)]
    assert all(b <= a + 1e-12 for a, b in pairwise(steps))  # the increments shrink: prune early
    assert values[55] == pytest.approx(0.9 * (1 - 0.5**3))


def test_cubic_frequency_quantises_down_to_the_last_update():
    args = dict(initial=0.0, final=0.8, start_step=3, end_step=43, frequency=10)
    for step, update in [(3, 3), (12, 3), (13, 13), (22, 13), (23, 23), (42, 33)]:
        assert cubic_sparsity(step, **args) == cubic_sparsity(update, 0.0, 0.8, 3, 43)
    assert cubic_sparsity(13, **args) == pytest.approx(0.8 * (1 - 0.75**3))
    assert cubic_sparsity(12, **args) == 0.0
    assert cubic_sparsity(43, **args) == pytest.approx(0.8)  # the end is always reached


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial=0.6, final=0.5), "initial <= final"),
        (dict(initial=-0.1, final=0.5), "initial <= final"),
        (dict(final=1.0), "< 1"),
        (dict(start_step=10, end_step=10), "start_step < end_step"),
        (dict(frequency=0), "frequency"),
        (dict(frequency=2.5), "frequency"),
    ],
)
def test_cubic_validation(kwargs, match):
    args = dict(step=1, initial=0.0, final=0.5, start_step=0, end_step=10, frequency=1) | kwargs
    with pytest.raises(ValueError, match=match):
        cubic_sparsity(**args)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.93, 1.0])
def test_prune_mask_exact_zero_count_and_lowest_scores(sparsity):
    scores = torch.randn(37, 23, generator=torch.Generator().manual_seed(1))
    mask = prune_mask(scores, sparsity)
    zeros = round(sparsity * scores.numel())
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int((~mask).sum()) == zeros
    if 0 < zeros < scores.numel():
        assert scores[~mask].max() < scores[mask].min()


def test_prune_mask_ties_are_exact_and_deterministic():
    scores = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 2.0]])  # many equal scores
    mask = prune_mask(scores, 0.5)
    assert int((~mask).sum()) == 4
    # the three zeros go first, then the first 1.0 in flat order (index 0)
    assert mask.tolist() == [[False, False, True, False], [True, True, False, True]]
    assert torch.equal(prune_mask(torch.ones(10, 10), 0.37), prune_mask(torch.ones(10, 10), 0.37))
    assert int((~prune_mask(torch.ones(10, 10), 0.37)).sum()) == 37
    assert (~prune_mask(torch.ones(10, 10), 0.37)).reshape(-1)[:37].all()  # earliest indices pruned first


def test_prune_mask_rejects_bad_sparsity():
    with pytest.raises(ValueError, match="sparsity"):
        prune_mask(torch.ones(4), 1.5)


def test_regrow_keeps_count_drops_weakest_and_grows_largest_gradient():
    mask = torch.tensor([True, True, True, True, False, False, False, False, True, True])
    weight = torch.tensor([0.9, -0.1, 0.5, 0.05, 0.0, 0.0, 0.0, 0.0, -2.0, 0.3])
    grad = torch.tensor([9.0, 9.0, 9.0, 9.0, 0.1, -3.0, 0.2, 2.0, 9.0, 9.0])
    new = regrow(mask, weight.abs(), grad, fraction=0.5)  # k = 0.5 × 4 zeros = 2
    assert int((~new).sum()) == int((~mask).sum()) == 4
    dropped = (mask & ~new).nonzero().squeeze(1).tolist()
    grown = (~mask & new).nonzero().squeeze(1).tolist()
    assert dropped == [1, 3]  # |W| = 0.1 and 0.05, the smallest survivors
    assert grown == [5, 7]  # |grad| = 3 and 2, the largest among pruned positions
    assert torch.equal(regrow(mask, weight.abs(), grad, 0.0), mask)


def test_regrow_on_matrices_is_deterministic_and_exact():
    gen = torch.Generator().manual_seed(3)
    weight, grad = torch.randn(16, 24, generator=gen), torch.randn(16, 24, generator=gen)
    mask = prune_mask(weight.abs(), 0.6)
    new = regrow(mask, weight.abs(), grad, 0.25)
    k = round(0.25 * int((~mask).sum()))
    assert int((~new).sum()) == int((~mask).sum())
    assert int((mask & ~new).sum()) == k == int((~mask & new).sum())
    grown_grad = grad.abs()[~mask & new]
    assert grown_grad.min() >= grad.abs()[~mask & ~new].max()  # regrown where |grad| is largest
    assert weight.abs()[mask & ~new].max() <= weight.abs()[mask & new].min()  # dropped the weakest
    assert torch.equal(new, regrow(mask, weight.abs(), grad, 0.25))
    full = regrow(mask, weight.abs(), grad, 1.0)  # k capped by the number of survivors
    assert int((~full).sum()) == int((~mask).sum())
