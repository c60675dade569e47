"""Sparse storage and compute, in one place: the bitmap tile format (``format``), the CPU kernel (``kernel``),
``SparseLinear`` and the swap of pruned projections (``linear``), compressed checkpoints (``checkpoint``) and the
Mustafar KV cache (``kv_cache``)."""

from .format import BitmapTensor, compress, decompress
from .kernel import available_paths, sparse_linear
from .kv_cache import SparseKVCache
from .linear import SparseLinear, to_sparse_kernel

__all__ = [
    "BitmapTensor",
    "SparseKVCache",
    "SparseLinear",
    "available_paths",
    "compress",
    "decompress",
    "sparse_linear",
    "to_sparse_kernel",
]
