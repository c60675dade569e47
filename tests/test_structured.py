"""Structured pruning: unit scores by hand, GQA-consistent head choice, shrunk == masked."""

import pytest
import torch
from conftest import tiny_llama, token_windows

from optimum_mosaic.architectures import get_arch_spec
from optimum_mosaic.calibration.statistics import InputStatistics
from optimum_mosaic.structured import LayerCut, LayerShape, apply_cuts, choose_units, layer_shape
from optimum_mosaic.structured.budget import attention_option
from optimum_mosaic.structured.scores import channel_scores, select_heads


def test_channel_scores_by_hand():
    gate = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    up = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    down = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # [hidden, channels]
    s = channel_scores(gate, up, down, x_sumsq=torch.tensor([4.0, 1.0]), z_sumsq=torch.tensor([1.0, 9.0]))
    # channel 0: 1·2 + 1·1 + (3+1)·1 = 7; channel 1: 2·1 + 1·2 + (0+1)·3 = 7 → tie broken by index
    assert s.tolist() == [7.0, 7.0]


def test_select_heads_keeps_equal_heads_per_group():
    q_scores = torch.tensor([9.0, 1.0, 5.0, 2.0, 8.0, 7.0, 0.5, 0.2, 0.1])  # 3 groups of 3
    heads, groups = select_heads(q_scores, torch.tensor([1.0, 1.0, 0.0]), groups_kept=2, heads_per_group=2)
    assert groups.tolist() == [0, 1] and heads.tolist() == [0, 2, 4, 5]


def test_attention_option_for_smollm2_shapes():
    shape = LayerShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)
    assert attention_option(shape, 0.0) == (3, 3)
    assert attention_option(shape, 0.25) == (3, 2)  # 6 query heads in 3 groups is exactly 75 %


@pytest.mark.parametrize("cut", [LayerCut(96, 2, 2), LayerCut(40, 1, 1), LayerCut(128, 2, 1)])
def test_shrunk_model_equals_masked_model(cut):
    shrunk, masked = tiny_llama(), tiny_llama()
    spec = get_arch_spec(shrunk)
    g = torch.Generator().manual_seed(0)
    stats = {
        p: InputStatistics(sumsq=torch.rand(n, generator=g) + 0.1)
        for p, n in {"q": 64, "k": 64, "gate": 64, "o": 64, "down": 128}.items()
    }
    for model in (shrunk, masked):
        layer = model.model.layers[1]
        keep = choose_units(layer, spec, stats, cut)
        apply_cuts(layer, spec, keep, physical=model is shrunk)
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
