"""The bitmap sparse format of the Mustafar KV cache (Joo et al., arXiv 2505.22913): 64-element tiles.

    bytes per tile:  8 (64-bit bitmap) + ⌈c/8⌉·8·itemsize (the c non-zeros, padded to a multiple of 8) + 4 (int32 offset)

``compress``/``decompress`` are exact inverses on tensors whose zeros are the pruned entries; ``BitmapTensor.nbytes``
counts every stored byte (bitmaps, padded values, offsets and the shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE = 64  # elements per bitmap tile (one 64-bit mask)
PAD = 8  # the non-zero count of a tile is padded to a multiple of PAD values
OFFSET_BYTES = 4  # int32 prefix-sum offset per tile
BITMAP_BYTES = TILE // 8
SHAPE_BYTES = 8  # per dimension of the stored shape (int64), the only per-tensor metadata


_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[n, 64] bool → [n, 8] uint8; element 8·b + j is bit j of byte b."""
    weights = _BIT_WEIGHTS.to(mask.device)
    return (mask.view(-1, 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(bitmaps: torch.Tensor) -> torch.Tensor:
    """[n, 8] uint8 → [n, 64] uint8 of 0/1 (integer arithmetic on it is much faster than on bool)."""
    shifts = _BIT_SHIFTS.to(bitmaps.device)
    return ((bitmaps.unsqueeze(-1) >> shifts) & 1).view(-1, TILE)


def tile_nbytes(nonzeros: int, itemsize: int) -> int:
    """Bytes of one tile holding ``nonzeros`` values of ``itemsize`` bytes: 8 + ⌈c/8⌉·8·itemsize + 4."""
    return BITMAP_BYTES + -(-nonzeros // PAD) * PAD * itemsize + OFFSET_BYTES


@dataclass
class BitmapTensor:
    """A tensor ``[..., D]`` in the bitmap format. Each last-dim vector is cut into ⌈D/64⌉ tiles (the last one
    zero-padded, so tiles never straddle two vectors and tensors concatenate along dim 0 tile by tile); tiles
    are laid out in row-major order.

    ``bitmaps`` [tiles, 8] uint8 (bit j of byte b ↔ element 8b + j), ``values`` the non-zeros of tile t at
    ``values[offsets[t] : offsets[t] + c_t]`` followed by zeros up to a multiple of 8, ``offsets`` [tiles]
    int32 (exclusive prefix sum of the padded counts), ``shape`` the dense shape."""

    bitmaps: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def num_tiles(self) -> int:
        return self.offsets.numel()

    @property
    def nbytes(self) -> int:
        """Every stored byte: bitmaps + padded values + offsets + the shape (int64 per dimension)."""
        return self.nbytes_as(self.values.element_size())

    def nbytes_as(self, itemsize: int) -> int:
        """``nbytes`` if the values were held in an ``itemsize``-byte dtype (same sparsity pattern)."""
        return (
            self.bitmaps.numel() * self.bitmaps.element_size()
            + self.values.numel() * itemsize
            + self.offsets.numel() * OFFSET_BYTES
            + SHAPE_BYTES * len(self.shape)
        )

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.values.element_size()

    def nonzero_counts(self) -> torch.Tensor:
        """Non-zeros per tile (popcount of the bitmaps)."""
        return _unpack_bits(self.bitmaps).sum(-1, dtype=torch.int64)

    def to_dense(self) -> torch.Tensor:
        return decompress(self)

    @staticmethod
    def cat(parts: list[BitmapTensor]) -> BitmapTensor:
        """Concatenation along dim 0 (equal trailing shapes): bitmaps and values are appended, offsets shifted."""
        parts = [p for p in parts if p.shape[0] > 0] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError(f"trailing shapes differ: {[p.shape for p in parts]}")
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + p.values.numel())
        if starts[-1] >= 2**31:
            raise OverflowError("more than 2**31 stored values: the int32 tile offsets would overflow")
        offsets = torch.cat([p.offsets + start for p, start in zip(parts, starts[:-1], strict=True)])
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        return BitmapTensor(torch.cat([p.bitmaps for p in parts]), torch.cat([p.values for p in parts]), offsets, shape)


def _tiles(x: torch.Tensor) -> torch.Tensor:
    head_dim = x.shape[-1]
    width = -(-head_dim // TILE) * TILE
    rows = x.reshape(-1, head_dim)
    if width != head_dim:
        rows = F.pad(rows, (0, width - head_dim))
    return rows.reshape(-1, TILE)


def compress(x: torch.Tensor) -> BitmapTensor:
    """Bitmap-format copy of ``x`` (its exact zeros are not stored; -0.0 comes back as +0.0)."""
    if x.dim() == 0:
        raise ValueError("compress needs at least one dimension")
    tiles = _tiles(x)
    mask = tiles != 0
    counts = mask.sum(-1)
    padded = (counts + PAD - 1) // PAD * PAD
    ends = padded.cumsum(0)
    offsets = ends - padded
    values = tiles.new_zeros(int(ends[-1]) if ends.numel() else 0)
    slot = offsets.unsqueeze(-1) + mask.cumsum(-1) - 1  # position of each non-zero in ``values``
    values[slot[mask]] = tiles[mask]
    return BitmapTensor(_pack_bits(mask), values, offsets.to(torch.int32), tuple(x.shape))


def decompress(packed: BitmapTensor) -> torch.Tensor:
    """The dense tensor back from the bitmap format (exact inverse of ``compress``)."""
    bits = _unpack_bits(packed.bitmaps)  # [tiles, 64] uint8 0/1
    slot = bits.cumsum(-1)  # 1-based rank of each non-zero inside its tile
    slot += packed.offsets.long().unsqueeze(-1)
    slot.mul_(bits)  # zeros point at the sentinel 0 prepended below
    tiles = torch.cat([packed.values.new_zeros(1), packed.values]).take(slot)
    head_dim = packed.shape[-1] if packed.shape else 1
    rows = tiles.view(-1, -(-head_dim // TILE) * TILE)[:, :head_dim]
    return rows.reshape(packed.shape)
