"""``dense_target``: ALPS / ALPS-warm solved for the dense model's outputs ``‖XŴᵀ − X_dWᵀ‖²`` (``X``: the pruned
model's inputs, ``X_d``: the dense model's, same tokens) through the cross term ``C = X_dᵀX`` of the statistics.
Checked against a least-squares solve written from the objective, not from the kernel's formula."""

import pytest
import torch

from optimum_mosaic.calibration.statistics import InputStatistics
from optimum_mosaic.pruning.alps import alps_prune, alps_warm_prune

pytestmark = pytest.mark.usefixtures("one_thread")


def drifted(seed: int = 0, rows: int = 12, cols: int = 24, tokens: int = 256, drift: float = 0.3):
    """A weight, the dense inputs ``X_d`` (correlated) and the pruned model's ``X = X_d + drift·noise``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    Xd = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    X = Xd + drift * torch.randn(tokens, cols, generator=g)
    return W, Xd, X


def statistics(X, Xd=None, windows: int = 4) -> InputStatistics:
    stats = InputStatistics.empty(X.shape[1], True, dtype=torch.float64, cross=Xd is not None)
    seqlen = X.shape[0] // windows
    stats.update(X.reshape(windows, seqlen, -1), dense=None if Xd is None else Xd.reshape(windows, seqlen, -1))
    return stats.finalize()


def output_error(pruned, W, X, Xd) -> float:
    """``‖XŴᵀ − X_dWᵀ‖²`` (float64): the error against the dense model's outputs."""
    return float((X.double() @ pruned.double().T - Xd.double() @ W.double().T).square().sum())


def test_the_cross_term_is_summed_window_by_window_and_needs_dense_inputs():
    W, Xd, X = drifted()
    stats = statistics(X, Xd)
    torch.testing.assert_close(stats.cross.double(), Xd.double().T @ X.double(), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="dense inputs"):
        statistics(X).update(X, dense=Xd)
    with pytest.raises(ValueError, match="dense inputs"):
        InputStatistics.empty(X.shape[1], True, cross=True).update(X)


def test_the_refit_is_the_least_squares_fit_to_the_dense_outputs_on_its_support():
    W, Xd, X = drifted()
    damp = 0.01
    pruned = alps_prune(W, statistics(X, Xd), 0.5, rho=0.1, cg_iterations=200, dampening=damp)
    H = X.double().T @ X.double()
    ridge = damp * torch.diag(H).mean()
    for i in range(W.shape[0]):  # min ‖X_S ŵ − X_d w‖² + ridge·‖ŵ − w_S‖² (the kernel's ridge is δ·mean(diag H)·I)
        S = pruned[i] != 0
        A = torch.cat([X.double()[:, S], ridge.sqrt() * torch.eye(int(S.sum()), dtype=torch.float64)])
        b = torch.cat([Xd.double() @ W[i].double(), ridge.sqrt() * W[i, S].double()])
        expected = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(pruned[i, S].double(), expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("kernel", [alps_prune, alps_warm_prune])
def test_each_target_wins_its_own_objective(kernel):
    W, Xd, X = drifted(seed=1)
    own = kernel(W, statistics(X), 0.5, cg_iterations=50)
    dense = kernel(W, statistics(X, Xd), 0.5, cg_iterations=50)
    assert int((dense == 0).sum()) == int((own == 0).sum()) == W.numel() // 2  # the exact sparsity either way
    assert output_error(dense, W, X, Xd) < 0.9 * output_error(own, W, X, Xd)
    assert output_error(own, W, X, X) < output_error(dense, W, X, X)


def test_without_drift_the_dense_target_is_the_usual_problem():
    W, _, X = drifted(seed=2, drift=0.0)
    plain = alps_warm_prune(W, statistics(X), 0.5)
    same = alps_warm_prune(W, statistics(X, X), 0.5)  # C = H: the shift is zero
    assert torch.equal(plain != 0, same != 0)
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)


def _walk(model_type: str, batch_size=None, **config):
    """A tiny model pruned at 50 % (ALPS-warm) and its dense original."""
    import copy

    from test_architectures import SMALL, X, tiny

    from optimum_mosaic import PrunedConfig, Pruner

    dense = tiny(model_type)
    model = copy.deepcopy(dense)
    Pruner(model, None).prune(
        PrunedConfig(sparsity=0.5, **SMALL, **config), calibration_dataset=X, batch_size=batch_size
    )
    return model, dense, X


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_the_walk_ends_closer_to_the_dense_model_and_batches_change_nothing(model_type):
    from optimum_mosaic.architectures import named_projections

    own, dense, X = _walk(model_type)
    target, _, _ = _walk(model_type, dense_target=True)
    halves, _, _ = _walk(model_type, batch_size=2, dense_target=True)
    weights = {n: lin.weight for n, lin in named_projections(target).items()}
    assert all(torch.equal(lin.weight, weights[n]) for n, lin in named_projections(halves).items())
    assert all(int((w == 0).sum()) == w.numel() // 2 for w in weights.values())
    with torch.no_grad():  # last hidden states on the calibration windows, against the dense model's
        ref = dense(X, output_hidden_states=True).hidden_states[-1]
        gaps = [float((m(X, output_hidden_states=True).hidden_states[-1] - ref).square().mean()) for m in (own, target)]
    assert gaps[1] < 0.8 * gaps[0], gaps


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(pruner="sparsegpt"), "pruner 'alps' or 'alps_warm' only"),
        (dict(sequential="layer"), "sequential='projection'"),
        (dict(structured_sparsity=0.2), "structured removal"),
        (dict(dense_target="yes"), "True or False"),
    ],
)
def test_options_it_cannot_serve_are_refused(options, message):
    from optimum_mosaic import PrunedConfig

    with pytest.raises(ValueError, match=message):
        PrunedConfig(sparsity=0.5, **{"dense_target": True, **options})


def test_the_command_line_takes_it_as_a_switch():
    import argparse

    from optimum_mosaic.commands import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args(["--dense-target"])).dense_target is True
    assert config_from_args(parser.parse_args(["--no-dense-target"])).dense_target is False
    assert config_from_args(parser.parse_args([])).dense_target is False


def test_a_dense_stream_larger_than_free_memory_is_refused_before_any_work(monkeypatch):
    import psutil

    from optimum_mosaic.exceptions import CalibrationError

    class Little:
        available = 1 << 10

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    with pytest.raises(CalibrationError, match=r"dense_target needs .* GiB .*fewer tokens"):
        _walk("llama", dense_target=True)
