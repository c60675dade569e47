"""The bitmap sparse format: 64-element tiles, a 64-bit bitmap each, the non-zeros packed, one offset per row.

A tensor ``[..., D]`` is a stack of rows (its last-dim vectors); each row is cut into ⌈D/64⌉ tiles (the last
one zero-padded, so a tile never straddles two rows). Stored:

    bitmaps  [rows · ⌈D/64⌉, 8] uint8   bit j of byte b ↔ element 8b + j of the tile (row-major tile order)
    values   [n]                        each tile's non-zeros in order, followed by zeros up to a multiple of ``pad``
    offsets  [rows] int32               exclusive prefix sum: row r's values start at ``values[offsets[r]]``
    shape    the dense shape            (8 B per dimension, the only per-tensor metadata)

    bytes = rows·⌈D/64⌉·8 + n·itemsize + rows·4 + 8·ndim,   n = Σ_tiles ⌈c/pad⌉·pad  (c: a tile's non-zeros)

Two users, one format. Pruned weights (``SparseLinear``, compressed checkpoints) use ``pad=1``: nothing is
padded, and a 70 %-sparse fp32 matrix with D a multiple of 64 costs 0.3 + 1/32 + 1/D of its dense bytes
(0.3319 for D = 576). The Mustafar KV cache uses ``pad=8`` (the paper's layout, aligned loads on a GPU); with
head_dim 64 a row is one tile, so its per-row offset is the paper's per-tile offset.

``compress``/``decompress`` are exact inverses on tensors whose zeros are the pruned entries (-0.0 comes back
as +0.0); ``BitmapTensor.nbytes`` counts every stored byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE = 64  # elements per bitmap tile (one 64-bit mask)
BITMAP_BYTES = TILE // 8
OFFSET_BYTES = 4  # int32 offset per row
SHAPE_BYTES = 8  # per dimension of the stored shape (int64)

_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[n, 64] bool → [n, 8] uint8; element 8·b + j is bit j of byte b."""
    weights = _BIT_WEIGHTS.to(mask.device)
    return (mask.view(-1, 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _popcount(bitmaps: torch.Tensor) -> torch.Tensor:
    """[n, 8] uint8 → [n] int64: set bits per tile (SWAR on 64-bit words, ~25× faster than unpacking)."""
    if bitmaps.numel() == 0:
        return torch.zeros(bitmaps.shape[0], dtype=torch.int64, device=bitmaps.device)
    try:
        x = bitmaps.contiguous().view(torch.int64).view(-1)
    except RuntimeError:  # a view whose storage offset is not a multiple of 8 bytes
        x = bitmaps.clone(memory_format=torch.contiguous_format).view(torch.int64).view(-1)
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56  # wraps mod 2⁶⁴; the top byte (≤ 64) is the count


def _unpack_bits(bitmaps: torch.Tensor) -> torch.Tensor:
    """[n, 8] uint8 → [n, 64] uint8 of 0/1 (integer arithmetic on it is much faster than on bool)."""
    shifts = _BIT_SHIFTS.to(bitmaps.device)
    return ((bitmaps.unsqueeze(-1) >> shifts) & 1).view(-1, TILE)


def tile_nbytes(nonzeros: int, itemsize: int, pad: int = 1) -> int:
    """Bytes of one tile holding ``nonzeros`` values of ``itemsize`` bytes: 8 + ⌈c/pad⌉·pad·itemsize
    (its row's 4-byte offset not included)."""
    return BITMAP_BYTES + -(-nonzeros // pad) * pad * itemsize


def tiles_per_row(width: int) -> int:
    return -(-width // TILE)


@dataclass
class BitmapTensor:
    """A tensor in the bitmap format (see the module docstring): ``bitmaps``, ``values``, ``offsets`` (one per
    row), the dense ``shape`` and the tile padding ``pad`` (1: none)."""

    bitmaps: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, ...]
    pad: int = 1

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def width(self) -> int:
        """The length of a row (the last dimension)."""
        return self.shape[-1] if self.shape else 1

    @property
    def num_rows(self) -> int:
        return self.offsets.numel()

    @property
    def num_tiles(self) -> int:
        return self.bitmaps.shape[0]

    @property
    def nbytes(self) -> int:
        """Every stored byte: bitmaps + values (with padding) + offsets + the shape (int64 per dimension)."""
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
        return _popcount(self.bitmaps)

    def to_dense(self) -> torch.Tensor:
        return decompress(self)

    def to(self, dtype: torch.dtype) -> BitmapTensor:
        """The same pattern with the values cast to ``dtype`` (a value that rounds to 0 stays stored)."""
        return BitmapTensor(self.bitmaps, self.values.to(dtype), self.offsets, self.shape, self.pad)

    @staticmethod
    def cat(parts: list[BitmapTensor]) -> BitmapTensor:
        """Concatenation along dim 0 (equal trailing shapes and pad): bitmaps and values are appended, offsets shifted."""
        parts = [p for p in parts if p.shape[0] > 0] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        if len({(p.shape[1:], p.pad) for p in parts}) != 1:
            raise ValueError(f"trailing shapes or pads differ: {[(p.shape, p.pad) for p in parts]}")
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + p.values.numel())
        if starts[-1] >= 2**31:
            raise OverflowError("more than 2**31 stored values: the int32 row offsets would overflow")
        offsets = torch.cat([p.offsets + start for p, start in zip(parts, starts[:-1], strict=True)])
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        bitmaps, values = torch.cat([p.bitmaps for p in parts]), torch.cat([p.values for p in parts])
        return BitmapTensor(bitmaps, values, offsets, shape, parts[0].pad)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, ⌈D/64⌉·64]``, zero-padded at the end of each row."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    full = tiles_per_row(width) * TILE
    return F.pad(rows, (0, full - width)) if full != width else rows


def compress(x: torch.Tensor, pad: int = 1) -> BitmapTensor:
    """Bitmap-format copy of ``x`` (its exact zeros are not stored; -0.0 comes back as +0.0)."""
    if x.dim() == 0:
        raise ValueError("compress needs at least one dimension")
    if pad < 1:
        raise ValueError(f"pad must be ≥ 1, got {pad}")
    rows = _rows(x)
    mask = rows != 0
    if pad == 1:  # row-major order of the non-zeros is already the packed order
        counts = mask.sum(-1)
        values = rows[mask]
    else:
        tiles, tile_mask = rows.reshape(-1, TILE), mask.reshape(-1, TILE)
        padded = (tile_mask.sum(-1) + pad - 1) // pad * pad
        ends = padded.cumsum(0)
        values = tiles.new_zeros(int(ends[-1]) if ends.numel() else 0)
        slot = (ends - padded).unsqueeze(-1) + tile_mask.cumsum(-1) - 1  # position of each non-zero in ``values``
        values[slot[tile_mask]] = tiles[tile_mask]
        counts = padded.view(rows.shape[0], tiles_per_row(x.shape[-1])).sum(-1)
    if values.numel() >= 2**31:
        raise OverflowError("more than 2**31 stored values: the int32 row offsets would overflow")
    offsets = (counts.cumsum(0) - counts).to(torch.int32)
    return BitmapTensor(_pack_bits(mask.reshape(-1, TILE)), values, offsets, tuple(x.shape), pad)


def decompress(packed: BitmapTensor) -> torch.Tensor:
    """The dense tensor back from the bitmap format (exact inverse of ``compress``)."""
    bits = _unpack_bits(packed.bitmaps)  # [tiles, 64] uint8 0/1
    width = packed.width
    if packed.pad == 1:
        rows = packed.values.new_zeros(bits.shape[0], TILE)
        rows.masked_scatter_(bits.bool(), packed.values)
    else:
        counts = bits.sum(-1)
        padded = (counts + packed.pad - 1) // packed.pad * packed.pad
        starts = padded.cumsum(0) - padded  # tile starts, measured from the start of ``values``
        slot = bits.cumsum(-1)  # 1-based rank of each non-zero inside its tile
        slot += starts.unsqueeze(-1)
        slot.mul_(bits)  # zeros point at the sentinel 0 prepended below
        rows = torch.cat([packed.values.new_zeros(1), packed.values]).take(slot)
    rows = rows.view(-1, tiles_per_row(width) * TILE)[:, :width]
    return rows.reshape(packed.shape)


def check_layout(packed: BitmapTensor) -> None:
    """Raise ``ValueError`` naming the part whose dtype or shape does not fit ``packed.shape`` (O(1)): bitmaps
    ``[rows · ⌈D/64⌉, 8]`` uint8, offsets ``[rows]`` int32, values a 1-D float tensor, ``pad`` ≥ 1, one device."""
    rows = math.prod(packed.shape[:-1]) if len(packed.shape) > 1 else 1
    tiles = rows * tiles_per_row(packed.width)
    bitmaps, values, offsets = packed.bitmaps, packed.values, packed.offsets
    if tuple(bitmaps.shape) != (tiles, BITMAP_BYTES) or bitmaps.dtype != torch.uint8:
        raise ValueError(
            f"bitmaps are {tuple(bitmaps.shape)} {bitmaps.dtype}, expected ({tiles}, {BITMAP_BYTES}) torch.uint8 "
            f"for shape {tuple(packed.shape)}"
        )
    if tuple(offsets.shape) != (rows,) or offsets.dtype != torch.int32:
        raise ValueError(
            f"offsets are {tuple(offsets.shape)} {offsets.dtype}, expected ({rows},) torch.int32: one per row"
        )
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values are {tuple(values.shape)} {values.dtype}, expected a 1-D floating-point tensor")
    if packed.pad < 1:
        raise ValueError(f"pad must be ≥ 1, got {packed.pad}")
    if len({bitmaps.device, values.device, offsets.device}) > 1:
        raise ValueError(f"bitmaps, values and offsets are on {bitmaps.device}, {values.device}, {offsets.device}")


def check_consistent(packed: BitmapTensor) -> None:
    """Raise ``ValueError`` naming the first inconsistency between the parts of ``packed`` (what a truncated or
    edited file, or a hand-made tensor, breaks): ``check_layout``, then offsets starting at 0 and monotone, as
    many values as the bitmaps mark (popcounts, each tile padded to ``pad``), each row starting where the values
    of the rows before it end, and no bit set beyond the last column. O(tiles); what the kernel relies on."""
    check_layout(packed)
    rows, width = packed.num_rows, packed.width
    offsets = packed.offsets.long()
    if rows and int(offsets[0]) != 0:
        raise ValueError(f"the row offsets must start at 0, but offsets[0] = {int(offsets[0])}")
    falls = (offsets.diff() < 0).nonzero()
    if falls.numel():
        r = int(falls[0])
        raise ValueError(
            f"the row offsets are not monotone: offsets[{r}] = {int(offsets[r])} > offsets[{r + 1}] = {int(offsets[r + 1])}"
        )
    counts = packed.nonzero_counts()
    if packed.pad > 1:
        counts = (counts + packed.pad - 1) // packed.pad * packed.pad
    per_row = counts.view(rows, tiles_per_row(width)).sum(-1)
    if int(per_row.sum()) != packed.values.numel():
        raise ValueError(f"the bitmaps mark {int(per_row.sum())} stored values but {packed.values.numel()} are present")
    starts = per_row.cumsum(0) - per_row
    wrong = (offsets != starts).nonzero()
    if wrong.numel():
        r = int(wrong[0])
        raise ValueError(
            f"the row offsets do not match the bitmaps: offsets[{r}] = {int(offsets[r])}, but the bitmaps of the "
            f"rows before it mark {int(starts[r])} values"
        )
    if width % TILE and rows:
        last = _unpack_bits(packed.bitmaps.view(rows, -1, BITMAP_BYTES)[:, -1])  # the last tile of every row
        if bool(last[:, width % TILE :].any()):
            raise ValueError(f"bits are set beyond the last column ({width})")
