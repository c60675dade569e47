"""Mustafar sparse KV cache: per-token pruning, the bitmap format and its byte count, and the Cache itself."""

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from transformers import DynamicCache

from optimum_mosaic.sparse.format import OFFSET_BYTES, BitmapTensor, decompress, tile_nbytes
from optimum_mosaic.sparse.kv_cache import KV_PAD, SparseKVCache, compress, prune_per_token, pruned_count


def vector_nbytes(nonzeros: int, itemsize: int) -> int:
    """One head_dim-64 vector of the cache: one padded tile and its row offset."""
    return tile_nbytes(nonzeros, itemsize, KV_PAD) + OFFSET_BYTES


PROMPT, LENGTH, WINDOW = 32, 64, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model64():
    """head_dim 64 (one tile per token vector), 2 KV heads."""
    return tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)


def decode_logits(model, ids, cache, prompt=PROMPT):
    """Prefill ``prompt`` tokens, then feed the rest one at a time; last-position logits of every step."""
    with torch.no_grad():
        steps = [model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(steps, 1)


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- prune_per_token -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_prune_per_token_zeroes_exactly_round_s_d_smallest(head_dim, sparsity):
    x = torch.randn(2, 3, 5, head_dim, generator=torch.Generator().manual_seed(0))
    pruned = prune_per_token(x, sparsity)
    n = round(sparsity * head_dim + 1e-9)  # 32/64 and 45/90: round half up
    assert ((pruned == 0).sum(-1) == n).all()
    kept = pruned != 0
    assert torch.equal(pruned[kept], x[kept])  # kept entries untouched
    smallest_kept = x.abs().masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = x.abs().masked_fill(kept, -1.0).amax(-1)
    assert (smallest_kept > largest_dropped).all()


def test_reference_k_minus_1_semantics():
    x = torch.randn(4, 2, 8, 128, generator=torch.Generator().manual_seed(1))
    assert ((prune_per_token(x, 0.5, reference_k_minus_1=True) == 0).sum(-1) == 63).all()
    assert ((prune_per_token(x, 0.7, reference_k_minus_1=True) == 0).sum(-1) == 88).all()
    assert [pruned_count(128, s, True) for s in (0.5, 0.7)] == [63, 88]
    assert [pruned_count(128, s) for s in (0.0, 0.5, 0.7, 1.0)] == [0, 64, 90, 128]
    with pytest.raises(ValueError):
        pruned_count(64, 1.5)


def test_pruning_is_deterministic_with_ties_and_idempotent():
    x = torch.tensor([[1.0, -1.0, 1.0, 2.0, -1.0, 3.0, 1.0, 0.5]])
    first = prune_per_token(x, 0.5)  # |0.5| then the three lowest-index |1|s go
    assert torch.equal(first, torch.tensor([[0.0, 0.0, 0.0, 2.0, -1.0, 3.0, 1.0, 0.0]]))
    assert all(torch.equal(prune_per_token(x, 0.5), first) for _ in range(3))
    y = torch.randn(3, 64)
    assert torch.equal(prune_per_token(prune_per_token(y, 0.7), 0.7), prune_per_token(y, 0.7))
    assert prune_per_token(y, 0.0) is y


# -- bitmap format ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 3, 16), (7, 2, 64), (3, 130), (4, 1, 128), (0, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_round_trip_is_exact(shape, dtype):
    x = prune_per_token(torch.randn(shape).to(dtype), 0.6)
    packed = compress(x)
    back = decompress(packed)
    assert back.dtype == dtype and back.shape == x.shape and torch.equal(back, x)
    assert packed.offsets.dtype == torch.int32 and packed.bitmaps.dtype == torch.uint8
    assert packed.values.numel() % 8 == 0
    if x.shape[0] > 1:  # concatenation along dim 0 tile by tile
        joined = BitmapTensor.cat([compress(x[:1]), compress(x[1:])])
        assert torch.equal(decompress(joined), x)


def test_nbytes_matches_a_hand_count():
    x = torch.zeros(64, dtype=torch.float16)
    x[[1, 5, 9, 60, 63]] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0], dtype=torch.float16)
    packed = compress(x)
    # one tile: 8 B bitmap + 8 padded values × 2 B + 4 B offset, + 8 B for the 1-D shape
    assert packed.nbytes == 8 + 8 * 2 + 4 + 8 == 36
    assert packed.nbytes_as(4) == 8 + 8 * 4 + 4 + 8
    assert packed.nonzero_counts().tolist() == [5]
    two = torch.zeros(2, 64)
    two[0, :9] = 1.0  # 9 non-zeros → padded to 16; the second tile is empty
    assert compress(two).nbytes == 2 * 8 + 16 * 4 + 2 * 4 + 2 * 8
    assert compress(two).dense_nbytes == 2 * 64 * 4


def test_format_ratios_for_head_dim_64():
    """The per-token bytes of the pruned tail, against dense: ≤ 50 % at 70 % sparsity in fp16 and fp32."""
    ratios = {
        (s, size): vector_nbytes(64 - pruned_count(64, s), size) / (64 * size) for s in (0.5, 0.7) for size in (2, 4)
    }
    assert ratios == {(0.5, 2): 76 / 128, (0.5, 4): 140 / 256, (0.7, 2): 60 / 128, (0.7, 4): 108 / 256}
    x = prune_per_token(torch.randn(100, 2, 64, dtype=torch.float16), 0.7)
    assert compress(x).nbytes == 200 * 60 + 3 * 8
    assert compress(x).nbytes / compress(x).dense_nbytes < 0.47


# -- the cache -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity,window", [(0.0, 4), (0.7, 64)])
def test_lossless_settings_equal_dynamic_cache(model, sparsity, window):
    ids = token_windows(2, 24)
    cache = SparseKVCache(sparsity, sparsity, window=window)
    expected = decode_logits(model, ids, DynamicCache(), prompt=16)
    assert torch.allclose(decode_logits(model, ids, cache, prompt=16), expected, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 24 and cache.get_mask_sizes(1, 0) == (25, 0)
    assert not cache.is_compileable
    mask = torch.ones(2, 8, dtype=torch.long)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    dense = model.generate(ids[:, :8], **kwargs)
    sparse = model.generate(ids[:, :8], past_key_values=SparseKVCache(sparsity, sparsity, window=window), **kwargs)
    assert torch.equal(sparse, dense)


def test_beam_search_reorders_the_compressed_tail(model):
    ids = token_windows(1, 8)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0)
    assert torch.equal(
        model.generate(ids, past_key_values=SparseKVCache(0, 0, window=2), **kwargs), model.generate(ids, **kwargs)
    )
    out = model.generate(ids, past_key_values=SparseKVCache(0.5, 0.5, window=2), min_new_tokens=8, **kwargs)
    assert out.shape == (1, 16)


def test_pruned_tail_and_dense_window(model64):
    ids = token_windows(2, LENGTH, seed=3)
    cache = SparseKVCache(key_sparsity=0.5, value_sparsity=0.7, window=WINDOW)
    decode_logits(model64, ids, cache)
    assert cache.get_seq_length() == LENGTH and len(cache.layers) == 3
    for layer in cache.layers:
        assert layer.tail_length == LENGTH - WINDOW and layer.keys.shape == (2, 2, WINDOW, 64)
        tail_keys, tail_values = layer._dense_tail()
        assert ((tail_keys == 0).sum(-1) == 32).all() and ((tail_values == 0).sum(-1) == 45).all()
        assert (layer.keys != 0).all() and (layer.values != 0).all()  # the window is dense
        # exact bytes: one tile per (token, batch, head), 4-D shapes, fp32 states
        vectors = (LENGTH - WINDOW) * 2 * 2
        assert layer.tail_nbytes() == vectors * (vector_nbytes(32, 4) + vector_nbytes(19, 4)) + 2 * 4 * 8
        assert layer.window_nbytes() == 2 * WINDOW * 2 * 2 * 64 * 4
        assert layer.dense_nbytes() == 2 * LENGTH * 2 * 2 * 64 * 4
        assert layer.tail_nbytes(itemsize=2) == vectors * (vector_nbytes(32, 2) + vector_nbytes(19, 2)) + 2 * 4 * 8
    report = cache.memory_report()
    assert report["total"] == cache.nbytes() == sum(cache.nbytes(i) for i in range(3))
    assert report["dense"] == cache.dense_nbytes() and report["total"] == report["tail"] + report["window"]


def test_a_zero_window_prunes_every_token_and_reports_a_ratio(model64):
    """``window=0``: every token is pruned at once; the dense equivalent is still counted (not from the empty
    window), so the ratio is a number: 140/256 B per fp32 vector at s = 0.5 (+ 64 B of shapes per layer)."""
    cache = SparseKVCache(0.5, 0.5, window=0)
    decode_logits(model64, token_windows(2, 40, seed=7), cache, prompt=8)
    for layer in cache.layers:
        assert layer.tail_length == 40 and layer.keys.shape == (2, 2, 0, 64) and layer.window_nbytes() == 0
        assert layer.dense_nbytes() == 2 * 40 * 2 * 2 * 64 * 4
    report = cache.memory_report()
    assert report["ratio"] == report["total"] / report["dense"] and 0.54 < report["ratio"] < 0.56
    assert SparseKVCache(window=0).memory_report()["ratio"] == 1.0  # nothing held yet: no saving, not 0/0


def test_memory_at_70_percent_is_at_most_half_of_dense(model64):
    """bf16 states (2 B, as fp16): the pruned tail is 60/128 = 46.9 % of dense; with the dense window the whole
    cache is (60·(L−W) + 128·W)/(128·L) + metadata, ≤ 50 % once L ≥ 17·W (here L = 128, W = 4: 48.6 %).
    fp32 states: 108/256 = 42.2 % for the tail and ≤ 50 % once L ≥ 7.4·W (L = 64: 45.8 %)."""
    ids = token_windows(1, 128, seed=4)
    bf16 = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16)
    cache = SparseKVCache(0.7, 0.7, window=WINDOW)
    with torch.no_grad():
        bf16(ids, past_key_values=cache, use_cache=True)
    report = cache.memory_report()
    assert report["tail"] / (report["dense"] * (128 - WINDOW) / 128) < 0.47
    assert 0.48 < report["ratio"] < 0.49
    fp32 = SparseKVCache(0.7, 0.7, window=WINDOW)
    with torch.no_grad():
        model64(ids[:, :LENGTH], past_key_values=fp32, use_cache=True)
    assert 0.45 < fp32.memory_report()["ratio"] < 0.46
    assert fp32.nbytes(itemsize=2) / fp32.dense_nbytes(itemsize=2) > 0.5  # fp16 at L = 16·W: just above half


@pytest.mark.parametrize("sparsity,bound", [(0.5, 0.2), (0.7, 0.35)])
def test_pruned_cache_stays_close_to_dense(model64, sparsity, bound):
    """A random-init model (no K outliers) is a hard case: measured 13.8 % / 25.8 % relative logit error."""
    ids = token_windows(2, LENGTH, seed=5)
    dense = decode_logits(model64, ids, DynamicCache())
    sparse = decode_logits(model64, ids, SparseKVCache(sparsity, sparsity, window=WINDOW))
    assert torch.allclose(sparse[:, 0], dense[:, 0], atol=1e-5)  # the prompt attends densely
    assert 0 < rel_error(sparse, dense) < bound
    cache = SparseKVCache(sparsity, sparsity, window=WINDOW)
    out = model64.generate(ids[:, :16], past_key_values=cache, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert out.shape == (2, 24)


class MaskedDenseReference:
    """Independent bookkeeping: a DynamicCache whose stored tokens older than the last ``window`` are pruned in
    place (pruning is idempotent, so re-pruning the whole old part every step is harmless)."""

    def __init__(self, key_sparsity, value_sparsity, window, reference_k_minus_1=False):
        self.cache, self.window = DynamicCache(), window
        self.args = (key_sparsity, value_sparsity, reference_k_minus_1)

    def step(self, model, ids):
        ks, vs, k_minus_1 = self.args
        for layer in self.cache.layers:
            old = layer.keys.shape[-2] - self.window
            if old > 0:
                layer.keys[..., :old, :] = prune_per_token(layer.keys[..., :old, :], ks, k_minus_1)
                layer.values[..., :old, :] = prune_per_token(layer.values[..., :old, :], vs, k_minus_1)
        return model(ids, past_key_values=self.cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("k_minus_1", [False, True])
def test_step_by_step_equals_a_masked_dense_reference(model64, k_minus_1):
    ids = token_windows(2, 40, seed=6)
    cache = SparseKVCache(0.5, 0.7, window=WINDOW, reference_k_minus_1=k_minus_1)
    reference = MaskedDenseReference(0.5, 0.7, WINDOW, k_minus_1)
    with torch.no_grad():
        expected = [reference.step(model64, ids[:, :20])]
        expected += [reference.step(model64, ids[:, t : t + 1]) for t in range(20, 40)]
    got = decode_logits(model64, ids, cache, prompt=20)
    assert torch.allclose(got, torch.stack(expected, 1), atol=1e-5, rtol=0)
    assert rel_error(got, decode_logits(model64, ids, DynamicCache(), prompt=20)) > 1e-3  # pruning did happen


def test_crop_only_inside_the_window(model):
    cache = SparseKVCache(0.5, 0.5, window=WINDOW)
    with torch.no_grad():
        model(token_windows(1, 12), past_key_values=cache, use_cache=True)
    cache.crop(0)
    cache.crop(-2)
    assert cache.get_seq_length() == 10 and not cache.is_croppable
    with pytest.raises(NotImplementedError, match="dense window"):
        cache.crop(-3)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


def test_layers_with_different_kv_head_counts():
    from optimum_mosaic import PrunedConfig, Pruner

    model = tiny_llama(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    small = dict(nsamples=8, seqlen=32, search_samples=4, block_size=32, allocation="layer", lamda=0.2)
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.25, structured_units=["attention"], **small)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=token_windows(12, 32), batch_size=4)
    heads = [layer.self_attn.k_proj.out_features // 16 for layer in model.model.layers]
    assert len(set(heads)) > 1, heads
    ids = token_windows(1, 12, seed=8)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cache = SparseKVCache(0.0, 0.0, window=WINDOW, config=model.config)
    assert torch.equal(model.generate(ids, past_key_values=cache, **kwargs), model.generate(ids, **kwargs))
    cache = SparseKVCache(0.5, 0.5, window=WINDOW, config=model.config)
    assert model.generate(ids, past_key_values=cache, min_new_tokens=12, **kwargs).shape == (1, 24)
    assert [layer.keys.shape[1] for layer in cache.layers] == heads
    assert [layer.tail_keys.shape[2] for layer in cache.layers] == heads
    assert cache.nbytes() < cache.dense_nbytes()
