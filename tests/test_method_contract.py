"""The contract every registered unstructured kernel keeps (a new method is covered by being registered)."""

import pytest
import torch
from conftest import correlated_problem as problem
from conftest import reconstruction_error

from optimum_mosaic.registry import get_method, list_methods

KERNELS = list_methods("unstructured")


def test_the_seed_methods_are_registered():
    assert {"magnitude", "wanda", "sparsegpt", "alps", "apt"} <= set(KERNELS)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_zero_count_shape_dtype_and_untouched_input(name, sparsity):
    weight, stats = problem()
    before = weight.clone()
    out = get_method("unstructured", name).fn(weight, stats, sparsity, block_size=16)
    assert int((out == 0).sum()) == round(sparsity * weight.numel())
    assert out.shape == weight.shape and out.dtype == weight.dtype
    assert torch.equal(weight, before)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_groups_hold_exactly_n_zeros(name, nm):
    weight, stats = problem()
    out = get_method("unstructured", name).fn(weight, stats, nm[0] / nm[1], nm=nm, block_size=16)
    zeros = (out == 0).reshape(weight.shape[0], -1, nm[1]).sum(-1)
    assert (zeros == nm[0]).all()


@pytest.mark.parametrize("name", KERNELS)
def test_deterministic(name):
    weight, stats = problem(seed=1)
    fn = get_method("unstructured", name).fn
    assert torch.equal(fn(weight, stats, 0.5, block_size=16), fn(weight, stats, 0.5, block_size=16))


@pytest.mark.parametrize("name", KERNELS)
def test_weight_updating_methods_reconstruct_no_worse_than_masking(name):
    """Methods that update the kept weights must not do worse than zeroing their own mask."""
    weight, stats = problem(seed=2)
    out = get_method("unstructured", name).fn(weight, stats, 0.5, block_size=16)
    masked = weight.masked_fill(out == 0, 0)
    err = lambda w: reconstruction_error(weight, w, stats.hessian)  # noqa: E731
    assert err(out) <= err(masked) * (1 + 1e-4)
