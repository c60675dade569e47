"""ALPS against hand-made ρ-schedule cases, an exact least-squares reference and the SparseGPT/Wanda baselines."""

import pytest
import torch
from conftest import correlated_problem as problem
from conftest import hessian_stats
from conftest import reconstruction_error as layer_error

from optimum_mosaic.pruning import alps, ridge
from optimum_mosaic.pruning.alps import alps_prune, keep_top_k, rho_step
from optimum_mosaic.pruning.masks import lowest_k_mask
from optimum_mosaic.pruning.refit import normalized_hessian, normalized_weights, sparsegpt_refit_prune
from optimum_mosaic.pruning.sparsegpt import sparsegpt_prune
from optimum_mosaic.pruning.wanda import wanda_prune

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the ρ schedule -------------------------------------------------------------------------------
def test_rho_step_growth_factors():
    assert rho_step(0.1, 20, 100, False, 2) == alps.RhoStep(pytest.approx(0.13), True)  # Δ/k 0.2 > 0.1
    assert rho_step(0.1, 10, 100, False, 2).rho == pytest.approx(0.12)  # Δ/k exactly 0.1: not > 0.1
    assert rho_step(0.1, 5, 100, True, 2) == alps.RhoStep(pytest.approx(0.12), True)  # 0.05 > 0.005
    assert rho_step(0.1, 1, 1000, True, 2) == alps.RhoStep(pytest.approx(0.11), True)  # Δ ≥ 1, growing


def test_rho_step_shrinks_restarts_and_stops():
    # Δ ≥ 1 but small before ρ ever grew: ρ/5 and restart from the dense solution
    assert rho_step(0.1, 1, 1000, False, 2) == alps.RhoStep(pytest.approx(0.02), False, restart=True)
    # Δ = 0 before growing: ρ/5, no restart; after growing: stop with ρ unchanged
    assert rho_step(0.1, 0, 1000, False, 2) == alps.RhoStep(pytest.approx(0.02), False)
    assert rho_step(0.5, 0, 1000, True, 2) == alps.RhoStep(0.5, True, stop=True)
    # the cap
    assert rho_step(9e5, 500, 1000, True, 2).rho == 1e6


def test_rho_step_late_stop_rule():
    # Δ/k = 2e-4 < 3e-4: stops from iteration index 30 on, not before; ρ still takes its ×1.1
    assert rho_step(1.0, 2, 10_000, True, 29) == alps.RhoStep(pytest.approx(1.1), True, stop=False)
    assert rho_step(1.0, 2, 10_000, True, 32) == alps.RhoStep(pytest.approx(1.1), True, stop=True)
    assert not rho_step(1.0, 3, 10_000, True, 32).stop  # 3e-4 is not < 3e-4
    assert rho_step(1.0, 100, 10_000, True, 32) == alps.RhoStep(pytest.approx(1.2), True)  # 0.01 > 0.005


def test_keep_top_k_is_exact_with_ties():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0], [0.5, 3.0, 2.0, 0.0]])
    keep = keep_top_k(scores, 3)  # 3.0 and two of the four 2.0s: the higher indices, as lowest_k_mask prunes
    assert keep.tolist() == [[False, False, False, True], [False, True, True, False]]
    assert torch.equal(keep, ~lowest_k_mask(scores, 5))


# -- contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_zero_count_is_exact(sparsity):
    W, stats = problem(1)
    out = alps_prune(W, stats, sparsity)
    assert (out == 0).sum().item() == round(sparsity * W.numel())


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_valid(nm):
    W, stats = problem(2)
    out = alps_prune(W, stats, nm[0] / nm[1], nm=nm)
    assert ((out == 0).reshape(16, 32 // nm[1], nm[1]).sum(-1) == nm[0]).all()


def test_input_untouched_deterministic_dtype_and_shape():
    W, stats = problem(3)
    W16 = W.bfloat16()
    before = W16.clone()
    a = alps_prune(W16, stats, 0.5)
    b = alps_prune(W16, stats, 0.5)
    assert torch.equal(W16, before)
    assert a.dtype == torch.bfloat16 and a.shape == W.shape
    assert torch.equal(a, b)
    assert (a == 0).sum().item() == 256


def test_dead_inputs_are_zeroed():
    g = torch.Generator().manual_seed(4)
    W, X = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    X[:, 3] = 0
    stats = hessian_stats(X)
    out = alps_prune(W, stats, 0.5)
    assert (out[:, 3] == 0).all() and (out == 0).sum().item() == 64 and out.isfinite().all()


# -- quality --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reconstructs_better_than_sparsegpt_and_wanda(sparsity):
    W, stats = problem(0)
    H = stats.hessian
    err_alps = layer_error(W, alps_prune(W, stats, sparsity), H)
    err_sgpt = layer_error(W, sparsegpt_prune(W, stats, sparsity), H)
    err_wanda = layer_error(W, wanda_prune(W, stats, sparsity), H)
    # measured (seed 0, ALPS vs SparseGPT vs Wanda): 0.5 → 5.4e4 vs 2.6e5 vs 3.5e5; 0.7 → 2.8e5 vs 9.3e5 vs 9.4e5
    assert err_alps < 0.5 * err_sgpt
    assert err_alps < 0.5 * err_wanda


def test_nm_reconstructs_better_than_sparsegpt():
    W, stats = problem(0)
    err_alps = layer_error(W, alps_prune(W, stats, 0.5, nm=(2, 4)), stats.hessian)
    err_sgpt = layer_error(W, sparsegpt_prune(W, stats, 0.5, nm=(2, 4)), stats.hessian)
    assert err_alps < err_sgpt


@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_cg_refinement_never_increases_the_error(sparsity, nm):
    W, stats = problem(5)
    info_off, info_on = {"measure_error": True}, {"measure_error": True}
    off = alps_prune(W, stats, sparsity, nm=nm, cg_iterations=0, info=info_off)
    on = alps_prune(W, stats, sparsity, nm=nm, info=info_on)
    assert torch.equal(off == 0, on == 0)  # same ADMM support
    assert info_off["cg_iterations"] == 0 and info_on["cg_iterations"] == 10
    assert info_on["error"] <= info_off["error"]  # the damped objective CG minimises
    assert layer_error(W, on, stats.hessian) <= layer_error(W, off, stats.hessian)  # the plain layer loss


def test_no_eigendecomposition_and_one_cholesky_per_distinct_rho(monkeypatch):
    calls, eighs = [], []
    cholesky_ex, eigh = torch.linalg.cholesky_ex, torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or cholesky_ex(*a, **k))
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: eighs.append(1) or eigh(*a, **k))
    W, stats = problem(6)
    info = {}
    alps_prune(W, stats, 0.6, info=info)
    assert not eighs
    assert info["iterations"] > 3 and info["rho"] != 0.1  # several ρ values ...
    rhos = [key for key in stats.cache if key[0] == "ridge_inverses"]
    assert len(rhos) == 1 and len(calls) == info["inverses"] == len(stats.cache[rhos[0]]) > 1  # ... one each


def test_an_input_group_shares_its_ridge_inverses():
    """q, k, v (and gate, up) get the same ``InputStatistics``: a second projection on it reuses every inverse the
    first made for the ρ values both visit; the results are those of a fresh run."""
    W, stats = problem(6)
    first, second, alone = {}, {}, {}
    alps_prune(W, stats, 0.6, info=first)
    out = alps_prune(W * 2, stats, 0.6, info=second)  # same schedule (scale-free), all inverses cached
    assert first["inverses"] > 1 and second["inverses"] == 0
    fresh = alps_prune(W * 2, problem(6)[1], 0.6, info=alone)
    assert alone["inverses"] == first["inverses"]
    assert torch.equal(out, fresh)


def test_ridge_inverse_is_the_inverse():
    _, stats = problem(9)
    Hn = normalized_hessian(stats, 0.01, "cpu").Hn
    inverses = alps.RidgeInverses(Hn, {}, ("k",))
    for rho in (0.004, 0.1, 3.0):
        A = Hn.double() + rho * torch.eye(32, dtype=torch.float64)
        torch.testing.assert_close(inverses(rho).double(), torch.linalg.inv(A), rtol=1e-4, atol=1e-5)
    assert inverses.made == 3 and inverses(0.1) is inverses(0.1) and inverses.made == 3


def test_ridge_inverse_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ridge, "CACHE_BYTES", 2 * 32 * 32 * 4)  # two 32 × 32 float32 inverses
    _, stats = problem(9)
    inverses = alps.RidgeInverses(normalized_hessian(stats, 0.01, "cpu").Hn, {}, ("k",))
    for rho in (0.1, 0.2, 0.3):
        inverses(rho)
    assert list(inverses.store) == [0.2, 0.3]


def test_schedule_runs_and_stops_on_checks():
    W, stats = problem(7)
    info = {}
    alps_prune(W, stats, 0.5, info=info)
    assert info["iterations"] % 3 == 0 and info["iterations"] < 300
    info = {}
    alps_prune(W, stats, 0.5, info=info, max_iterations=4)
    assert info["iterations"] == 4


# -- exact least squares on the final support ------------------------------------------------------
@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.3, None), (0.5, (2, 4))])
def test_final_weights_are_least_squares_on_the_support(sparsity, nm):
    """For a row ``w`` and support ``S``, ``min_ŵ (ŵ − w) Hd (ŵ − w)ᵀ`` with ``ŵ`` zero off ``S`` has gradient
    ``2 (ŵ − w) Hd_{:,S} = 0``, i.e. ``ŵ_S Hd_SS = w Hd_{:,S}``, so ``ŵ_S = w Hd_{:,S} (Hd_SS)⁻¹`` with the
    ridge-damped ``Hd = H + 0.01·mean(diag H)·I`` ALPS optimises (its normalisation is a change of variables)."""
    g = torch.Generator().manual_seed(8)
    W = torch.randn(4, 8, generator=g)
    X = torch.randn(64, 8, generator=g) @ (torch.eye(8) + 0.4 * torch.randn(8, 8, generator=g))
    stats = hessian_stats(X)
    out = alps_prune(W, stats, sparsity, nm=nm)
    H = stats.hessian.double()
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(8, dtype=torch.float64)
    for r in range(4):
        S = (out[r] != 0).nonzero().squeeze(1)
        expected = torch.zeros(8, dtype=torch.float64)
        expected[S] = W[r].double() @ Hd[:, S] @ torch.linalg.inv(Hd[S][:, S])
        torch.testing.assert_close(out[r].double(), expected, atol=1e-4, rtol=0)


def test_registered():
    from optimum_mosaic.registry import get_method

    method = get_method("unstructured", "alps")
    assert method.fn is alps_prune and method.needs == ("hessian",)


# -- warm start from SparseGPT (alps_warm) ----------------------------------------------------------
def _textbook_b_step(Wn, Hn, D, V, rho):
    """``(Y − V + ρD)(Hn + ρI)⁻¹`` in float64 with an explicit inverse (the reference's form)."""
    Wn, Hn, D, V = (t.double() for t in (Wn, Hn, D, V))
    return (Wn @ Hn - V + rho * D) @ torch.linalg.inv(Hn + rho * torch.eye(Hn.shape[0], dtype=torch.float64))


def test_b_step_without_y_is_the_textbook_b_step():
    W, stats = problem(10)
    Wn, Hn, x = normalized_weights(W, stats, 0.01)
    D, V = sparsegpt_prune(W, stats, 0.5).float() * x, torch.randn_like(Wn)
    for rho in (0.05, 0.5, 3.0):
        got = alps.b_step(Wn, D, V, rho, alps.RidgeInverses(Hn, {}, ("k",))(rho))
        torch.testing.assert_close(got.double(), _textbook_b_step(Wn, Hn, D, V, rho), rtol=1e-4, atol=1e-4)


def test_warm_start_is_a_fixed_point_of_the_first_b_step():
    """With ``D₀ = start`` and ``V₀ = Y − D₀Hn``, the B-step gives ``(D₀Hn + ρD₀)(Hn + ρI)⁻¹ = D₀`` whatever ρ — which
    is why ``admm`` does not compute it (and makes no inverse for it)."""
    W, stats = problem(10)
    Wn, Hn, x = normalized_weights(W, stats, 0.01)
    start = sparsegpt_prune(W, stats, 0.5).float() * x
    V0 = (Wn.double() @ Hn.double()) - start.double() @ Hn.double()
    for rho in (0.05, 0.5, 3.0):
        B = _textbook_b_step(Wn, Hn, start, V0, rho)
        assert (B - start.double()).abs().max() <= 1e-9 * start.abs().max()
    inverse = alps.RidgeInverses(Hn, {}, ("k",))
    B, state = alps.admm(Wn, 256, None, 0.3, 1, inverse, start)
    assert torch.equal(B, start) and state["iterations"] == 1 and inverse.made == 0


def test_a_six_iteration_warm_schedule_makes_two_inverses():
    """ρ changes at most at the checks after iterations 3 and 6; the inverse for the ρ set by the last check is
    never used, so it is not made: ρ₀ (iterations 2–3) and ρ₁ (4–6)."""
    W, stats = problem(13)
    info = {}
    alps.alps_warm_prune(W, stats, 0.6, info=info)
    assert info["iterations"] == 6 and info["inverses"] == 2


def test_warm_start_without_iterations_is_sparsegpt_plus_refit():
    W, stats = problem(11)
    warm = alps.alps_warm_prune(W, stats, 0.5, max_iterations=0, cg_iterations=10)
    refit = sparsegpt_refit_prune(W, stats, 0.5, cg_iterations=10)
    assert torch.equal(warm != 0, sparsegpt_prune(W, stats, 0.5) != 0)
    torch.testing.assert_close(warm, refit, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_warm_start_moves_the_support_and_beats_the_refit(sparsity):
    W, stats = problem(0)
    H = stats.hessian
    info = {}
    warm = alps.alps_warm_prune(W, stats, sparsity, info=info)
    err_warm = layer_error(W, warm, H)
    err_refit = layer_error(W, sparsegpt_refit_prune(W, stats, sparsity), H)
    err_sgpt = layer_error(W, sparsegpt_prune(W, stats, sparsity), H)
    # measured (seed 0; warm, refit, SparseGPT; full ALPS): 0.5 → 6.1e4, 1.7e5, 2.6e5 (5.4e4); 0.7 → 2.8e5, 7.9e5, 9.3e5 (2.8e5)
    assert err_warm < 0.5 * err_refit < 0.5 * err_sgpt
    assert not torch.equal(warm != 0, sparsegpt_prune(W, stats, sparsity) != 0)
    assert info["iterations"] <= alps.WARM_ITERATIONS and (warm == 0).sum() == round(sparsity * W.numel())


def test_warm_start_shares_the_sparsegpt_factor_and_the_inverses(monkeypatch):
    calls = []
    cholesky_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or cholesky_ex(*a, **k))
    W, stats = problem(12)
    first, second = {}, {}
    alps.alps_warm_prune(W, stats, 0.6, info=first)
    alps.alps_warm_prune(W * 2, stats, 0.6, info=second)  # as k after q: same input, same (scaled) problem
    assert second["inverses"] == 0 and len(calls) == 1 + first["inverses"]  # one SparseGPT factor + the inverses


@pytest.mark.parametrize("kernel", [alps.alps_warm_prune, alps_prune, sparsegpt_refit_prune])
def test_the_last_reader_builds_hn_in_the_memory_of_h(monkeypatch, kernel):
    """With ``final_read`` (the walk's mark for a group's last projection) the normalised Hessian takes the memory of
    ``stats.hessian`` — one ``d_in²`` buffer less — and the weights are bit-identical to a copying run."""
    from optimum_mosaic.pruning import refit

    W, stats = problem(3)
    copying = kernel(W, stats, 0.6)
    assert stats.hessian is not None  # an ordinary read leaves H as it was
    W, stats = problem(3)
    storage = stats.hessian.untyped_storage().data_ptr()
    stats.final_read = True
    read, original = [], refit.masked_cg
    monkeypatch.setattr(
        refit, "masked_cg", lambda A, *a, **k: read.append(A.untyped_storage().data_ptr()) or original(A, *a, **k)
    )
    consuming = kernel(W, stats, 0.6)
    assert torch.equal(consuming, copying)
    assert stats.hessian is None
    assert read == [storage]  # CG's Hn
