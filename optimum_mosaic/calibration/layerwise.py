"""Walk the decoder layers one at a time over cached calibration activations.

1. ``capture``: run the base model once per batch with every decoder layer replaced by a recorder that
   returns its input unchanged; this yields the inputs of layer 0 and the keyword arguments each layer
   receives (attention mask, rotary embeddings, …), generically across architectures, without paying
   for any layer.
2. ``forward``: run one layer over all cached inputs (optionally with hooks that accumulate
   ``InputStatistics``), moving only that layer to the execution device.
3. ``forward_pruning``: run one layer over all cached inputs and, just before each hooked linear runs, hand
   its whole input to a callback that prunes it — every projection sees the outputs of the already-pruned
   projections before it. With every window in one batch that is one forward per layer; in several batches
   each input group costs a forward that stops where that input is reached (activation memory: one batch).

Statistics are all-reduced across processes (``distributed.py``) before anything uses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import ArchSpec, decoder_layers, get_submodule
from .distributed import all_reduce_statistics
from .statistics import InputStatistics


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records (hidden_states, kwargs), passes them on."""

    def __init__(self, layer: nn.Module, sink: list):
        super().__init__()
        self.sink = sink
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to get everything but hidden_states by keyword")
        self.sink.append((hidden_states, kwargs))
        return hidden_states


@dataclass
class Activations:
    """Inputs of the current layer for every calibration window, and each layer's keyword arguments."""

    hidden: torch.Tensor  # [nsamples, seqlen, d]
    layer_kwargs: list[dict]
    batch_size: int

    def clone(self) -> Activations:
        return Activations(self.hidden.clone(), self.layer_kwargs, self.batch_size)

    def batches(self):
        for i in range(0, self.hidden.shape[0], self.batch_size):
            yield slice(i, i + self.batch_size)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, compute: bool = False):
    """Move ``module`` to ``device`` for the duration of the block, then back where it was. ``compute``: also in
    float32 while there (a bf16/fp16 decoder layer runs, is measured and is solved in fp32 and is rounded to its
    dtype once, on the way back: bf16 matmuls ran 59× slower than fp32 on an AVX2 CPU — though 0.12× fp32's time on
    one with AMX, where this is the precise choice rather than the fast one; ``benchmarks/results/dtype_matmul.json``)."""
    param = next(module.parameters(), None)
    home = param.device if param is not None else device
    dtype = param.dtype if param is not None else torch.float32
    module.to(device, torch.float32) if compute and dtype in LOW_PRECISION else module.to(device)
    try:
        yield module
    finally:
        module.to(home, dtype) if compute and dtype in LOW_PRECISION else module.to(home)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def to_compute(value):
    """Floating tensors in ``value`` (nested tuples/lists/dicts) as float32: a layer's inputs during the walk."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_compute(v) for v in value)
    if isinstance(value, dict):
        return {k: to_compute(v) for k, v in value.items()}
    return value


@torch.inference_mode()
def capture(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, device, batch_size: int) -> Activations:
    """Inputs of decoder layer 0 for all ``windows`` ([n, seqlen] token ids) plus per-layer kwargs."""
    if windows.shape[0] % batch_size:
        batch_size = _largest_divisor(windows.shape[0], batch_size)
    decoder = get_submodule(model, spec.decoder)
    layers = decoder_layers(model, spec)
    originals = list(layers)
    hidden, layer_kwargs = [], None
    others = [m for name, m in decoder.named_children() if m is not layers]
    with contextlib.ExitStack() as stack:
        for m in others:
            stack.enter_context(on_device(m, device))
        for i in range(0, windows.shape[0], batch_size):
            sinks = [[] for _ in originals]
            for j, layer in enumerate(originals):
                layers[j] = _Recorder(layer, sinks[j])
            try:
                decoder(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            finally:
                for j, layer in enumerate(originals):
                    layers[j] = layer
            hidden.append(to_compute(sinks[0][0][0]))
            if layer_kwargs is None:
                layer_kwargs = [to_compute(sink[0][1]) for sink in sinks]
    return Activations(torch.cat(hidden), layer_kwargs, batch_size)


FORWARD_BYTES = 1 << 30  # windows per forward when none is asked for: one fp32 output of the widest linear ≤ 1 GiB


def windows_per_forward(layer: nn.Module, windows: int, seqlen: int) -> int:
    """How many windows one forward of ``layer`` takes when the caller does not say: as many as keep one fp32 output
    of its widest linear within ``FORWARD_BYTES`` (all 32 × 512 windows at 135M–270M; 9 × 2048 tokens at Llama-3-8B's
    14336-wide MLP, where all 128 windows would need 15 GiB per MLP activation). Results do not depend on it."""
    width = max(m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
    return max(1, min(windows, FORWARD_BYTES // (4 * seqlen * width)))


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


@torch.inference_mode()
def forward_layer(layer: nn.Module, acts: Activations, index: int, outputs: str = "new") -> torch.Tensor | None:
    """Outputs of ``layer`` for every cached input (the next layer's inputs). ``outputs``: ``"new"`` in a new tensor;
    ``"in_place"`` over the inputs, batch by batch (for callers that replace ``acts.hidden`` with them: one copy of
    every window's activations instead of two — 4 GiB at 128 × 2048 tokens of a 4096-wide model); ``"none"``: not
    kept (a forward run for its hooks)."""
    if outputs not in ("new", "in_place", "none"):
        raise ValueError(f"outputs must be 'new', 'in_place' or 'none', got {outputs!r}")
    out = torch.empty_like(acts.hidden) if outputs == "new" else acts.hidden if outputs == "in_place" else None
    for b in acts.batches():
        y = layer(acts.hidden[b], **acts.layer_kwargs[index])
        if out is not None:
            out[b] = y[0] if isinstance(y, tuple) else y
    return out


def _accumulators(
    inputs: dict[str, nn.Linear], hessian: bool | Collection[str], cross: Collection[str] = ()
) -> dict[str, InputStatistics]:
    """Empty float64 sums per input; ``hessian``: for all of them, or for the names it lists; ``cross``: the names
    that also keep ``X_dᵀX`` (dense inputs given)."""
    wants = (lambda name: hessian) if isinstance(hessian, bool) else (lambda name: name in hessian)
    return {
        name: InputStatistics.empty(lin.in_features, wants(name), lin.weight.device, torch.float64, name in cross)
        for name, lin in inputs.items()
    }


@torch.inference_mode()
def dense_inputs(layer: nn.Module, acts: Activations, index: int, inputs: dict[str, nn.Linear]):
    """The dense model's stream through ``layer`` (not yet pruned): the input of each given linear for every window
    ([n, seqlen, d], what ``forward_pruning(dense=…)`` pairs with the pruned inputs), and the layer's outputs (the
    stream's next inputs, written over ``acts.hidden``)."""
    seen: dict[str, list] = {name: [] for name in inputs}
    handles = [
        lin.register_forward_pre_hook(lambda mod, args, sink=seen[name]: sink.append(args[0].detach().clone()))
        for name, lin in inputs.items()
    ]
    try:
        forward_layer(layer, acts, index, "in_place")
    finally:
        for h in handles:
            h.remove()
    n, seqlen = acts.hidden.shape[:2]
    return {name: torch.cat(parts).reshape(n, seqlen, -1) for name, parts in seen.items()}


@torch.inference_mode()
def collect_statistics(
    layer: nn.Module,
    acts: Activations,
    index: int,
    inputs: dict[str, nn.Linear],
    hessian: bool | Collection[str],
    outputs: str = "new",
) -> tuple[dict[str, InputStatistics], torch.Tensor | None]:
    """One hooked forward of ``layer``: statistics of each given linear's input, and the layer outputs (as
    ``forward_layer``'s ``outputs`` says)."""
    stats, seqlen = _accumulators(inputs, hessian), acts.hidden.shape[1]
    handles = [
        lin.register_forward_hook(lambda mod, args, out, s=stats[name]: s.update(args[0], seqlen))
        for name, lin in inputs.items()
    ]
    try:
        out = forward_layer(layer, acts, index, outputs)
    finally:
        for h in handles:
            h.remove()
    # the same order on every process (callers may build ``inputs`` from a set, whose order is per-process)
    return {name: all_reduce_statistics(stats[name]).finalize() for name in sorted(stats)}, out


@dataclass(frozen=True)
class Halves:
    """A decoder layer as two residual halves: ``attention`` (the module) and the MLP half, which starts at
    ``mlp_norm``'s input h₁ = x + attention's (post-normed) output. Run from h₁ with ``attention`` returning
    zeros, the layer computes h₁ + 0 = h₁ and then exactly its MLP half."""

    attention: nn.Module
    mlp_norm: nn.Module

    def holds(self, lin) -> bool:
        """Whether projection ``lin`` (a ``RowSlice`` is held where its fused module is) is in the attention."""
        module = getattr(lin, "fused", lin)
        return any(m is module for m in self.attention.modules())


def layer_halves(layer: nn.Module, spec: ArchSpec) -> Halves | None:
    """``layer``'s two residual halves, or ``None`` where its family is not built of them (``spec.mlp_norm``)."""
    if not spec.mlp_norm:
        return None
    return Halves(layer.get_submodule(spec.attention), layer.get_submodule(spec.mlp_norm))


@torch.inference_mode()
def forward_pruning(
    layer: nn.Module,
    acts: Activations,
    index: int,
    inputs: dict[str, nn.Linear],
    hessian: bool,
    prune: Callable[[str, InputStatistics], None],
    halves: Halves | None = None,
    dense: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Outputs of ``layer`` over every cached input, calling ``prune(name, stats)`` with the statistics of each
    given linear's whole input just before that linear runs (so it runs pruned). All windows in one batch: one
    forward, pruning from pre-hooks. In batches: per input, in the order the layer reaches them, a forward of
    each batch that stops at that input (``_reach``), then one forward for the outputs — the same statistics
    (they are summed window by window) with the activations of one batch; the outputs overwrite ``acts.hidden``.
    With ``halves``, once the attention's projections are pruned each window's input is replaced by h₁ (one forward
    of the attention half) and every later forward skips the attention, which was recomputed for ``gate``/``up``,
    ``down`` and the outputs (forward stage 1704 → 1288 s per Llama-3-8B layer at 128 × 2048 tokens,
    ``benchmarks/results/scale_llama3-8b.json``). Same bits either way. ``dense``: the dense model's inputs of the
    given linears (``dense_inputs``), paired window by window with the pruned ones in each one's ``cross``."""
    dense = dense or {}
    if acts.batch_size >= acts.hidden.shape[0]:
        return _forward_pruning_at_once(layer, acts, index, inputs, hessian, prune, dense)
    pending, in_mlp_half = dict(inputs), False
    attention_inputs = {name for name, lin in inputs.items() if halves is not None and halves.holds(lin)}
    while pending:
        if halves is not None and not in_mlp_half and not attention_inputs & pending.keys():
            _enter_mlp_half(layer, acts, index, halves)
            in_mlp_half = True
        with _zero_attention(halves) if in_mlp_half else contextlib.nullcontext():
            name, stats = _reach(layer, acts, index, pending, hessian, dense)
        prune(name, all_reduce_statistics(stats).finalize())
        del pending[name]
    with _zero_attention(halves) if in_mlp_half else contextlib.nullcontext():
        return forward_layer(layer, acts, index, "in_place")


def _enter_mlp_half(layer: nn.Module, acts: Activations, index: int, halves: Halves) -> None:
    """``acts.hidden`` ← h₁, batch by batch: each forward stops at ``halves.mlp_norm``'s input."""

    def hook(mod, args):
        reached.append(args[0])
        raise _Reached

    handle = halves.mlp_norm.register_forward_pre_hook(hook)
    try:
        for b in acts.batches():
            reached: list[torch.Tensor] = []
            with contextlib.suppress(_Reached):
                layer(acts.hidden[b], **acts.layer_kwargs[index])
            if not reached:
                raise RuntimeError(f"layer {index} never ran its MLP norm {halves.mlp_norm}")
            acts.hidden[b] = reached[0]
    finally:
        handle.remove()


@contextlib.contextmanager
def _zero_attention(halves: Halves):
    """``halves.attention`` returns zeros (and ``None`` for its attention weights) instead of running."""
    attention = halves.attention
    own = attention.__dict__.get("forward")  # an instance-level forward (accelerate's hooks) to put back

    def zeros(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return torch.zeros_like(hidden), None

    attention.forward = zeros
    try:
        yield
    finally:
        if own is None:
            del attention.forward
        else:
            attention.forward = own


def _forward_pruning_at_once(layer, acts, index, inputs, hessian, prune, dense) -> torch.Tensor:
    def before(name: str):
        def hook(mod, args):
            stats = _accumulators({name: mod}, hessian, dense)[name]
            stats.update(args[0], acts.hidden.shape[1], dense.get(name))
            prune(name, all_reduce_statistics(stats).finalize())

        return hook

    handles = [lin.register_forward_pre_hook(before(name)) for name, lin in inputs.items()]
    try:
        y = layer(acts.hidden, **acts.layer_kwargs[index])
    finally:
        for h in handles:
            h.remove()
    return y[0] if isinstance(y, tuple) else y


class _Reached(Exception):
    """Ends a partial forward: the input it was run for has been seen."""


def _reach(layer, acts, index, pending: dict[str, nn.Linear], hessian: bool, dense) -> tuple[str, InputStatistics]:
    """The first of ``pending``'s linears that ``layer`` runs, with the statistics of its input over every batch
    (each batch's forward is stopped there)."""
    seen: dict = {}

    def before(name: str):
        def hook(mod, args):
            if "name" not in seen:
                seen.update(name=name, stats=_accumulators({name: mod}, hessian, dense)[name])
            elif seen["name"] != name:
                raise RuntimeError(f"layer {index} ran {name} before {seen['name']} in a later batch")
            paired = dense[name][seen["batch"]] if name in dense else None
            seen["stats"].update(args[0], acts.hidden.shape[1], paired)
            raise _Reached

        return hook

    handles = [lin.register_forward_pre_hook(before(name)) for name, lin in pending.items()]
    try:
        for b in acts.batches():
            seen["batch"] = b
            try:
                layer(acts.hidden[b], **acts.layer_kwargs[index])
            except _Reached:
                continue
            raise RuntimeError(f"layer {index} ran none of {sorted(pending)}")
    finally:
        for h in handles:
            h.remove()
    return seen["name"], seen["stats"]
