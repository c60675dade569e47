"""Sensitivity-aware mixed sparsity: rank-linear plans hit the target at every S, Hutchinson estimates traces."""

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.allocation.sensitivity import hutchinson_traces, input_hessian_proxy, rank_linear_allocation
from optimum_mosaic.calibration.statistics import InputStatistics
from optimum_mosaic.pruning.sparsegpt import mask_scores, sparsegpt_prune

KEYS = [(layer, proj) for layer in range(4) for proj in ("q", "k", "v", "o", "gate", "up", "down")]
NUMEL = {k: (64 * 64 if k[1] in "qkvo" else 64 * 172) for k in KEYS}  # unequal sizes, like a real model
SENS = {k: float((7 * i) % 11 + i / 100) for i, k in enumerate(KEYS)}  # distinct, not sorted by key


def weighted(plan) -> float:
    return sum(plan[k] * NUMEL[k] for k in plan) / sum(NUMEL.values())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.8])
def test_rank_linear_hits_the_weighted_target_at_every_sparsity(sparsity):
    plan = rank_linear_allocation(SENS, NUMEL, sparsity, alpha=0.1)
    assert weighted(plan) == pytest.approx(sparsity, abs=1e-9)
    assert all(sparsity - 0.1 - 1e-9 <= s <= sparsity + 0.1 + 1e-9 for s in plan.values())
    # the reference code's fixed lower keep bound (0.4) gives keep ratios in [0.4, 2(1-p)-0.4]: at p = 0.7
    # that interval is [0.4, 0.2], inverted, and its mean keep ratio is 0.3 only by accident of symmetry
    assert max(plan.values()) - min(plan.values()) == pytest.approx(0.2, abs=0.02)


def test_more_sensitive_matrices_are_pruned_less():
    plan = rank_linear_allocation(SENS, NUMEL, 0.5, alpha=0.1)
    order = sorted(SENS, key=SENS.get)
    values = [plan[k] for k in order]
    assert values == sorted(values, reverse=True)
    assert plan[order[0]] > plan[order[-1]]
    reversed_plan = rank_linear_allocation(SENS, NUMEL, 0.5, alpha=-0.1)
    assert reversed_plan[order[0]] < reversed_plan[order[-1]]


def test_equal_sizes_give_the_papers_linear_ramp():
    numel = {k: 100 for k in KEYS}
    plan = rank_linear_allocation(SENS, numel, 0.5, alpha=0.1)
    order = sorted(SENS, key=SENS.get)
    step = 0.2 / (len(KEYS) - 1)
    for rank, key in enumerate(order):  # s_r = S + α − r·2α/(N−1), no shift needed
        assert plan[key] == pytest.approx(0.6 - rank * step, abs=1e-9)


def test_input_hessian_proxy_is_the_mean_diagonal():
    stats = InputStatistics.empty(3, hessian=True)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    stats.update(x)
    assert input_hessian_proxy(stats.sumsq, stats.tokens) == pytest.approx(float(torch.diag(x.T @ x).mean() / 2))


def test_hutchinson_matches_the_exact_trace():
    model = tiny_llama(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    windows = token_windows(1, 12, seed=1)
    weight = model.model.layers[0].mlp.down_proj.weight  # 16 × 24 = 384 entries
    loss = lambda: model(input_ids=windows, labels=windows).loss  # noqa: E731
    weight.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(), weight, create_graph=True)
    exact = 0.0
    for i in range(weight.numel()):  # Σ_i ∂²L/∂w_i², one Hessian-vector product per unit vector
        e = torch.zeros(weight.numel())
        e[i] = 1.0
        (hv,) = torch.autograd.grad(grad, weight, grad_outputs=e.view_as(weight), retain_graph=True)
        exact += float(hv.flatten()[i])
    exact /= weight.numel()
    many = hutchinson_traces(model, windows, {(0, "down"): weight}, samples=300, seed=3)
    assert many[(0, "down")] == pytest.approx(exact, rel=0.1)


@pytest.mark.parametrize("allocation", ["sensitivity", "sensitivity_hutchinson"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_pipeline_reaches_the_target_exactly(allocation, sparsity):
    model = tiny_llama()
    config = PrunedConfig(sparsity=sparsity, allocation=allocation, nsamples=8, seqlen=32, hessian_samples=3)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(8, 32))
    report = model.mosaic_report
    assert config.lamda == 0.1  # the paper's α by default
    assert report.planned_sparsity == pytest.approx(sparsity, abs=1e-6)
    # channels whose down column ends up all-zero are removed losslessly; their gate/up rows then count too
    assert sparsity - 2e-3 <= report.achieved_sparsity <= sparsity + 2e-3 + report.structured_sparsity
    values = [s for layer in report.plan.values() for s in layer.values()]
    assert min(values) >= sparsity - 0.1 - 1e-6 and max(values) <= sparsity + 0.1 + 1e-6
    assert max(values) - min(values) > 0.1  # really mixed


def test_isc_score_adds_the_obd_term_and_changes_the_mask():
    W = torch.tensor([[1.0, 1.0, 0.5]])
    d = torch.tensor([1.0, 2.0, 1.0])  # U_jj
    h = torch.tensor([0.1, 10.0, 0.1])  # H_jj
    assert torch.allclose(mask_scores(W, d, h, "obs"), torch.tensor([[1.0, 0.25, 0.25]]))
    assert torch.allclose(mask_scores(W, d, h, "isc"), torch.tensor([[1.1, 10.25, 0.275]]))
    torch.manual_seed(0)
    X = torch.randn(256, 32) @ torch.randn(32, 32) * torch.linspace(0.1, 3, 32)
    stats = InputStatistics.empty(32, hessian=True)
    stats.update(X)
    weight = torch.randn(16, 32)
    obs = sparsegpt_prune(weight, stats, 0.5, block_size=32)
    isc = sparsegpt_prune(weight, stats, 0.5, block_size=32, saliency="isc")
    assert int((isc == 0).sum()) == int((obs == 0).sum()) == 256
    assert not torch.equal(isc == 0, obs == 0)


def test_bad_saliency_is_rejected():
    with pytest.raises(ValueError, match="saliency"):
        PrunedConfig(saliency="hessian")
