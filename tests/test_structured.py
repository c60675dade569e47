"""Structured pruning: structured-OBS removal against least squares, greedy choice against baselines, the GQA
rule, the budget across layers, shrunk == masked."""

import itertools

import pytest
import torch
from conftest import correlated_problem, tiny_llama, token_windows

from optimum_mosaic.architectures import get_arch_spec, layer_projections
from optimum_mosaic.calibration.statistics import InputStatistics
from optimum_mosaic.structured import LayerCut, apply_cuts, layer_shape, remove_units
from optimum_mosaic.structured.budget import Option, allocate_removal
from optimum_mosaic.structured.obs import StructuredOBS, greedy_channels, greedy_heads, head_columns


def _least_squares(W, H, kept):
    """Best ``W_K`` for ``W X ≈ W_K X_K``: ``W H_:,K H_KK⁻¹`` (float64)."""
    W, H = W.double(), H.double()
    return W @ H[:, kept] @ torch.linalg.inv(H[kept][:, kept])


def _error(W, new, H):
    E = (W.double() - new).double()
    return torch.trace(E @ H.double() @ E.T).item()


@pytest.mark.parametrize("unit", [1, 4])
def test_removal_equals_least_squares_refit(unit):
    W, stats = correlated_problem(seed=1, rows=12, cols=32)
    H = stats.hessian
    state = StructuredOBS(W, H, dampening=0.0)
    removed = head_columns(torch.tensor([1, 5]), unit).flatten()
    cost = state.remove(removed)
    kept = torch.tensor([j for j in range(32) if j not in removed.tolist()])
    torch.testing.assert_close(state.W[:, kept], _least_squares(W, H, kept), rtol=1e-8, atol=1e-8)
    assert torch.count_nonzero(state.W[:, removed]) == 0
    assert cost == pytest.approx(_error(W, state.W, H), rel=1e-8)  # ε is the output error it causes


def test_removal_with_intercept_equals_least_squares_with_a_bias():
    """FLAP-style compensation: ``min ‖W X + b − W'_K X_K − b'‖`` over (W'_K, b'), solved here from X directly."""
    g = torch.Generator().manual_seed(3)
    W, b = torch.randn(10, 24, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    X += 3.0 * torch.randn(24, generator=g, dtype=torch.float64)  # inputs with a mean: the bias has work to do
    stats = InputStatistics(X.square().sum(0), X.T @ X, X.shape[0], X.sum(0))
    removed = torch.tensor([2, 7, 11, 19])
    kept = torch.tensor([j for j in range(24) if j not in removed.tolist()])
    state = StructuredOBS(W, stats.hessian, dampening=0.0, intercept=(stats.total, stats.tokens, b))
    cost = state.remove(removed)
    design = torch.cat([X[:, kept], torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    solution = torch.linalg.lstsq(design, X @ W.T + b).solution.T  # [10, |K| + 1]
    torch.testing.assert_close(state.weight[:, kept], solution[:, :-1], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(state.bias, solution[:, -1], rtol=1e-7, atol=1e-8)
    assert torch.count_nonzero(state.weight[:, removed]) == 0
    residual = X @ W.T + b - design @ solution.T
    assert cost == pytest.approx(residual.square().sum().item(), rel=1e-7)
    plain = StructuredOBS(W, stats.hessian, dampening=0.0).remove(removed)  # no intercept: the mean costs more
    assert cost < 0.9 * plain


def test_chained_removals_cost_what_the_union_costs():
    W, stats = correlated_problem(seed=2, rows=10, cols=24)
    chained = StructuredOBS(W, stats.hessian, dampening=0.0)
    steps = [chained.remove(torch.tensor(p)) for p in ([3], [8, 9], [20])]
    joint = StructuredOBS(W, stats.hessian, dampening=0.0).remove(torch.tensor([3, 8, 9, 20]))
    assert sum(steps) == pytest.approx(joint, rel=1e-8)


def _cost_of(W, H, removed):
    return StructuredOBS(W, H, dampening=0.0).remove(torch.as_tensor(removed))


@pytest.mark.parametrize("seed", range(3))
def test_greedy_choice_beats_random_and_wanda_sum(seed):
    W, stats = correlated_problem(seed=seed, rows=24, cols=48, tokens=512)
    H, remove = stats.hessian, 16
    kept, curve = greedy_channels(StructuredOBS(W, H, dampening=0.0), remove, steps=remove)
    greedy = _cost_of(W, H, sorted(set(range(48)) - set(kept.tolist())))
    assert greedy == pytest.approx(sum(c for _, c in curve), rel=1e-6)
    wanda = W.abs().sum(0) * stats.sumsq.sqrt()  # Σ_r |W_rj|·‖X_j‖, the old unit score
    wanda_cost = _cost_of(W, H, torch.argsort(wanda)[:remove].tolist())
    g = torch.Generator().manual_seed(seed)
    random_cost = min(_cost_of(W, H, torch.randperm(48, generator=g)[:remove].tolist()) for _ in range(5))
    assert greedy < 0.9 * wanda_cost and greedy < 0.9 * random_cost
    # removal *with* compensation beats zeroing the same columns
    zeroed = W.clone()
    zeroed[:, sorted(set(range(48)) - set(kept.tolist()))] = 0
    assert greedy < 0.9 * _error(W, zeroed, H)


def _head_cost(W, H, removed_heads, head_dim=4):
    return _cost_of(W, H, head_columns(torch.tensor(sorted(removed_heads)), head_dim).flatten())


def test_greedy_heads_drop_the_cheapest_whole_group():
    W, stats = correlated_problem(seed=4, rows=16, cols=36, tokens=512)  # 9 heads of 4 columns, 3 groups of 3
    heads, groups, cost = greedy_heads(StructuredOBS(W, stats.hessian, 0.0), 4, 3, groups_keep=2, heads_per_group=3)
    by_group = {g: _head_cost(W, stats.hessian, [3 * g, 3 * g + 1, 3 * g + 2]) for g in range(3)}
    dropped = min(by_group, key=by_group.get)
    assert groups.tolist() == [g for g in range(3) if g != dropped]
    assert heads.tolist() == [h for h in range(9) if h // 3 != dropped]
    assert cost == pytest.approx(by_group[dropped], rel=1e-8)


def test_greedy_heads_keep_equal_heads_per_group():
    W, stats = correlated_problem(seed=5, rows=16, cols=36, tokens=512)
    heads, groups, cost = greedy_heads(StructuredOBS(W, stats.hessian, 0.0), 4, 3, groups_keep=3, heads_per_group=2)
    assert groups.tolist() == [0, 1, 2] and [h // 3 for h in heads.tolist()] == [0, 0, 1, 1, 2, 2]
    removed = sorted(set(range(9)) - set(heads.tolist()))
    assert cost == pytest.approx(_head_cost(W, stats.hessian, removed), rel=1e-8)
    others = [_head_cost(W, stats.hessian, combo) for combo in itertools.product([0, 1, 2], [3, 4, 5], [6, 7, 8])]
    assert cost <= sorted(others)[len(others) // 4]  # among the cheapest quarter of the 27 choices


def test_allocation_matches_brute_force_on_a_small_problem():
    g = torch.Generator().manual_seed(0)
    options = {}
    for key in range(4):  # convex cost curves of different steepness
        steep = float(torch.rand(1, generator=g)) * 5 + 0.5
        options[key] = [Option(k, 10 * k, steep * k * k) for k in range(6)]
    budget = 90
    choice = allocate_removal(options, budget)
    best = min(
        (sum(options[k][c].cost for k, c in enumerate(combo)), combo)
        for combo in itertools.product(range(6), repeat=4)
        if sum(options[k][c].params for k, c in enumerate(combo)) == budget
    )
    assert sum(o.params for o in choice.values()) == budget
    assert sum(o.cost for o in choice.values()) == pytest.approx(best[0])


def test_allocation_spends_the_budget_and_prefers_cheap_layers():
    cheap = [Option(k, k, 0.01 * k) for k in range(0, 101, 10)]
    dear = [Option(k, k, 1.0 * k) for k in range(0, 101, 10)]
    choice = allocate_removal({"cheap": cheap, "dear": dear}, budget=130)
    assert choice["cheap"].params == 100 and choice["dear"].params == 30


def test_cut_numel_matches_the_shrunk_layer():
    model = tiny_llama(num_attention_heads=6, num_key_value_heads=3, hidden_size=96, intermediate_size=80)
    spec = get_arch_spec(model)
    layer = model.model.layers[0]
    shape, cut = layer_shape(layer, spec), LayerCut(channels=37, groups=2, heads_per_group=1)
    apply_cuts(
        layer, spec, {"channels": torch.arange(37), "heads": torch.tensor([0, 2]), "groups": torch.tensor([0, 1])}
    )
    found = {k: lin.weight.numel() for k, lin in layer_projections(layer, spec).items()}
    assert found == cut.numel(shape, spec.keys)
    assert sum(found.values()) == shape.attention_size(2, 1) + 3 * 96 * 37


@pytest.mark.parametrize("cut", [LayerCut(96, 2, 2), LayerCut(40, 1, 1), LayerCut(128, 2, 1)])
def test_shrunk_model_equals_masked_model(cut):
    shrunk, masked = tiny_llama(), tiny_llama()
    spec = get_arch_spec(shrunk)
    g = torch.Generator().manual_seed(0)
    hess = {p: torch.randn(n * 2, n, generator=g) for p, n in {"o": 64, "down": 128}.items()}
    stats = {p: InputStatistics(torch.ones(x.shape[1]), x.T @ x, x.shape[0]) for p, x in hess.items()}
    keep = remove_units(shrunk.model.layers[1], spec, stats, cut, dampening=0.01)
    masked.model.layers[1].load_state_dict(
        {k: v for k, v in masked.model.layers[1].state_dict().items() if "o_proj" not in k and "down_proj" not in k},
        strict=False,
    )
    layer = masked.model.layers[1]
    for key in ("o", "down"):  # the compensated weights, back at full width
        full = layer_projections(layer, spec)[key].weight
        cols = keep["channels"] if key == "down" else head_columns(keep["heads"], 16).flatten()
        full.data.zero_()
        full.data[:, cols] = layer_projections(shrunk.model.layers[1], spec)[key].weight.data
    apply_cuts(layer, spec, keep, physical=False)
    shape = layer_shape(shrunk.model.layers[1], spec)
    assert (shape.intermediate, shape.kv_heads, shape.heads) == (
        cut.channels,
        cut.groups,
        cut.groups * cut.heads_per_group,
    )
    x = token_windows(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x).logits, masked(x).logits, atol=1e-5, rtol=0)
        out = shrunk.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
