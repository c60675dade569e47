"""ALPS's working set at wide inputs: what it frees, when, and which temporaries it never makes (the bits stay those
of the plain computation)."""

import pytest
import torch
from conftest import allocations
from conftest import correlated_problem as problem

from optimum_mosaic.pruning import alps
from optimum_mosaic.pruning.alps import keep_top_k
from optimum_mosaic.pruning.refit import normalized_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_forced_restart_returns_to_the_cold_start(monkeypatch):
    """A restart puts ADMM back at ``(B, D, V) = (Wn, P_k(Wn), 0)`` with the new ρ (recomputed, not kept): after a
    restart at the first check, the remaining iterations equal a fresh cold run at that ρ, bit for bit."""
    W, stats = problem(11)
    Wn, Hn, _ = alps.normalized_weights(W, stats, 0.01)
    calls = []

    def schedule(rho, delta, k, growing, iteration, *args):
        calls.append(iteration)
        return alps.RhoStep(0.7, False, restart=len(calls) == 1 and restarting)

    monkeypatch.setattr(alps, "rho_step", schedule)
    restarting = True
    B, state = alps.admm(Wn, Hn, 256, None, 0.2, 3 + 5, alps.RidgeInverses(Hn, {}, ("a",)))
    assert state["restarts"] == 1 and calls[0] == 2
    restarting = False
    fresh, _ = alps.admm(Wn, Hn, 256, None, 0.7, 5, alps.RidgeInverses(Hn, {}, ("b",)))
    assert torch.equal(B, fresh)


def test_the_warm_start_is_freed_before_the_first_b_step(monkeypatch):
    """Neither SparseGPT's weights nor their scaled copy outlive ADMM's first iteration: at a 14336-wide input each
    is a 0.22 GiB buffer that nothing reads after it."""
    import weakref

    W, stats = problem(12)
    refs, seen = [], []
    original_sparsegpt, original_admm, original_b_step = alps.sparsegpt_prune, alps.admm, alps.b_step

    def sparsegpt(*args, **kwargs):
        out = original_sparsegpt(*args, **kwargs)
        refs.append(weakref.ref(out))
        return out

    def admm(Wn, Hn, k, nm, rho, iterations, inverse, box, shard=None):
        refs.append(weakref.ref(box[0]))
        return original_admm(Wn, Hn, k, nm, rho, iterations, inverse, box, shard)

    def b_step(*args, **kwargs):
        seen.append([r() is None for r in refs])
        return original_b_step(*args, **kwargs)

    monkeypatch.setattr(alps, "sparsegpt_prune", sparsegpt)
    monkeypatch.setattr(alps, "admm", admm)
    monkeypatch.setattr(alps, "b_step", b_step)
    info = {}
    out = alps.alps_warm_prune(W, stats, 0.6, info=info)
    monkeypatch.undo()
    assert len(refs) == 2 and seen and all(all(s) for s in seen)
    assert torch.equal(out, alps.alps_warm_prune(W, problem(12)[1], 0.6))


def test_cg_updates_its_start_in_place():
    from optimum_mosaic.pruning.refit import masked_cg

    W, stats = problem(13)
    Wn, Hn, _ = alps.normalized_weights(W, stats, 0.01)
    support = keep_top_k(Wn.abs(), Wn.numel() // 2)
    B0 = Wn * support
    expected, _ = masked_cg(Hn, Wn @ Hn, B0.clone(), support, 4, 0.0)
    got, steps = masked_cg(Hn, None, B0, support, 4, 0.0, W=Wn)
    assert got is B0 and steps == 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("final_read", [True, False])
def test_the_last_reader_drops_its_ridge_inverses_before_cg(monkeypatch, final_read):
    """CG needs no ridge inverse; the last projection reading an input group frees them before CG (0.77 GiB each at
    a 14336-wide input), an earlier one leaves them cached for the projections after it."""
    W, stats = problem(14)
    stats.final_read = final_read
    held, original = [], alps.refit_on_support

    def refit_on_support(*args, **kwargs):
        held.append(sum(len(v) for k, v in stats.cache.items() if k[0] == "ridge_inverses"))
        return original(*args, **kwargs)

    monkeypatch.setattr(alps, "refit_on_support", refit_on_support)
    info = {}
    alps.alps_warm_prune(W, stats, 0.6, info=info)
    assert info["inverses"] == 2 and held == [0 if final_read else 2]


def test_a_ridge_inverse_is_made_in_one_buffer_with_the_bits_of_the_plain_calls():
    """Into a row-major ``out=`` torch factorises a column-major copy and copies it back (a d × d temporary per call,
    0.77 GiB at 14336); the column-major buffer avoids it. The result is the plain calls' matrix, bit for bit, and
    row-major, as the B-step's product expects."""
    _, stats = problem(15)
    Hn = normalized_hessian(stats, 0.01, "cpu").Hn
    d = Hn.shape[0]
    made = []
    sizes = [b for b in allocations(lambda: made.append(alps.RidgeInverses(Hn, {}, ("k",))(0.3))) if b >= d * d * 4]
    assert sizes == [d * d * 4]  # the one buffer that becomes the inverse
    inverse = made[0]
    plain = torch.cholesky_inverse(torch.linalg.cholesky(Hn + 0.3 * torch.eye(d)))
    assert torch.equal(inverse, plain) and inverse.is_contiguous()


def test_keep_top_k_counts_without_an_int64_copy_of_the_mask():
    """``bool.sum()`` converts the whole mask to int64 first (8 bytes per weight: 1.75 GiB at a 4096 × 14336
    projection); the selection and its count allocate at most one byte per entry."""
    scores = torch.randn(512, 4096, generator=torch.Generator().manual_seed(3)).abs()
    kept = []
    largest = allocations(lambda: kept.append(keep_top_k(scores, scores.numel() // 3)))[0]
    assert int(kept[0].count_nonzero()) == scores.numel() // 3
    assert largest <= scores.numel()


@pytest.mark.parametrize("chunk", [65_536, 30_000])
@pytest.mark.parametrize("integers", [False, True])
def test_keep_top_k_of_magnitudes_chunk_by_chunk_equals_the_plain_selection(monkeypatch, chunk, integers):
    """``key=torch.abs`` takes magnitudes one chunk at a time: the mask of ``keep_top_k(Z.abs())`` (ties included:
    the integer matrix has many, of both signs) — and no whole matrix of magnitudes is made."""
    from optimum_mosaic.pruning import masks

    monkeypatch.setattr(masks, "CHUNK", chunk)
    g = torch.Generator().manual_seed(4)
    Z = torch.randint(-6, 7, (384, 864), generator=g).float() if integers else torch.randn(384, 864, generator=g)
    k = Z.numel() * 2 // 5
    expected = keep_top_k(Z.abs(), k)
    got = []
    largest = allocations(lambda: got.append(keep_top_k(Z, k, key=torch.abs)))[0]
    assert torch.equal(got[0], expected) and int(got[0].count_nonzero()) == k
    if not integers:  # (a tie's index costs 8 bytes: with a seventh of the entries tied, more than the mask)
        assert largest <= Z.numel()  # the bool mask; a matrix of magnitudes would be 4 bytes per entry


def test_admm_forms_z_in_the_memory_of_v_and_frees_the_spent_operand(monkeypatch):
    """``Z = B + V/ρ`` is written into ``V``'s memory, and the B-step's spent operand (``D``'s memory) is freed before
    it: at ``Z`` three ``d_out × d_in`` matrices are held (``Wn``, ``B``, ``Z``) where there were five (``D`` and a
    new ``Z`` beside ``V``). The result is the plain formula's, bit for bit."""
    import types
    import weakref

    W, stats = problem(16, rows=37, cols=48)
    Wn, Hn, _ = alps.normalized_weights(W, stats, 0.01)
    duals, spent, projected = [], [], []
    original_b_step, original_project = alps.b_step, alps._project

    def b_step(Wn, D, V, rho, inv, overwrite=False):
        dual = (V.data_ptr(), V.clone(), rho)
        spent.append(weakref.ref(D))
        B = original_b_step(Wn, D, V, rho, inv, overwrite)
        duals.append((*dual, B.clone()))
        return B

    def project(Z, k, nm, shard=None):
        if duals:
            projected.append((Z.data_ptr(), Z.clone(), freed_at_z[-1]))
        return original_project(Z, k, nm, shard)

    class TorchForming(types.SimpleNamespace):  # alps's ``torch``, with ``add`` (how Z is formed) watched
        def __getattr__(self, name):
            return getattr(torch, name)

        def add(self, *args, **kwargs):
            freed_at_z.append(all(r() is None for r in spent))
            return torch.add(*args, **kwargs)

    freed_at_z = []
    monkeypatch.setattr(alps, "b_step", b_step)
    monkeypatch.setattr(alps, "_project", project)
    monkeypatch.setattr(alps, "torch", TorchForming())
    alps.admm(Wn, Hn, 888, None, 0.2, 6, alps.RidgeInverses(Hn, {}, ("m",)))
    assert len(duals) == len(projected) == 6
    for (v_ptr, V, rho, B), (z_ptr, Z, freed) in zip(duals, projected, strict=True):
        assert z_ptr == v_ptr and freed and torch.equal(Z, torch.add(B, V, alpha=1.0 / rho))
