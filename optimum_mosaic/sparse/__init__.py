"""Sparse storage and compute, in one place: the bitmap tile format (``format``), the CPU kernel (``kernel``),
``SparseLinear`` and the swap of pruned projections (``linear``), compressed checkpoints (``checkpoint``) and the
Mustafar KV cache (``kv_cache``)."""

from .format import BitmapTensor, compress, decompress
from .kv_cache import SparseKVCache

__all__ = ["BitmapTensor", "SparseKVCache", "compress", "decompress"]
