"""ALPS's working set at wide inputs: what it frees, when, and which temporaries it never makes (the bits stay those
of the plain computation)."""

import pytest
import torch
from conftest import allocations
from conftest import correlated_problem as problem

from optimum_mosaic.pruning import alps
from optimum_mosaic.pruning.alps import keep_top_k
from optimum_mosaic.pruning.refit import normalized_hessian, normalized_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_forced_restart_returns_to_the_cold_start(monkeypatch):
    """A restart puts ADMM back at ``(B, D, V) = (Wn, P_k(Wn), 0)`` with the new ρ (recomputed, not kept): after a
    restart at the first check, the remaining iterations equal a fresh cold run at that ρ, bit for bit."""
    W, stats = problem(11)
    Wn, Hn, _ = normalized_weights(W, stats, 0.01)
    calls = []

    def schedule(rho, delta, k, growing, iteration, *args):
        calls.append(iteration)
        return alps.RhoStep(0.7, False, restart=len(calls) == 1 and restarting)

    monkeypatch.setattr(alps, "rho_step", schedule)
    restarting = True
    B, state = alps.admm(Wn, 256, None, 0.2, 3 + 5, alps.RidgeInverses(Hn, {}, ("a",)))
    assert state["restarts"] == 1 and calls[0] == 2
    restarting = False
    fresh, _ = alps.admm(Wn, 256, None, 0.7, 5, alps.RidgeInverses(Hn, {}, ("b",)))
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

    def admm(Wn, k, nm, rho, iterations, inverse, box, shard=None, shift=None):
        refs.append(weakref.ref(box[0]))
        return original_admm(Wn, k, nm, rho, iterations, inverse, box, shard, shift)

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
    Wn, Hn, _ = normalized_weights(W, stats, 0.01)
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
    Wn, Hn, _ = normalized_weights(W, stats, 0.01)
    duals, spent, projected = [], [], []
    original_b_step, original_project = alps.b_step, alps._project

    def b_step(Wn, D, V, rho, inv, overwrite=False, shift=None):
        dual = (V.data_ptr(), V.clone(), rho)
        spent.append(weakref.ref(D))
        B = original_b_step(Wn, D, V, rho, inv, overwrite, shift)
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
    alps.admm(Wn, 888, None, 0.2, 6, alps.RidgeInverses(Hn, {}, ("m",)))
    assert len(duals) == len(projected) == 6
    for (v_ptr, V, rho, B), (z_ptr, Z, freed) in zip(duals, projected, strict=True):
        assert z_ptr == v_ptr and freed and torch.equal(Z, torch.add(B, V, alpha=1.0 / rho))


@pytest.fixture
def parking(tmp_path, monkeypatch):
    """Every ``Hn`` counts as wide: a parkable one goes to a temporary file (in ``tmp_path``)."""
    import tempfile

    from optimum_mosaic import copies

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(copies, "IN_MEMORY_BYTES", 0)
    return tmp_path


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is present)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_parked_hessian_makes_the_same_inverses_and_comes_back_bit_for_bit(parking, device):
    """A parked ``Hn`` is in a file, not in memory (from a GPU: in host memory); the ridge inverses made from the
    parked copy are those made from memory, and ``hessian()`` returns ``Hn`` on its device (deleting the file). A
    ``RidgeInverses`` not marked parkable keeps it."""
    _, stats = problem(17)
    Hn = normalized_hessian(stats, 0.01, device).Hn
    kept = alps.RidgeInverses(Hn, {}, ("kept",))
    kept.park()
    assert kept.Hn is Hn and not list(parking.iterdir())
    parked = alps.RidgeInverses(Hn.clone(), {}, ("parked",), parkable=True)
    parked.park()
    assert parked.Hn is None and len(list(parking.glob("mosaic-copy-*/tensors.bin"))) == (device == "cpu")
    for rho in (0.3, 0.36):
        assert torch.equal(parked(rho), kept(rho))
    back = parked.hessian()
    assert torch.equal(back, Hn) and back.is_contiguous() and back.device == Hn.device
    assert not list(parking.iterdir())


def test_the_last_reader_parks_hn_while_admm_iterates_and_cg_reads_wn_once(parking, monkeypatch):
    """At a wide input the last reader of the statistics holds no ``Hn`` in memory during ADMM's steps (it is made
    again from the file for each inverse and for CG), and CG makes ``Wn`` again where it reads it instead of holding
    it: the weights are those of a run that keeps both, bit for bit."""
    import weakref

    from optimum_mosaic import copies
    from optimum_mosaic.pruning import refit

    W, stats = problem(18)
    stats.final_read = True
    refs, alive_at_b_step, made = [], [], []
    original_hessian, original_b_step, original_scaled = alps.normalized_hessian, alps.b_step, refit.scaled_weights

    def normalized(*args):
        norm = original_hessian(*args)
        refs.append(weakref.ref(norm.Hn))
        return norm

    def b_step(*args, **kwargs):
        alive_at_b_step.append(refs[0]() is not None)
        return original_b_step(*args, **kwargs)

    def scaled(*args):
        made.append(1)
        return original_scaled(*args)

    monkeypatch.setattr(alps, "normalized_hessian", normalized)
    monkeypatch.setattr(alps, "b_step", b_step)
    monkeypatch.setattr(alps, "scaled_weights", scaled)
    info = {}
    parked = alps.alps_warm_prune(W, stats, 0.6, info=info)
    monkeypatch.undo()
    assert alive_at_b_step and not any(alive_at_b_step) and info["inverses"] == 2
    assert len(made) == 2  # ``Wn`` for ADMM, then once more for CG's start
    assert not list(parking.iterdir())  # the file is gone
    monkeypatch.setattr(copies, "IN_MEMORY_BYTES", 1 << 40)
    W, stats = problem(18)
    stats.final_read = True
    assert torch.equal(parked, alps.alps_warm_prune(W, stats, 0.6))


def test_cg_keeps_its_masked_residual_in_the_memory_of_the_spent_product():
    """CG's masked residual takes the memory of ``direction·A`` once that is spent: the ``d_out × d_in`` matrices it
    makes are the start's ``W − B``, the residual, the first direction (the masked residual), the first ``‖R‖²``'s
    squares, ``direction·A`` and a scratch — six, where a separate masked residual (and a clone of it as the first
    direction) made seven. ``W`` given as a function that makes it gives the same bits."""
    from torch.profiler import ProfilerActivity, profile

    from optimum_mosaic.pruning.refit import masked_cg

    W, stats = problem(19, rows=37, cols=48)
    Wn, Hn, _ = normalized_weights(W, stats, 0.01)
    support = keep_top_k(Wn.abs(), Wn.numel() // 2)
    expected, _ = masked_cg(Hn, None, Wn * support, support, 4, 0.0, W=lambda: Wn.clone(), stop="unmasked")
    start = Wn * support
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got, _ = masked_cg(Hn, None, start, support, 4, 0.0, W=Wn, stop="unmasked")
    makers = {"aten::sub", "aten::mm", "aten::mul", "aten::clone", "aten::empty_like"}  # (the bool support's
    made = [e.name for e in prof.events() if e.name in makers and e.cpu_memory_usage == Wn.numel() * 4]  # casts: to)
    assert len(made) == 6, made
    assert torch.equal(got, expected)
