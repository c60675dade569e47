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


def _ls_cost(W, H, removed):
    """The output error of removing the columns ``removed`` with the least-squares refit of the rest."""
    kept = torch.tensor([j for j in range(W.shape[1]) if j not in set(removed)])
    new = torch.zeros_like(W, dtype=torch.float64)
    new[:, kept] = _least_squares(W, H, kept)
    return _error(W, new, H)


def ridge_refit(W, X, dampening, kept, ones=False):
    """``(W', cost)``: ``min ‖(W − W')Xᵀ‖² + λ‖W − W'‖²`` over ``W'`` zero off the ``kept`` columns, with
    ``λ = δ·mean(diag H)`` of the Hessian the damping is added to (``ones``: ``X`` gains a constant column, as
    the intercept does, which is kept and damped too). Solved by ``lstsq`` on the design ``[X; √λ I]``."""
    W, X = W.double(), X.double()
    if ones:
        X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
        kept = torch.cat([torch.as_tensor(kept), torch.tensor([X.shape[1] - 1])])
    lam = dampening * X.square().sum(0).mean()
    A = torch.cat([X, lam.sqrt() * torch.eye(X.shape[1], dtype=X.dtype)])
    target = A @ W.T
    solution = torch.linalg.lstsq(A[:, kept], target).solution
    new = torch.zeros_like(W)
    new[:, kept] = solution.T
    return new, (target - A[:, kept] @ solution).square().sum().item()


def _inputs(seed, tokens, cols):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    return X @ torch.randn(cols, cols, generator=g, dtype=torch.float64), g


@pytest.mark.parametrize(("unit", "dampening"), [(1, None), (4, None), (1, 0.1), (4, 0.1)])
def test_damped_removal_equals_ridge_least_squares(unit, dampening):
    """The default path (δ = 0.01, ``H + δ·mean(diag H)·I``) is ridge regression on the kept columns."""
    X, g = _inputs(6, 200, 32)
    W = torch.randn(12, 32, generator=g, dtype=torch.float64)
    stats = InputStatistics(X.square().sum(0), X.T @ X, X.shape[0])
    state = StructuredOBS(W, stats.hessian) if dampening is None else StructuredOBS(W, stats.hessian, dampening)
    removed = head_columns(torch.tensor([1, 5]), unit).flatten()
    cost = state.remove(removed)
    kept = torch.tensor([j for j in range(32) if j not in removed.tolist()])
    expected, expected_cost = ridge_refit(W, X, 0.01 if dampening is None else dampening, kept)
    torch.testing.assert_close(state.W, expected, rtol=1e-8, atol=1e-9)
    assert cost == pytest.approx(expected_cost, rel=1e-8)
    undamped = torch.zeros_like(W)
    undamped[:, kept] = _least_squares(W, stats.hessian, kept)
    assert (state.W - undamped).abs().max() > 1e-3 * W.abs().max()  # the damping term is really there


def test_damped_removal_with_intercept_damps_the_bias_too():
    X, g = _inputs(7, 300, 16)
    X += 2.0 * torch.randn(16, generator=g, dtype=torch.float64)
    W, b = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    stats = InputStatistics(X.square().sum(0), X.T @ X, X.shape[0], X.sum(0))
    removed = torch.tensor([0, 4, 9])
    state = StructuredOBS(W, stats.hessian, 0.05, intercept=(stats.total, stats.tokens, b))
    cost = state.remove(removed)
    kept = torch.tensor([j for j in range(16) if j not in removed.tolist()])
    expected, expected_cost = ridge_refit(torch.cat([W, b.view(-1, 1)], 1), X, 0.05, kept, ones=True)
    torch.testing.assert_close(state.weight, expected[:, :16], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(state.bias, expected[:, 16], rtol=1e-8, atol=1e-9)
    assert cost == pytest.approx(expected_cost, rel=1e-8)


def test_damped_greedy_costs_add_up_to_the_ridge_cost_of_their_union():
    X, g = _inputs(8, 200, 24)
    W = torch.randn(10, 24, generator=g, dtype=torch.float64)
    kept, curve = greedy_channels(StructuredOBS(W, X.T @ X), 9, steps=4)  # default damping, batches of 3
    assert [c for c, _ in curve] == [3, 3, 3]
    _, union = ridge_refit(W, X, 0.01, kept)
    assert sum(e for _, e in curve) == pytest.approx(union, rel=1e-8)


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
    singles = [_ls_cost(W, stats.hessian, head_columns(torch.tensor([h]), 4).flatten().tolist()) for h in range(9)]
    dropped = [min(range(3 * g, 3 * g + 3), key=singles.__getitem__) for g in range(3)]  # each group's cheapest
    assert groups.tolist() == [0, 1, 2] and heads.tolist() == [h for h in range(9) if h not in dropped]
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
    """The shrunk layer holds the kept rows of q, k, v, gate, up as they were and the ridge least-squares refit of
    o and down on what they keep; the dense model with those weights written back at full width (zero columns
    elsewhere, built here by hand) computes the same logits, and so does it after ``mask_units``."""
    shrunk, masked, dense = tiny_llama(), tiny_llama(), tiny_llama()
    spec = get_arch_spec(shrunk)
    X = {"o": _inputs(0, 128, 64)[0], "down": _inputs(1, 256, 128)[0]}
    stats = {p: InputStatistics(x.square().sum(0), x.T @ x, x.shape[0]) for p, x in X.items()}
    keep = remove_units(shrunk.model.layers[1], spec, stats, cut, dampening=0.01)
    shape = layer_shape(shrunk.model.layers[1], spec)
    assert (shape.intermediate, shape.kv_heads, shape.heads) == (
        cut.channels,
        cut.groups,
        cut.groups * cut.heads_per_group,
    )
    new, old = layer_projections(shrunk.model.layers[1], spec), layer_projections(dense.model.layers[1], spec)
    q_rows, kv_rows = head_columns(keep["heads"], 16).flatten(), head_columns(keep["groups"], 16).flatten()
    rows = dict(q=q_rows, k=kv_rows, v=kv_rows, gate=keep["channels"], up=keep["channels"])
    for key, kept_rows in rows.items():
        assert torch.equal(new[key].weight, old[key].weight[kept_rows]), key
    cols = {"o": q_rows, "down": keep["channels"]}
    for key, kept in cols.items():
        expected, _ = ridge_refit(old[key].weight, X[key], 0.01, kept)
        torch.testing.assert_close(new[key].weight.double(), expected[:, kept], rtol=1e-5, atol=1e-7)
    layer = masked.model.layers[1]
    for key, kept in cols.items():  # zero columns silence the removed heads and channels
        full = layer_projections(layer, spec)[key].weight
        full.data.zero_()
        full.data[:, kept] = new[key].weight.data
    x = token_windows(2, 24)
    with torch.no_grad():
        reference = masked(x).logits
        torch.testing.assert_close(shrunk(x).logits, reference, atol=1e-5, rtol=0)
        apply_cuts(layer, spec, keep, physical=False)  # mask_units: the same function
        torch.testing.assert_close(masked(x).logits, reference, atol=1e-6, rtol=0)
        out = shrunk.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    gone = torch.tensor([c for c in range(128) if c not in keep["channels"].tolist()], dtype=torch.long)
    assert not layer_projections(layer, spec)["gate"].weight[gone].any()
    assert out.shape == (1, 9)
