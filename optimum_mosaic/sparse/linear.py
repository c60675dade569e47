"""``SparseLinear``: an ``nn.Linear`` whose weight lives in the bitmap format and runs on the sparse CPU kernel, and
``to_sparse_kernel``, which swaps the pruned projections of a model for it."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .format import BitmapTensor, check_consistent, compress, decompress, tiles_per_row
from .kernel import resolve_path, sparse_linear

# The sparsity from which a projection is swapped (``to_sparse_kernel``). benchmarks/sparse_kernel.py (weights
# streamed from memory, as in decoding; 1 thread, Zen 4): from 40 % every SmolLM2 shape ran ≥ 1.3× faster than
# dense fp32; at 30 % the 576×1536 down projection only broke even.
MIN_SPARSITY = 0.4
_PARTS = ("bitmaps", "values", "offsets")


class SparseLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` (``y = x Wᵀ + b``) holding ``W`` only in the bitmap format:
    buffers ``weight_bitmaps`` (uint8), ``weight_values`` (fp32, or bf16 with ``values_dtype``) and
    ``weight_offsets`` (int32), no dense copy. ``x`` of any float dtype is computed in fp32 (results equal to
    the dense layer up to summation order) and returned in its dtype. ``path`` forces a kernel path
    (see ``optimum_mosaic.sparse.kernel``); ``weight`` decompresses on each access (for inspection only).
    The parts are checked whenever they are set (``load_packed``, ``load_state_dict``: ``format.check_consistent``).
    Inference only: there is no backward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype: torch.dtype | None = None,
        values_dtype: torch.dtype = torch.float32,
        path: str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.path = in_features, out_features, path
        tiles = out_features * tiles_per_row(in_features)
        self.register_buffer("weight_bitmaps", torch.zeros(tiles, 8, dtype=torch.uint8, device=device))
        self.register_buffer("weight_values", torch.zeros(0, dtype=values_dtype, device=device))
        self.register_buffer("weight_offsets", torch.zeros(out_features, dtype=torch.int32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, values_dtype: torch.dtype | None = None, path: str | None = None):
        """The same layer with its weight compressed (``values_dtype`` default: fp32, or bf16 for a bf16 layer)."""
        weight = linear.weight.detach()
        if values_dtype is None:
            values_dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, path=path)
        module.load_packed(compress(weight.to(values_dtype)))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def load_packed(self, packed: BitmapTensor) -> None:
        """Hold ``packed`` (``[out_features, in_features]``, ``pad`` 1) as the weight. Its parts are checked first
        (``format.check_consistent``): a ``ValueError`` names what is inconsistent, and the layer keeps its weight."""
        if tuple(packed.shape) != (self.out_features, self.in_features) or packed.pad != 1:
            raise ValueError(f"a [{self.out_features}, {self.in_features}] weight with pad 1 expected, got {packed}")
        check_consistent(packed)
        self.weight_bitmaps, self.weight_values, self.weight_offsets = packed.bitmaps, packed.values, packed.offsets

    @property
    def packed(self) -> BitmapTensor:
        shape = (self.out_features, self.in_features)
        return BitmapTensor(self.weight_bitmaps, self.weight_values, self.weight_offsets, shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, decompressed now (not kept)."""
        return decompress(self.packed)

    @property
    def nnz(self) -> int:
        return self.weight_values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.in_features * self.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight (bitmaps, values, offsets; the bias and shape not included)."""
        return sum(t.numel() * t.element_size() for t in (self.weight_bitmaps, self.weight_values, self.weight_offsets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.packed, self.bias, self.path)

    def extra_repr(self) -> str:
        values = str(self.weight_values.dtype).removeprefix("torch.")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={self.sparsity:.3f}, values={values}, nbytes={self.nbytes}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """The usual copy, after adopting the incoming sizes (the value count differs between checkpoints). The parts
        then held must pass ``format.check_consistent``; if not, the error is reported (``load_state_dict`` raises
        it, naming what is inconsistent) and the previous parts are put back: a refused load changes nothing."""
        device = self.weight_offsets.device
        incoming = [part for part in _PARTS if f"{prefix}weight_{part}" in state_dict]
        previous = {part: getattr(self, f"weight_{part}") for part in incoming}
        for part in incoming:
            setattr(self, f"weight_{part}", torch.empty_like(state_dict[f"{prefix}weight_{part}"], device=device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if not incoming:
            return
        try:
            check_consistent(self.packed)
        except ValueError as err:
            errors.append(f"{prefix}weight_*: {err}")
            for part, tensor in previous.items():
                setattr(self, f"weight_{part}", tensor)


def to_sparse_kernel(
    model: nn.Module,
    min_sparsity: float = MIN_SPARSITY,
    values_dtype: torch.dtype | None = None,
    path: str | None = None,
) -> nn.Module:
    """Swap every decoder projection (``nn.Linear``) with at least ``min_sparsity`` exact zeros for a
    ``SparseLinear`` (in place; returns ``model``). ``values_dtype``: fp32 (default; bf16 for a bf16 model) or
    ``torch.bfloat16`` (half the value bytes; weights rounded to bf16). CPU, unquantized models only; the
    embeddings, ``lm_head``, norms, KV cache and generation code are untouched. Records what was swapped in
    ``model.mosaic_sparse_kernel``."""
    from ..architectures import named_projections

    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise ValueError("to_sparse_kernel needs unquantized weights; load without quantization_config")
    if values_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"values_dtype must be torch.float32 or torch.bfloat16, got {values_dtype}")
    resolved = resolve_path(path)  # fails early on an unknown or unavailable path
    if resolved in ("scalar", "torch"):
        warnings.warn(
            f"the sparse kernel runs its {resolved!r} path here, slower than dense fp32: the swap saves memory only",
            stacklevel=2,
        )
    swapped, kept = [], []
    for name, module in named_projections(model).items():
        if type(module) is not nn.Linear:
            kept.append(name) if not isinstance(module, SparseLinear) else swapped.append(name)
            continue
        if module.weight.device.type != "cpu":
            raise ValueError(f"{name} is on {module.weight.device}: the sparse kernel runs on CPU; call model.cpu()")
        sparsity = (module.weight == 0).sum().item() / module.weight.numel()
        if sparsity < min_sparsity:
            kept.append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SparseLinear.from_linear(module, values_dtype, path))
        swapped.append(name)
    model.mosaic_sparse_kernel = {"path": resolved, "min_sparsity": min_sparsity, "swapped": swapped, "dense": kept}
    return model
