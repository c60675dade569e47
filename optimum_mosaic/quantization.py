"""bitsandbytes 8-bit / 4-bit on top of a pruned checkpoint, and what survives of its sparsity.

Pruning metadata never goes into ``quantization_config``: a transformers model has one such slot, and it
stays free for ``BitsAndBytesConfig``. The checkpoint is an ordinary (possibly shape-reduced) model, so
``PrunedModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(...))`` quantizes it
while loading. The masks are taken from the checkpoint's full-precision weights (``W ≠ 0``), never from
the quantized model: rounding also maps small kept weights to 0. After loading, every quantized projection
is de-quantized once, Ŵ = deq(Q(W)), and compared with its mask:

    pruned zeros kept = #{W = 0 ∧ Ŵ = 0} / #{W = 0}      (1.0: 0 is in the NF4/FP4 codebooks, int8 maps 0 → 0)
    extra zeros       = #{W ≠ 0 ∧ Ŵ = 0}                 (kept weights rounded to zero)
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .notices import silence_bnb_cpu_notices  # noqa: F401  (re-exported)


@dataclass
class QuantizationReport:
    """How a quantized load treated the pruned weights (counts over the prunable projections)."""

    method: str
    numel: int
    zeros_before: int  # exact zeros in the checkpoint (the pruning masks)
    pruned_zeros_kept: int  # of those, still exactly zero after quantization
    extra_zeros: int  # kept (non-zero) weights that quantization rounded to zero
    memory_footprint_bytes: int  # model.get_memory_footprint() after loading
    per_projection: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / self.numel

    @property
    def sparsity_after(self) -> float:
        return (self.pruned_zeros_kept + self.extra_zeros) / self.numel

    @property
    def masks_intact(self) -> bool:
        return self.pruned_zeros_kept == self.zeros_before

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(sparsity_before=self.sparsity_before, sparsity_after=self.sparsity_after)
        return out


BNB_4BIT_TYPES = ("nf4", "fp4")  # the 4-bit data types bitsandbytes implements


def describe(quantization_config) -> str:
    """``bnb-4bit-nf4``, ``bnb-8bit`` or the config's ``quant_method``."""
    if getattr(quantization_config, "load_in_4bit", False):
        return f"bnb-4bit-{quantization_config.bnb_4bit_quant_type}"
    if getattr(quantization_config, "load_in_8bit", False):
        return "bnb-8bit"
    return str(getattr(quantization_config, "quant_method", type(quantization_config).__name__))


def normalise_quantization_config(quantization_config):
    """A ``BitsAndBytesConfig`` that enables 8-bit or 4-bit, from any form transformers accepts (the object or its
    dict form); anything else is a ``ValueError`` saying what is accepted. Other quantization methods are refused:
    optimum-mosaic can check the pruned zeros through bitsandbytes only."""
    import inspect

    from transformers import BitsAndBytesConfig
    from transformers.utils.quantization_config import QuantizationConfigMixin

    accepted = "a transformers.BitsAndBytesConfig(load_in_8bit=True or load_in_4bit=True), or its dict form"
    if isinstance(quantization_config, dict):
        method = str(quantization_config.get("quant_method", "bitsandbytes"))
        if method != "bitsandbytes":
            raise ValueError(f"quantization_config: quant_method {method!r} is not supported; pass {accepted}")
        known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(quantization_config) - known - {"quant_method"})
        if unknown:
            raise ValueError(f"quantization_config: unknown BitsAndBytesConfig keys {unknown}; known: {sorted(known)}")
        quantization_config = BitsAndBytesConfig(**{k: v for k, v in quantization_config.items() if k in known})
    elif not isinstance(quantization_config, QuantizationConfigMixin):
        raise ValueError(f"quantization_config: expected {accepted}, got {type(quantization_config).__name__}")
    elif not isinstance(quantization_config, BitsAndBytesConfig):
        raise ValueError(
            f"quantization_config: {type(quantization_config).__name__} is not supported (optimum-mosaic checks the "
            f"pruned zeros through bitsandbytes only); pass {accepted}, or load with AutoModelForCausalLM directly"
        )
    if not (quantization_config.load_in_4bit or quantization_config.load_in_8bit):
        raise ValueError(
            "quantization_config: this BitsAndBytesConfig enables nothing; pass load_in_8bit=True or "
            "load_in_4bit=True, or drop quantization_config for the full-precision model"
        )
    kind = quantization_config.bnb_4bit_quant_type
    if quantization_config.load_in_4bit and kind not in BNB_4BIT_TYPES:
        raise ValueError(
            f"quantization_config: bnb_4bit_quant_type {kind!r} is not a bitsandbytes 4-bit type; use one of "
            f"{', '.join(map(repr, BNB_4BIT_TYPES))}"
        )
    return quantization_config


def prepare_quantization_config(quantization_config):
    """Default the 4-bit compute dtype to fp32 on CPU-only machines (bnb's fp16 default is slow there)."""
    if getattr(quantization_config, "load_in_4bit", False) and not torch.cuda.is_available():
        if quantization_config.bnb_4bit_compute_dtype in (None, torch.float16):
            quantization_config.bnb_4bit_compute_dtype = torch.float32
    silence_bnb_cpu_notices()
    return quantization_config


CPU_PACK_BLOCK = 32  # bnb's AVX512-BF16 4-bit CPU kernel repacks weights in blocks of 32 output rows


def guard_cpu_4bit_packing(model) -> int:
    """Keep bnb off its AVX512-BF16 CPU 4-bit path for layers it cannot repack.

    On the first CPU forward, bitsandbytes 0.50 repacks each ``Linear4bit`` weight in blocks of 32 output
    rows and reshapes its scales to ``in_features / blocksize`` per row; it fails (``RuntimeError: shape ...
    is invalid``) unless ``out_features % 32 == 0`` and ``in_features % blocksize == 0``, which shape-reduced
    layers often break. Those layers use bnb's generic 4-bit path instead (same result, slower). Returns how
    many layers were switched.
    """
    switched = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        if module.out_features % CPU_PACK_BLOCK or module.in_features % getattr(module.weight, "blocksize", 64):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def dequantized_weight(linear: torch.nn.Module) -> torch.Tensor:
    """Ŵ in fp32 for ``nn.Linear``, bnb ``Linear4bit`` (NF4/FP4 blocks) and ``Linear8bitLt`` (int8 rows × scale)."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by a CPU forward: undo on a copy
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state).float()
    state = getattr(linear, "state", None)  # Linear8bitLt moves the row scales to .state on its first forward
    scales = getattr(weight, "SCB", None)
    scales = scales if scales is not None else getattr(state, "SCB", None)
    if weight.dtype == torch.int8 and scales is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(weight.data, scales).float()
    return weight.detach().float()


def checkpoint_tensor_reader(path: str | Path):
    """``name → tensor`` read lazily from the checkpoint's safetensors files (one tensor in memory at a time)."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None

    def read(name: str) -> torch.Tensor:
        shard = path / (files[name] if files else "model.safetensors")
        with safe_open(shard, framework="pt") as handle:
            return handle.get_tensor(name)

    return read


@torch.no_grad()
def quantization_report(model, path: str | Path, quantization_config) -> QuantizationReport:
    """Compare every prunable projection of a quantized ``model`` with the checkpoint it was loaded from."""
    from .architectures import named_projections

    read = checkpoint_tensor_reader(path)
    totals = dict(numel=0, zeros_before=0, pruned_zeros_kept=0, extra_zeros=0)
    per_projection = {}
    for name, linear in named_projections(model).items():
        pruned = read(f"{name}.weight") == 0
        zero_now = dequantized_weight(linear).to(pruned.device) == 0
        counts = dict(
            numel=pruned.numel(),
            zeros_before=int(pruned.sum()),
            pruned_zeros_kept=int((pruned & zero_now).sum()),
            extra_zeros=int((~pruned & zero_now).sum()),
        )
        per_projection[name] = counts
        totals = {k: totals[k] + counts[k] for k in totals}
    return QuantizationReport(
        method=describe(quantization_config),
        memory_footprint_bytes=int(model.get_memory_footprint()),
        per_projection=per_projection,
        **totals,
    )
