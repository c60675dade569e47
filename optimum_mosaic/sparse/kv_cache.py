"""Mustafar sparse KV cache: per-token magnitude pruning of K (after RoPE) and V, a dense recent window,
and the package's bitmap format (``format.py``) with the paper's padding of each tile to a multiple of 8 values
(Joo et al., arXiv 2505.22913; reference path, no custom kernel).

    prune:  for every (batch, head, token) vector x ∈ ℝᴰ keep the D − n entries of largest |x|, n = round(s·D)
    bytes:  per 64-element tile  8 (bitmap) + ⌈c/8⌉·8·itemsize (c non-zeros, padded); per vector 4 (int32 offset)

``SparseKVCache`` is a transformers ``Cache``: the last ``window`` tokens of every layer stay dense, older
tokens are pruned and held in the bitmap format; ``update`` returns decompressed tail ⊕ dense window ⊕ new
states (a masked-dense attention path). With head_dim 64 and s = 0.7 (45 of 64 entries pruned, 19 kept →
24 padded) a tile costs 8 + 48 + 4 = 60 B in fp16 (46.9 % of 128 B) and 8 + 96 + 4 = 108 B in fp32
(42.2 % of 256 B); at s = 0.5: 76 B (59.4 %) and 140 B (54.7 %). The whole cache of L tokens with a window
of W is (60·(L−W) + 128·W) / (128·L) of dense in fp16 at s = 0.7, ≤ 50 % once L ≥ 17·W (W = 32: L ≥ 544).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .format import BitmapTensor, decompress
from .format import compress as _compress

KV_PAD = 8  # Mustafar's layout: each tile's non-zeros padded to a multiple of 8 values

__all__ = [
    "KV_PAD",
    "SparseKVCache",
    "SparseKVLayer",
    "compress",
    "per_token_keep_mask",
    "pruned_count",
    "prune_per_token",
]


def compress(x: torch.Tensor) -> BitmapTensor:
    """``x`` in the bitmap format with the cache's padding (``KV_PAD``)."""
    return _compress(x, pad=KV_PAD)


# -- per-token magnitude pruning ---------------------------------------------------------------------------------
def pruned_count(head_dim: int, sparsity: float, reference_k_minus_1: bool = False) -> int:
    """Entries zeroed per vector: round(s·D) (half up), or the reference's max(1, ⌊s·D⌋) − 1."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if reference_k_minus_1:
        return max(1, int(sparsity * head_dim)) - 1
    return min(head_dim, math.floor(sparsity * head_dim + 0.5))


def per_token_keep_mask(x: torch.Tensor, sparsity: float, reference_k_minus_1: bool = False) -> torch.Tensor:
    """Boolean mask over ``x`` (``[..., D]``) of the entries kept by per-token magnitude pruning.

    Exact semantics: the n = round(s·D) smallest |x| of each vector are dropped; ties are broken by position
    (a stable sort: among equal magnitudes the lower index is dropped first), so the result is deterministic.
    Reference semantics (``reference_k_minus_1``): k = max(1, ⌊s·D⌋), τ = k-th smallest |x|, keep |x| ≥ τ —
    k − 1 entries dropped when the magnitudes are distinct (D = 128: 63 at s = 0.5, 88 at s = 0.7)."""
    magnitude = x.abs().float()
    head_dim = x.shape[-1]
    if reference_k_minus_1:
        k = max(1, int(sparsity * head_dim))
        threshold = magnitude.kthvalue(k, dim=-1, keepdim=True).values
        return magnitude >= threshold
    n = pruned_count(head_dim, sparsity)
    keep = torch.ones_like(x, dtype=torch.bool)
    if n > 0:
        dropped = magnitude.argsort(dim=-1, stable=True)[..., :n]
        keep.scatter_(-1, dropped, False)
    return keep


def prune_per_token(x: torch.Tensor, sparsity: float, reference_k_minus_1: bool = False) -> torch.Tensor:
    """``x`` with the smallest-magnitude entries of every last-dim vector set to 0 (see ``per_token_keep_mask``)."""
    if sparsity == 0 and not reference_k_minus_1:
        return x
    return x.masked_fill(~per_token_keep_mask(x, sparsity, reference_k_minus_1), 0)


# -- the cache ---------------------------------------------------------------------------------------------------
class SparseKVLayer(CacheLayerMixin):
    """One layer of ``SparseKVCache``: a pruned, bitmap-compressed tail and a dense window.

    ``keys``/``values`` hold the dense window ``[B, H, ≤window, D]``; ``tail_keys``/``tail_values`` hold the
    older tokens token-major (``[T, B, H, D]``, so each eviction appends whole tiles). Storage is per layer,
    so layers may have different head counts (shape-reduced checkpoints)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(
        self,
        key_sparsity: float = 0.5,
        value_sparsity: float = 0.5,
        window: int = 32,
        reference_k_minus_1: bool = False,
        **kwargs,
    ):
        super().__init__()
        if window < 0:
            raise ValueError(f"window must be ≥ 0, got {window}")
        for sparsity in (key_sparsity, value_sparsity):
            pruned_count(1, sparsity)  # validates the range
        self.key_sparsity, self.value_sparsity = key_sparsity, value_sparsity
        self.window = window
        self.reference_k_minus_1 = reference_k_minus_1
        self.tail_keys: BitmapTensor | None = None
        self.tail_values: BitmapTensor | None = None

    def __repr__(self):
        return (
            f"SparseKVLayer(key_sparsity={self.key_sparsity}, value_sparsity={self.value_sparsity}, "
            f"window={self.window}, tokens={self.get_seq_length()})"
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.tail_keys = compress(self.keys.permute(2, 0, 1, 3))
        self.tail_values = compress(self.values.permute(2, 0, 1, 3))
        self.is_initialized = True

    @property
    def tail_length(self) -> int:
        return self.tail_keys.shape[0] if self.is_initialized else 0

    def _dense_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pruned tail decompressed to ``[B, H, T, D]``."""
        return decompress(self.tail_keys).permute(1, 2, 0, 3), decompress(self.tail_values).permute(1, 2, 0, 3)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return tail ⊕ window ⊕ new states for attention (the new ones dense), then keep only the last
        ``window`` tokens dense: the ones that leave are pruned and compressed into the tail."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.keys, self.values
        if self.tail_length > 0:
            tail_keys, tail_values = self._dense_tail()
            keys, values = torch.cat([tail_keys, keys], dim=-2), torch.cat([tail_values, values], dim=-2)
        self._evict()
        return keys, values

    def _evict(self) -> None:
        overflow = self.keys.shape[-2] - self.window
        if overflow <= 0:
            return
        self.tail_keys = BitmapTensor.cat([self.tail_keys, self._pack(self.keys[..., :overflow, :], self.key_sparsity)])
        self.tail_values = BitmapTensor.cat(
            [self.tail_values, self._pack(self.values[..., :overflow, :], self.value_sparsity)]
        )
        self.keys = self.keys[..., overflow:, :].clone()  # clone: do not keep the evicted tokens' storage alive
        self.values = self.values[..., overflow:, :].clone()

    def _pack(self, states: torch.Tensor, sparsity: float) -> BitmapTensor:
        return compress(prune_per_token(states, sparsity, self.reference_k_minus_1).permute(2, 0, 1, 3))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.tail_length + self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.tail_keys = self.tail_values = None
        self.is_initialized = False

    # -- memory --------------------------------------------------------------------------------------------------
    def tail_nbytes(self, itemsize: int | None = None) -> int:
        if not self.is_initialized:
            return 0
        if itemsize is None:
            return self.tail_keys.nbytes + self.tail_values.nbytes
        return self.tail_keys.nbytes_as(itemsize) + self.tail_values.nbytes_as(itemsize)

    def window_nbytes(self, itemsize: int | None = None) -> int:
        if not self.is_initialized:
            return 0
        return (self.keys.numel() + self.values.numel()) * (itemsize or self.keys.element_size())

    def nbytes(self, itemsize: int | None = None) -> int:
        """Bytes held: compressed tail + dense window (``itemsize``: as if stored in that element size)."""
        return self.tail_nbytes(itemsize) + self.window_nbytes(itemsize)

    def dense_nbytes(self, itemsize: int | None = None) -> int:
        """Bytes a ``DynamicLayer`` would hold for the same tokens (per token B·H·D from the window's shape,
        which holds even when the window is empty, as with ``window=0``)."""
        if not self.is_initialized:
            return 0
        per_token = sum(math.prod(t.shape[:-2]) * t.shape[-1] for t in (self.keys, self.values))
        return per_token * (itemsize or self.keys.element_size()) * self.get_seq_length()

    # -- batch reordering (decompress → select → recompress; exact, since pruning is idempotent) ------------------
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.tail_length > 0:
            tail_keys, tail_values = self._dense_tail()
            self.tail_keys = compress(fn(tail_keys).permute(2, 0, 1, 3))
            self.tail_values = compress(fn(tail_values).permute(2, 0, 1, 3))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Only the dense window can be rolled back exactly: ``crop(-n)`` with n ≤ window length."""
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if tokens_to_remove > 0 or -tokens_to_remove > self.keys.shape[-2]:
            raise NotImplementedError(
                f"SparseKVCache can only crop tokens still in its dense window ({self.keys.shape[-2]} tokens) and only "
                f"with a negative count; got crop({tokens_to_remove}). Pruned tokens cannot be restored."
            )
        self.keys = self.keys[..., :tokens_to_remove, :].clone()
        self.values = self.values[..., :tokens_to_remove, :].clone()


class SparseKVCache(Cache):
    """Mustafar KV cache: the last ``window`` tokens of each layer dense, older ones per-token magnitude-pruned
    (keys after RoPE, as ``update`` receives them; ``key_sparsity`` and ``value_sparsity`` independent) and
    stored in the bitmap format.

    Prefill: attention over the prompt uses the dense K/V, then all but the last ``window`` tokens are pruned.
    Decode: the new token is appended to the window and attends with it densely; a token leaving the window is
    pruned and compressed, and later steps see the pruned copy. ``reference_k_minus_1`` reproduces the reference
    code's k − 1 pruning count. Beam search works (reordering recompresses); ``crop`` only inside the window.

        cache = SparseKVCache(key_sparsity=0.7, value_sparsity=0.7, window=32)
        model.generate(input_ids, past_key_values=cache)
        cache.nbytes(), cache.dense_nbytes()
    """

    def __init__(
        self,
        key_sparsity: float = 0.5,
        value_sparsity: float = 0.5,
        window: int = 32,
        config=None,
        reference_k_minus_1: bool = False,
    ):
        make_layer = partial(
            SparseKVLayer,
            key_sparsity=key_sparsity,
            value_sparsity=value_sparsity,
            window=window,
            reference_k_minus_1=reference_k_minus_1,
        )
        self.key_sparsity, self.value_sparsity, self.window = key_sparsity, value_sparsity, window
        if config is None:
            super().__init__(layer_class_to_replicate=make_layer)
            return
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        if set(layer_types) != {"full_attention"}:
            raise ValueError(f"SparseKVCache supports full-attention layers only; the config has {set(layer_types)}")
        super().__init__(layers=[make_layer() for _ in range(text_config.num_hidden_layers)])

    def __repr__(self):
        return (
            f"SparseKVCache(key_sparsity={self.key_sparsity}, value_sparsity={self.value_sparsity}, "
            f"window={self.window}, layers={len(self.layers)}, tokens={self.get_seq_length()})"
        )

    def _layers(self, layer_idx: int | None) -> list[SparseKVLayer]:
        return self.layers if layer_idx is None else [self.layers[layer_idx]]

    def nbytes(self, layer_idx: int | None = None, itemsize: int | None = None) -> int:
        """Exact bytes held (compressed tails + dense windows), for one layer or all; ``itemsize``: as if the
        states were stored in that element size (2 for fp16) with the same sparsity pattern."""
        return sum(layer.nbytes(itemsize) for layer in self._layers(layer_idx))

    def dense_nbytes(self, layer_idx: int | None = None, itemsize: int | None = None) -> int:
        """Bytes a ``DynamicCache`` would hold for the same tokens."""
        return sum(layer.dense_nbytes(itemsize) for layer in self._layers(layer_idx))

    def memory_report(self, itemsize: int | None = None) -> dict:
        """Per-layer and total bytes: tail (compressed), window (dense), total, dense equivalent, and ratio =
        total / dense (1.0 while nothing is held: no saving yet)."""
        rows = [
            dict(
                tail=layer.tail_nbytes(itemsize),
                window=layer.window_nbytes(itemsize),
                total=layer.nbytes(itemsize),
                dense=layer.dense_nbytes(itemsize),
            )
            for layer in self.layers
        ]
        totals = {key: sum(row[key] for row in rows) for key in ("tail", "window", "total", "dense")}
        totals["ratio"] = totals["total"] / totals["dense"] if totals["dense"] else 1.0
        return {"layers": rows, **totals}
