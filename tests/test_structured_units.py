"""The structured-pruning helpers on small inputs with hand-computed expectations: ``restrict_statistics``,
``remainder_plan``, ``remove_empty_units`` and ``unit_options`` (its costs against an independent ridge least
squares, not against ``StructuredOBS``)."""

import itertools

import pytest
import torch
from conftest import hessian_stats, tiny_llama, token_windows

from optimum_mosaic.architectures import get_arch_spec, layer_projections
from optimum_mosaic.calibration.statistics import InputStatistics
from optimum_mosaic.plan import SparsityPlan
from optimum_mosaic.structured import layer_shape, unit_options
from optimum_mosaic.structured.budget import Option
from optimum_mosaic.structured.composite import remainder_plan, remove_empty_units, restrict_statistics

pytestmark = pytest.mark.usefixtures("one_thread")


# -- restrict_statistics ------------------------------------------------------------------------------
def test_restrict_statistics_keeps_the_columns_of_the_kept_units():
    H = torch.arange(36.0).view(6, 6)  # H[i, j] = 6i + j
    stats = InputStatistics(torch.arange(6.0), H, 7, 10 * torch.arange(6.0))
    out = restrict_statistics(stats, torch.tensor([0, 2]), unit_size=2)  # units of 2 columns: 0, 1 and 4, 5
    assert out.sumsq.tolist() == [0, 1, 4, 5]
    assert out.hessian.tolist() == [[0, 1, 4, 5], [6, 7, 10, 11], [24, 25, 28, 29], [30, 31, 34, 35]]
    assert out.total.tolist() == [0, 10, 40, 50] and out.tokens == 7
    single = restrict_statistics(InputStatistics(torch.arange(6.0), None, 3), torch.tensor([5, 1]))
    assert single.sumsq.tolist() == [5, 1] and single.hessian is None and single.total is None


def test_restrict_statistics_equals_the_statistics_of_the_kept_inputs():
    X = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    kept, cols = torch.tensor([1, 3]), torch.tensor([3, 4, 5, 9, 10, 11])  # units of 3 columns
    out, direct = restrict_statistics(hessian_stats(X), kept, 3), hessian_stats(X[:, cols])
    for name in ("sumsq", "hessian", "total"):
        torch.testing.assert_close(getattr(out, name), getattr(direct, name))
    assert out.tokens == direct.tokens == 40


# -- remainder_plan -----------------------------------------------------------------------------------
def test_remainder_plan_counts_removed_weights_as_zeros():
    dense = {(0, "a"): 100, (0, "b"): 100}
    # a lost 40 of its 100 weights to structured pruning: 50 zeros wanted, 40 gone, 10 of the 60 left → 1/6
    plan = remainder_plan(
        SparsityPlan({(0, "a"): 0.5, (0, "b"): 0.5}, dense), dense, {(0, "a"): 60, (0, "b"): 100}, 0.5
    )
    assert plan[(0, "a")] == pytest.approx(1 / 6) and plan[(0, "b")] == pytest.approx(0.5)
    assert dict(plan.numel) == {(0, "a"): 60, (0, "b"): 100}  # weighted by what is left


def test_remainder_plan_clamps_and_refits_to_the_exact_total():
    dense, numel = {(0, "a"): 100, (0, "b"): 100}, {(0, "a"): 50, (0, "b"): 100}
    # raw: a (40 − 50)/50 = −0.2, b 0.6; remaining target (100 − 50)/150 = 1/3 → shift −0.1: a clamps to 0, b 0.5
    plan = remainder_plan(SparsityPlan({(0, "a"): 0.4, (0, "b"): 0.6}, dense), dense, numel, 0.5)
    assert plan[(0, "a")] == pytest.approx(0.0, abs=1e-9) and plan[(0, "b")] == pytest.approx(0.5, abs=1e-9)
    zeros = sum(dense[k] - numel[k] + plan[k] * numel[k] for k in numel)
    assert zeros == pytest.approx(0.5 * 200)  # S over the dense model


def test_remainder_plan_is_zero_when_structured_pruning_already_met_the_target():
    dense, numel = {(0, "a"): 100, (0, "b"): 100}, {(0, "a"): 40, (0, "b"): 100}
    plan = remainder_plan(SparsityPlan({(0, "a"): 0.3, (0, "b"): 0.3}, dense), dense, numel, 0.3)  # 60 = 0.3·200
    assert dict(plan) == {(0, "a"): 0.0, (0, "b"): 0.0} and dict(plan.numel) == numel


# -- remove_empty_units -------------------------------------------------------------------------------
def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_remove_empty_units_drops_exactly_the_dead_units_and_nothing_changes():
    model = tiny_llama()  # hidden 64, MLP 128, 4 heads of 16 in 2 key/value groups, no biases
    spec, x = get_arch_spec(model), token_windows(2, 16)
    p0, p1 = layer_projections(model.model.layers[0], spec), layer_projections(model.model.layers[1], spec)
    with torch.no_grad():
        p0["down"].weight[:, 5] = 0  # channel 5: its output is zero
        p0["gate"].weight[7] = 0  # channel 7: silu(0) = 0
        p0["up"].weight[9] = 0  # channel 9: gate · 0
        p0["down"].weight[1:, 11] = 0  # channel 11 still writes into row 0: stays
        p1["v"].weight[16:32] = 0  # group 1: its two heads read zero values
        p1["q"].weight[:16] = 0  # head 0 has zero queries: uniform attention, not zero output: stays
        p1["k"].weight[:16] = 0
    before = _logits(model, x)
    removed = remove_empty_units(model, spec)
    # 3 channels × (gate row + up row + down column) of 64, one group: k and v rows (2 × 16 × 64) and its
    # two query heads (q rows and o columns: 2 × 32 × 64)
    assert removed == 3 * 3 * 64 + 2 * 16 * 64 + 2 * 32 * 64
    s0, s1, s2 = (layer_shape(layer, spec) for layer in model.model.layers)
    assert (s0.intermediate, s0.heads, s0.kv_heads) == (125, 4, 2)
    assert (s1.intermediate, s1.heads, s1.kv_heads) == (128, 2, 1)
    assert (s2.intermediate, s2.heads, s2.kv_heads) == (128, 4, 2)
    kept = [c for c in range(128) if c not in (5, 7, 9)]
    dense = tiny_llama()
    assert torch.equal(p0["gate"].weight[kept], layer_projections(model.model.layers[0], spec)["gate"].weight)
    assert torch.equal(
        layer_projections(dense.model.layers[1], spec)["v"].weight[:16],
        layer_projections(model.model.layers[1], spec)["v"].weight,
    )
    torch.testing.assert_close(_logits(model, x), before, atol=1e-5, rtol=0)
    assert remove_empty_units(model, spec) == 0  # nothing left to remove


def test_remove_empty_units_skips_layers_with_biases_and_all_empty_layers():
    model = tiny_llama(attention_bias=True)
    spec = get_arch_spec(model)
    with torch.no_grad():
        layer_projections(model.model.layers[0], spec)["down"].weight[:, 3] = 0
    assert remove_empty_units(model, spec) == 0  # v has a bias: a zero v row still outputs its bias
    model = tiny_llama()
    with torch.no_grad():
        layer_projections(model.model.layers[2], spec)["down"].weight.zero_()  # every channel empty
    assert remove_empty_units(model, spec) == 0  # a layer keeps at least one unit of each kind


# -- unit_options -------------------------------------------------------------------------------------
def _inputs(tokens, cols, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    return X @ (torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64))


def ridge_cost(W, X, dampening, removed) -> float:
    """``min ‖(W − W')Xᵀ‖² + λ‖W − W'‖²`` over ``W'`` zero on the ``removed`` columns, λ = δ·mean(diag XᵀX):
    least squares on the design ``[X; √λ I]`` restricted to the kept columns (lstsq, no Hessian inverse)."""
    W, n = W.double(), X.shape[1]
    lam = dampening * X.square().sum(0).mean()
    A = torch.cat([X, lam.sqrt() * torch.eye(n, dtype=torch.float64)])
    kept = [j for j in range(n) if j not in set(removed)]
    target = A @ W.T
    solution = torch.linalg.lstsq(A[:, kept], target).solution
    return (target - A[:, kept] @ solution).square().sum().item()


def test_unit_options_list_every_choice_with_its_ridge_least_squares_cost():
    model = tiny_llama()  # hidden 64, MLP 128, 4 heads of 16 in 2 groups
    spec, layer = get_arch_spec(model), model.model.layers[0]
    X = {"o": _inputs(200, 64, 1), "down": _inputs(300, 128, 2)}
    stats = {k: InputStatistics(x.square().sum(0), x.T @ x, x.shape[0]) for k, x in X.items()}
    damp, scale = 0.01, 2.0
    options = unit_options(layer, spec, stats, ("mlp", "attention"), damp, scale)
    p = layer_projections(layer, spec)

    # MLP: up to int(0.9·128) = 115 channels in ≤ 64 batches of ceil(115/64) = 2; each channel is 3 × 64 weights
    mlp = options["mlp"]
    assert [o.value for o in mlp] == list(range(0, 115, 2)) + [115]
    assert all(o.params == o.value * 3 * 64 for o in mlp) and mlp[0] == Option(0, 0, 0.0)
    assert all(a.cost <= b.cost for a, b in itertools.pairwise(mlp))
    down = p["down"].weight
    singles = [ridge_cost(down, X["down"], damp, [c]) for c in range(128)]
    first = sorted(range(128), key=singles.__getitem__)[:2]  # the first batch: the two cheapest alone
    assert mlp[1].cost == pytest.approx(ridge_cost(down, X["down"], damp, first) / scale, rel=1e-6)

    # attention: keep g groups × r heads each; whole = 2·64·16·(4 + 2) weights, a choice keeps 2·64·16·(g·r + g)
    attention = options["attention"]
    assert [o.value for o in attention] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [o.params for o in attention] == [8192, 6144, 4096, 0]
    o = p["o"].weight

    def cost(heads):
        return ridge_cost(o, X["o"], damp, [16 * h + d for h in heads for d in range(16)]) / scale

    group = min((0, 1), key=lambda g: cost([2 * g, 2 * g + 1]))  # (1, 2): the cheaper whole group goes
    other = [2 * (1 - group), 2 * (1 - group) + 1]
    then = min(other, key=lambda h: cost([2 * group, 2 * group + 1, h]))  # (1, 1): then the cheaper head left
    per_group = [min((2 * g, 2 * g + 1), key=lambda h: cost([h])) for g in (0, 1)]  # (2, 1): each group's cheapest
    expected = [cost([2 * group, 2 * group + 1, then]), cost([2 * group, 2 * group + 1]), cost(per_group), 0.0]
    assert [o.cost for o in attention] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert len({round(c, 6) for c in expected}) == 4  # the four choices differ: a wrong pick would show


def test_unit_options_only_the_kinds_asked_for():
    model = tiny_llama()
    spec = get_arch_spec(model)
    stats = {"down": InputStatistics(torch.ones(128), _inputs(300, 128, 3).T @ _inputs(300, 128, 3), 300)}
    assert list(unit_options(model.model.layers[1], spec, stats, ("mlp",), 0.01, 1.0)) == ["mlp"]
