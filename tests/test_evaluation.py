"""Perplexity windows and NLL: lm_head + cross-entropy in chunks equals the one-shot forward (soft-capped heads
included), and every calibration / evaluation window starts with BOS iff the tokenizer itself adds one."""

import pytest
import torch
from conftest import VOCAB, char_tokenizer, tiny_llama, token_windows
from tokenizers import processors
from transformers import Gemma2Config, Gemma2ForCausalLM

from optimum_mosaic.calibration.data import bos_id, sample_windows, split_windows, tokenize
from optimum_mosaic.evaluation import mean_nll, token_nll

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "It was a bright morning in Bath, and Anne walked out early. " * 20


def reference_nll(model, x: torch.Tensor) -> torch.Tensor:
    """The unchunked definition: full logits of one forward, next-token cross-entropy in float64."""
    logits = model(x, use_cache=False).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(
        x.shape[0], -1
    )


def tiny_gemma2() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, final_logit_softcapping=3.0,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma2], ids=["llama", "gemma2-softcap"])
@pytest.mark.parametrize("budget", [VOCAB, 7 * VOCAB, 10**9], ids=["1-token", "7-tokens", "unchunked"])
def test_chunked_nll_equals_full_forward(build, budget):
    model, x = build(), token_windows(3, 24)
    with torch.inference_mode():
        chunked = token_nll(model, x, logit_budget=budget)
        full = reference_nll(model, x)
    assert chunked.shape == (3, 23)
    torch.testing.assert_close(chunked.double(), full, rtol=1e-5, atol=1e-6)


def test_mean_nll_does_not_depend_on_batching():
    model, x = tiny_llama(), token_windows(4, 24)
    with torch.inference_mode():
        expected = reference_nll(model, x).mean(dim=1).mean().item()
    for batch_size in (1, 3, 4):
        assert mean_nll(model, x, batch_size) == pytest.approx(expected, rel=1e-6)


def bos_tokenizer():
    """The char tokenizer with a post-processor that prepends ``<s>`` (like Gemma's)."""
    tok = char_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


def test_bos_only_where_the_tokenizer_adds_it():
    plain, with_bos = char_tokenizer(), bos_tokenizer()
    assert plain.bos_token_id is None and bos_id(plain) is None
    assert with_bos("a").input_ids[0] == with_bos.bos_token_id == bos_id(with_bos)
    # a tokenizer that knows a BOS token but does not prepend it (SmolLM2) gets none either
    plain.add_special_tokens({"bos_token": "<s>"})
    assert plain.bos_token_id is not None and bos_id(plain) is None


def test_every_window_starts_with_bos_and_keeps_the_text_in_order():
    tok = bos_tokenizer()
    bos, stream = bos_id(tok), tokenize(tok, TEXT)
    assert bos not in stream  # the stream itself holds no special tokens
    windows = split_windows(stream, 16, bos)
    assert windows.shape == (stream.numel() // 15, 16)
    assert (windows[:, 0] == bos).all()
    assert torch.equal(windows[:, 1:].flatten(), stream[: windows.shape[0] * 15])
    calib, held = sample_windows(tok, TEXT, nsamples=5, seqlen=16, seed=0, holdout=2)
    assert (calib[:, 0] == bos).all() and (held[:, 0] == bos).all()


def test_no_bos_windows_are_the_plain_stream():
    tok = char_tokenizer()
    stream = tokenize(tok, TEXT)
    windows = split_windows(stream, 16, bos_id(tok))
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    calib, _ = sample_windows(tok, TEXT, nsamples=5, seqlen=16, seed=0)
    assert all(any(torch.equal(c, w) for w in windows) for c in calib)
