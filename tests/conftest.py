"""Shared fixtures: tiny random models built from configs (no Hub access), a char-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    config = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i - 32 for i in range(32, 32 + VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def hessian_stats(X: torch.Tensor):
    """``InputStatistics`` (Σx², H = XᵀX) of the inputs ``X`` (tokens × d)."""
    from optimum_mosaic.calibration.statistics import InputStatistics

    stats = InputStatistics.empty(X.shape[1], True)
    stats.update(X)
    return stats


def correlated_problem(seed: int = 0, rows: int = 16, cols: int = 32, tokens: int = 256):
    """A weight and the statistics of correlated inputs ``X = Z A``, so that ``H = XᵀX`` is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    return W, hessian_stats(X)


def reconstruction_error(W: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    """The layer objective ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` in float64."""
    E = (W - pruned).double()
    return torch.trace(E @ H.double() @ E.T).item()


def token_windows(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def allocations(fn) -> list[int]:
    """Bytes of every CPU allocation ``fn()`` makes (torch's memory profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), reverse=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run as fast on one thread and avoid OpenMP threads contending on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """The bundled corpus's token ids are kept in this session's folder, not in the user's cache."""
    from optimum_mosaic.calibration import data

    folder = tmp_path_factory.getbasetemp() / "tokens"
    monkeypatch.setattr(data, "token_cache", lambda: folder)
