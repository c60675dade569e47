"""Pruning a checkpoint larger than memory: one decoder layer resident at a time.

The model is built on the ``meta`` device (accelerate's ``init_empty_weights``); only the modules outside
the decoder layers (embeddings, final norm, head) are loaded. ``LayerStore.resident(i)`` reads layer ``i``
from the checkpoint's safetensors (the file is opened for that layer only, so its pages do not pile up
in memory), and afterwards either drops it again or, once pruned, writes it as its own safetensors shard
into the output directory (in the compute ``dtype``). Peak memory ≈ the non-layer weights + one layer + its calibration statistics
+ the activations of the calibration windows. The ``auto`` λ/M search writes each candidate's layers into a
directory of its own (``candidate``), scores it with the model streamed layer by layer (``streamed``) and keeps the
best one's shards (``adopt``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .architectures import decoder_layers, get_arch_spec, layer_projections

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_map(checkpoint: str | Path) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of a local checkpoint (single file or sharded with an index)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / INDEX_FILE).is_file():
        return json.loads((checkpoint / INDEX_FILE).read_text())["weight_map"]
    if (checkpoint / SINGLE_FILE).is_file():
        with safe_open(checkpoint / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise FileNotFoundError(
        f"offloaded pruning reads safetensors weights: no {SINGLE_FILE} or {INDEX_FILE} in {checkpoint}"
    )


def read_tensors(checkpoint: Path, names: list[str], mapping: dict[str, str], dtype) -> dict[str, torch.Tensor]:
    """The named tensors, each file opened once and closed again (its memory map released)."""
    by_file = defaultdict(list)
    for name in names:
        by_file[mapping[name]].append(name)
    out = {}
    for file, keys in by_file.items():
        with safe_open(checkpoint / file, framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                out[key] = t.to(dtype) if t.is_floating_point() else t
    return out


def load_skeleton(checkpoint: str | Path, dtype=torch.float32):
    """The model with its decoder layers on ``meta`` and everything else loaded."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    spec = get_arch_spec(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    mapping = weight_map(checkpoint)
    outside = [n for n in mapping if not n.startswith(f"{spec.layers}.")]
    for name, tensor in read_tensors(checkpoint, outside, mapping, dtype).items():
        set_module_tensor_to_device(model, name, "cpu", value=tensor)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(f"{spec.layers}.")]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights outside the decoder layers: {missing[:5]}")
    return model.eval()


def _stored(tensor: torch.Tensor, dtype) -> torch.Tensor:
    """A tensor as the checkpoint stores it: on the CPU, floating point in ``dtype``."""
    tensor = tensor.detach().to("cpu")
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS creeps up layer by layer)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class LayerStore:
    """Where each decoder layer's weights live while a model is pruned offloaded."""

    def __init__(self, model, checkpoint: str | Path, dtype=torch.float32):
        self.model = model
        self.spec = get_arch_spec(model)
        self.checkpoint = Path(checkpoint)
        self.mapping = weight_map(self.checkpoint)
        self.dtype = dtype
        self.output: Path | None = None  # staging directory of the result, set by the pruner
        self.written: dict[int, str] = {}  # layer → shard file name in ``output``
        self.counts: dict = {}  # (layer, projection) → (zeros, numel), filled by the pruner
        self.zeros: dict[str, int] = {}  # module name → exact zeros, as written (for the sidecar)
        self.candidates: dict[str, tuple] = {}  # λ/M search: candidate → (written, counts, zeros)
        self.in_candidate = False

    def _names(self, idx: int) -> list[str]:
        prefix = f"{self.spec.layers}.{idx}."
        return [n for n in self.mapping if n.startswith(prefix)]

    def _load(self, idx: int, device, dtype=torch.float32):
        """Layer ``idx`` with its weights (as last written, else from the checkpoint) on ``device`` in ``dtype``
        (float32 while it is pruned, whatever the checkpoint's dtype; written back in ``self.dtype``)."""
        layer = decoder_layers(self.model, self.spec)[idx]
        prefix = f"{self.spec.layers}.{idx}."
        if idx in self.written:
            source, mapping = self.output, {n: self.written[idx] for n in self._names(idx)}
        else:
            source, mapping = self.checkpoint, self.mapping
        tensors = read_tensors(source, self._names(idx), mapping, dtype)
        layer.load_state_dict({n.removeprefix(prefix): t.to(device) for n, t in tensors.items()}, assign=True)
        return layer

    @contextlib.contextmanager
    def streamed(self, device):
        """The whole model callable for the block: each decoder layer is loaded just before it runs and dropped
        after (e.g. ``mean_nll`` of a candidate prune)."""
        handles = []
        for idx, layer in enumerate(decoder_layers(self.model, self.spec)):
            handles.append(
                layer.register_forward_pre_hook(lambda m, a, i=idx: self._load(i, device, self.dtype) and None)
            )
            handles.append(layer.register_forward_hook(lambda m, a, out: m.to("meta") and None))
        try:
            yield self.model
        finally:
            for handle in handles:
                handle.remove()
            _release_freed_memory()

    @contextlib.contextmanager
    def candidate(self, name: str):
        """Write the layers pruned in the block into ``output/name`` (a candidate of the λ/M search), leaving the
        result's own record as it was; ``adopt(name)`` makes a candidate the result, ``discard`` drops one."""
        saved = (self.output, self.written, self.counts, self.zeros)
        self.output, self.written, self.counts, self.zeros = saved[0] / name, {}, {}, {}
        self.output.mkdir()
        self.in_candidate = True
        try:
            yield
        finally:
            self.candidates[name] = (self.written, self.counts, self.zeros)
            self.output, self.written, self.counts, self.zeros = saved
            self.in_candidate = False

    def adopt(self, name: str) -> None:
        """The candidate's layer shards become the result's (moved into the output directory)."""
        written, counts, zeros = self.candidates.pop(name)
        for file in set(written.values()):
            (self.output / name / file).replace(self.output / file)
        self.written, self.counts, self.zeros = dict(written), dict(counts), dict(zeros)
        self.discard(name)

    def discard(self, name: str) -> None:
        import shutil

        self.candidates.pop(name, None)
        shutil.rmtree(self.output / name, ignore_errors=True)

    @contextlib.contextmanager
    def resident(self, idx: int, device, write: bool = False):
        """Layer ``idx`` loaded on ``device`` for the block; written to the output if ``write``; then dropped."""
        prefix = f"{self.spec.layers}.{idx}."
        layer = self._load(idx, device)
        try:
            yield layer
            if write:
                self._write(idx, layer, prefix)
        finally:
            layer.to("meta")
            _release_freed_memory()

    def _write(self, idx: int, layer, prefix: str) -> None:
        if self.output is None:
            raise RuntimeError("LayerStore.output is not set: offloaded pruning writes into a save directory")
        state = {f"{prefix}{k}": _stored(v, self.dtype) for k, v in layer.state_dict().items()}
        for key in layer_projections(layer, self.spec):  # counted as stored (after the rounding to ``dtype``)
            name = f"{prefix}{self.spec.projections[key]}"
            self.zeros[name] = int((state[f"{name}.weight"] == 0).sum())
        name = f"layer-{idx:05d}.safetensors"
        save_file(state, str(self.output / name), metadata={"format": "pt"})
        self.written[idx] = name

    def save(self, directory: Path) -> None:
        """Finish the checkpoint in ``directory`` (the staging directory): copy the layers never written,
        write the non-layer weights and the index."""
        n_layers = len(decoder_layers(self.model, self.spec))
        for idx in range(n_layers):
            if idx not in self.written:
                with self.resident(idx, "cpu", write=True):
                    pass
        outside = {
            n: p.detach().contiguous()
            for n, p in self.model.state_dict().items()
            if not n.startswith(f"{self.spec.layers}.") and n in self.mapping
        }
        save_file(outside, str(directory / "model-outside-layers.safetensors"), metadata={"format": "pt"})
        mapping = dict.fromkeys(outside, "model-outside-layers.safetensors")
        for idx, file in self.written.items():
            mapping.update(dict.fromkeys(self._names(idx), file))
        total = sum(p.numel() * p.element_size() for p in outside.values())
        total += sum((directory / f).stat().st_size for f in set(self.written.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def prune_offloaded(pruner, config, calibration_dataset, save_directory, batch_size, overwrite: bool = False):
    """``Pruner.prune`` with one layer resident: the result is written straight into ``save_directory``
    (atomically: a staging directory renamed at the end). Returns the model skeleton (layers on ``meta``)."""
    from .calibration.distributed import world
    from .registry import get_method
    from .serialization import checkpoint_directory, save_offloaded

    unsupported = {
        "save_directory is required (the pruned layers are written there)": save_directory is None,
        "sensitivity_hutchinson differentiates through the whole model": "loss_hessian"
        in get_method("allocation", config.allocation).needs,
        "one process only (several processes would write the same shards)": world()[1] > 1,
    }
    problems = [reason for reason, bad in unsupported.items() if bad]
    if problems:
        raise ValueError("offloaded pruning: " + "; ".join(problems))
    store = pruner.store
    with checkpoint_directory(save_directory, overwrite) as staging:
        store.output = staging
        pruner._run(config, calibration_dataset, batch_size)
        save_offloaded(store, pruner.model, pruner.tokenizer, staging, Path(save_directory), config, pruner.report)
    store.output = Path(save_directory)
    return pruner.model
