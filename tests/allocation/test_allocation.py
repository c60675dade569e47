"""Allocation: pure functions from outlier profiles to plans."""

import random

import pytest
import torch

from optimum_mosaic.allocation.fit import fit_to_target, normalise
from optimum_mosaic.allocation.outliers import OutlierProfile
from optimum_mosaic.allocation.owl import owl_allocation
from optimum_mosaic.allocation.pod import pod_allocation, pod_official_allocation
from optimum_mosaic.allocation.search import search_allocation, search_grid
from optimum_mosaic.allocation.uniform import uniform_allocation

PROJ = ("q", "k", "v", "o", "gate", "up", "down")
# SmolLM2-135M projection sizes: d 576, kv 192, ffn 1536
SIZES = {
    "q": 576 * 576,
    "k": 192 * 576,
    "v": 192 * 576,
    "o": 576 * 576,
    "gate": 1536 * 576,
    "up": 1536 * 576,
    "down": 576 * 1536,
}


def random_profile(layers=12, seed=0, m=5.0) -> OutlierProfile:
    rng = random.Random(seed)
    numel = {(i, p): SIZES[p] for i in range(layers) for p in PROJ}
    profile = OutlierProfile(numel)
    profile.projection[m] = {k: rng.uniform(0.001, 0.05) for k in numel}
    profile.layer[m] = {i: rng.uniform(0.001, 0.05) for i in range(layers)}
    return profile


def test_outlier_ratios_by_hand():
    profile = OutlierProfile({(0, "q"): 4, (0, "k"): 4})
    scores = {"q": torch.tensor([1.0, 1.0, 1.0, 9.0]), "k": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    profile.add_layer(0, scores, [2.0])
    # q: mean 3, above 6 → 1 of 4; k: none; layer: mean 2, above 4 → the 9 only → 1 of 8
    assert profile.projection[2.0] == {(0, "q"): 0.25, (0, "k"): 0.0}
    assert profile.layer[2.0] == {0: 0.125}


def test_normalise_spans_zero_to_two_lamda():
    c = normalise({"a": 1.0, "b": 3.0, "c": 2.0}, 0.1)
    assert c == pytest.approx({"a": 0.0, "b": 0.2, "c": 0.1})
    assert normalise({"a": 1.0, "b": 1.0}, 0.1) == {"a": 0.0, "b": 0.0}


def test_fit_to_target_hits_the_target_inside_the_band():
    raw = {(0, "a"): 0.3, (1, "a"): 0.9, (2, "a"): 0.75}
    numel = {(0, "a"): 100, (1, "a"): 300, (2, "a"): 50}
    plan = fit_to_target(raw, numel, 0.6, lo=0.5, hi=0.7)
    assert plan.global_sparsity() == pytest.approx(0.6, abs=1e-9)
    assert all(0.5 - 1e-12 <= s <= 0.7 + 1e-12 for s in plan.values())


def test_uniform():
    plan = uniform_allocation(random_profile(), 0.7)
    assert set(plan.values()) == {0.7}


@pytest.mark.parametrize("sparsity,lamda", [(0.5, 0.08), (0.7, 0.08), (0.7, 0.15), (0.6, 0.03), (0.7, -0.08)])
def test_projection_plan_stays_in_band_and_hits_target(sparsity, lamda):
    plan = pod_allocation(random_profile(seed=1), sparsity, lamda=lamda, outlier_threshold=5.0)
    values = list(plan.values())
    assert plan.global_sparsity() == pytest.approx(sparsity, abs=1e-6)
    assert min(values) >= sparsity - abs(lamda) - 1e-9 and max(values) <= sparsity + abs(lamda) + 1e-9
    assert max(values) - min(values) > abs(lamda)  # the allocation really varies


@pytest.mark.parametrize("lamda", [0.05, -0.05])
def test_projection_direction_follows_the_sign_of_lamda(lamda):
    """λ > 0: the layer where a projection has the most outliers keeps the most weights; λ < 0: the fewest."""
    profile = random_profile(seed=2)
    plan = pod_allocation(profile, 0.6, lamda=lamda, outlier_threshold=5.0)
    ratios = profile.projection[5.0]
    for p in PROJ:
        keys = [k for k in plan if k[1] == p]
        most, least = max(keys, key=ratios.get), min(keys, key=ratios.get)
        assert (plan[most] < plan[least]) == (lamda > 0)


def test_owl_spread_is_two_lamda_and_mean_is_target():
    profile = random_profile(seed=3)
    plan = owl_allocation(profile, 0.7, lamda=0.08, outlier_threshold=5.0)
    layer = {i: plan[(i, "q")] for i in range(12)}
    assert max(layer.values()) - min(layer.values()) == pytest.approx(0.16)
    assert all(plan[(i, p)] == layer[i] for i, p in plan)
    assert plan.global_sparsity() == pytest.approx(0.7, abs=1e-9)


def test_official_is_owl_plus_a_constant_offset_per_projection_type():
    profile = random_profile(seed=4)
    lamda, m = 0.08, 5.0
    owl = owl_allocation(profile, 0.7, lamda=lamda, outlier_threshold=m)
    official = pod_official_allocation(profile, 0.7, lamda=lamda, outlier_threshold=m)
    c_layer = normalise(profile.layer[m], lamda)
    for p in PROJ:
        c_proj = normalise({k: v for k, v in profile.projection[m].items() if k[1] == p}, lamda)
        delta = sum(c_proj.values()) / 12 - sum(c_layer.values()) / 12  # δ_p = mean c_·p − mean c_l
        for i in range(12):
            assert official[(i, p)] - owl[(i, p)] == pytest.approx(delta, abs=1e-12)
    # the released code does not correct the total: it drifts from the target
    assert abs(official.global_sparsity() - 0.7) > 1e-4


def test_official_clamps_non_positive_sparsity_to_one_percent():
    profile = random_profile(seed=5)
    plan = pod_official_allocation(profile, 0.05, lamda=0.2, outlier_threshold=5.0)
    assert min(plan.values()) > 0 and list(plan.values()).count(0.01) >= 1


def test_search_grid_keeps_uniform_and_pins_fixed_axes():
    assert search_grid(0.7, "auto", "auto") == [(0.0, 5.0), (0.03, 5.0), (-0.03, 5.0)]
    assert search_grid(0.98, "auto", 3.0) == [(0.0, 3.0)]  # |λ| < 1 − S
    assert search_grid(0.5, 0.08, "auto") == [(0.08, 3.0), (0.08, 5.0), (0.08, 8.0)]


def test_search_picks_the_lowest_score():
    profile = random_profile(m=5.0)
    labels = []
    lamda, m, table = search_allocation(
        pod_allocation,
        profile,
        0.6,
        [(0.0, 5.0), (0.05, 5.0), (0.1, 5.0)],
        score=lambda plan, label: labels.append(label) or abs(max(plan.values()) - 0.65),
    )
    assert (lamda, m) == (0.05, 5.0) and len(table) == 3
    assert labels == ["λ=+0 M=5, candidate 1/3", "λ=+0.05 M=5, candidate 2/3", "λ=+0.1 M=5, candidate 3/3"]
