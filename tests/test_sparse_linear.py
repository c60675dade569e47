"""SparseLinear as a drop-in for nn.Linear, and to_sparse_kernel on whole models (plain and shape-reduced)."""

import pytest
import torch
from conftest import tiny_llama, token_windows
from test_sparse_kernel import PATHS, assert_matches_dense, pruned
from torch import nn

from optimum_mosaic.architectures import named_projections
from optimum_mosaic.sparse import SparseLinear, to_sparse_kernel

X = token_windows(2, 16, seed=5)


def sparse_model(sparsity: float = 0.7, seed: int = 0, **overrides):
    model = tiny_llama(seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in named_projections(model).values():
            lin.weight[torch.rand(lin.weight.shape, generator=g) < sparsity] = 0
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_sparse_linear_is_a_drop_in(bias, path):
    linear = nn.Linear(130, 70, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(pruned(70, 130, 0.7, seed=4))
    module = SparseLinear.from_linear(linear, path=path)
    assert [name for name, _ in module.named_parameters()] == (["bias"] if bias else [])
    assert not any(t.numel() == 70 * 130 for t in module.state_dict().values())  # no dense copy
    assert module.weight_values.numel() == int((linear.weight != 0).sum())
    assert torch.equal(module.weight, linear.weight.detach())
    x = torch.randn(3, 5, 130)
    y = module(x)
    assert y.shape == (3, 5, 70)
    assert_matches_dense(y.reshape(15, 70), x.reshape(15, 130), linear.weight.detach(), linear.bias)
    text = repr(module)
    assert "in_features=130, out_features=70" in text and f"bias={bias}" in text and "values=float32" in text
    assert f"sparsity={module.sparsity:.3f}" in text and module.sparsity == pytest.approx(0.7, abs=0.03)
    assert module.nbytes == 70 * 3 * 8 + module.weight_values.numel() * 4 + 70 * 4


def test_state_dict_round_trip_adopts_the_value_count():
    a = SparseLinear.from_linear(nn.Linear(100, 20))
    b = SparseLinear(100, 20)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 100)
    assert torch.equal(a(x), b(x))
    broken = dict(a.state_dict(), weight_values=a.weight_values[:-3])
    with pytest.raises(RuntimeError, match="stored values"):
        SparseLinear(100, 20).load_state_dict(broken)


def test_swap_keeps_logits_and_greedy_generation():
    model = sparse_model()
    with torch.no_grad():
        dense_logits = model(X).logits
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    dense_out = model.generate(X[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), **kwargs)
    to_sparse_kernel(model)
    assert len(model.mosaic_sparse_kernel["swapped"]) == 21 and model.mosaic_sparse_kernel["dense"] == []
    assert isinstance(model.model.layers[2].mlp.down_proj, SparseLinear)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(X[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), **kwargs), dense_out)


def test_only_projections_sparse_enough_are_swapped():
    model = sparse_model(0.7)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.normal_()  # dense again
    to_sparse_kernel(model, min_sparsity=0.5)
    assert model.mosaic_sparse_kernel["dense"] == ["model.layers.1.self_attn.q_proj"]
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse_kernel(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match="values_dtype"):
        to_sparse_kernel(model, values_dtype=torch.float16)


def test_bf16_values_equal_a_bf16_rounded_dense_model():
    model = sparse_model(0.5, seed=1)
    rounded = sparse_model(0.5, seed=1)
    with torch.no_grad():
        for lin in named_projections(rounded).values():
            lin.weight.copy_(lin.weight.bfloat16().float())
        expected = rounded(X).logits
    to_sparse_kernel(model, min_sparsity=0.0, values_dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight_values.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_bf16_model_runs_on_the_kernel():
    model = sparse_model(0.6).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(X).logits.float()
    to_sparse_kernel(model)
    with torch.no_grad():
        got = model(X).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)  # fp32 accumulation vs bf16 GEMMs


def test_shape_reduced_composite_model_runs_on_the_kernel():
    from test_composite import composite

    model = composite()
    assert model.config.model_type == "mosaic_llama"
    shapes = {tuple(lin.weight.shape) for lin in named_projections(model).values()}
    with torch.no_grad():
        dense_logits = model(X).logits
    out = model.generate(X[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    to_sparse_kernel(model, min_sparsity=0.0)
    assert {(m.out_features, m.in_features) for m in named_projections(model).values()} == shapes
    assert all(isinstance(m, SparseLinear) for m in named_projections(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(X[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0), out)
