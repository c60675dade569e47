"""The walk over decoder layers, one resident at a time: the dense profile pass (outlier ratios and structured-removal
options) and the sequential pruning pass — per layer, statistics of its inputs (from the already pruned layers
before it) → structured removal (``structured/``) → unstructured kernel per projection → its outputs for the next
layer. The one place that knows where a layer lives (device, disk when offloaded) and which process solves what."""

from __future__ import annotations

import functools

import psutil
import torch
from tqdm.auto import tqdm

from .allocation.outliers import OutlierProfile, wanda_scores
from .allocation.sensitivity import input_hessian_proxy
from .architectures import ArchSpec, decoder_layers, layer_projections
from .calibration.distributed import (
    ROWS,
    broadcast_object,
    broadcast_tensor,
    residual_energy,
    row_shard,
    split_solves,
    world,
)
from .calibration.layerwise import (
    Activations,
    collect_statistics,
    dense_inputs,
    forward_layer,
    forward_pruning,
    layer_halves,
    on_device,
)
from .configuration import PrunedConfig
from .exceptions import CalibrationError
from .report import Targets, count_zeros
from .structured import remove_units, unit_options
from .structured.composite import remove_empty_units_in_layer, restrict_statistics


def input_owners(spec: ArchSpec, projections) -> dict[str, str]:
    """Projection → the projection whose input hook serves it (q, k, v share one input, so do gate and up)."""
    owners = {}
    for group in spec.input_groups:
        present = [p for p in group if p in projections]
        owners.update({p: present[0] for p in present})
    return owners


class LayerWalk:
    """Walks ``model``'s decoder layers on ``device`` (read from and written back to ``store`` when offloaded).
    ``dampening`` collects the projections whose SparseGPT factor needed more than the configured dampening."""

    def __init__(self, model, spec: ArchSpec, device, store=None):
        self.model, self.spec, self.device, self.store = model, spec, device, store
        self.dampening: dict[str, float] = {}
        self.row_kernel = False  # the kernel of the current prune can solve a block of rows (``RowShard``)
        self.dense: Activations | None = None  # ``dense_target``: the dense model's activations of the current layer

    def resident(self, idx: int, write: bool = False):
        """Layer ``idx`` on the execution device for a block (loaded from disk and written back when offloaded)."""
        if self.store is not None:
            return self.store.resident(idx, self.device, write)
        return on_device(decoder_layers(self.model, self.spec)[idx], self.device, compute=True)

    def _layer_statistics(self, layer, acts, idx, targets, hessian, outputs="none") -> tuple[dict, torch.Tensor | None]:
        owners = input_owners(self.spec, targets[idx])
        hooked = {o: targets[idx][o] for o in set(owners.values())}
        stats, out = collect_statistics(layer, acts, idx, hooked, hessian, outputs)
        return {p: stats[o] for p, o in owners.items()}, out

    def profile(self, acts: Activations, targets: Targets, profile: OutlierProfile, thresholds, config):
        """Dense walk: Wanda scores of every projection → outlier ratios (profile updated in place). With
        structured removal, also what each layer could give up: ``{(layer, kind): [Option]}``."""
        units = config.structured_units if config.structured_sparsity > 0 else ()
        options = {}
        layers = decoder_layers(self.model, self.spec)
        for idx in tqdm(range(len(layers)), desc="Outlier profile"):
            with self.resident(idx) as layer:
                if idx in targets:
                    whole = units and len(targets[idx]) == len(self.spec.keys)  # units need every projection
                    hessian = ("o", "down") if whole else False
                    scale = residual_energy(acts.hidden) if whole else None  # before the outputs overwrite it
                    stats, out = self._layer_statistics(layer, acts, idx, targets, hessian, "in_place")
                    scores = {p: wanda_scores(lin.weight, stats[p].sumsq) for p, lin in targets[idx].items()}
                    profile.add_layer(idx, scores, thresholds)
                    for p, s in stats.items():  # sensitivity proxy, unless a Hutchinson estimate is there
                        profile.sensitivity.setdefault((idx, p), input_hessian_proxy(s.sumsq, s.tokens))
                    if whole:
                        found = unit_options(layer, self.spec, stats, units, config.dampening, scale)
                        options.update({(idx, kind): opts for kind, opts in found.items()})
                else:
                    out = forward_layer(layer, acts, idx, "in_place")
            acts.hidden = out
        return options

    @torch.no_grad()
    def prune(self, acts, targets: Targets, plan, kernel, config: PrunedConfig, cuts=None, label="") -> None:
        """Sequential pass: statistics from already-pruned inputs, remove units (``cuts``), prune, propagate."""
        cuts = cuts or {}
        self.dampening, self.row_kernel = {}, kernel.rows
        last = max(targets)
        if not cuts and all(s == 0 for s in plan.values()):
            return  # nothing to remove
        prune = functools.partial(self._prune_one, targets, plan, kernel, config)
        walk = bool(kernel.needs or cuts)  # the layers must see the outputs of the pruned layers before them
        desc = f"Pruning ({kernel.name}{', ' + label if label else ''})"
        if config.dense_target:
            self._check_dense_memory(acts, targets)
        self.dense = acts.clone() if config.dense_target else None  # the dense model's stream, beside the pruned one
        try:
            for idx in tqdm(range(last + 1), desc=desc):
                with self.resident(idx, write=self.store is not None) as layer:
                    propagate = walk and idx < last
                    self._walk_layer(layer, acts, idx, targets, kernel, config, cuts.get(idx), prune, propagate)
                    if self.store is not None and idx in targets:
                        self.finish_offloaded(layer, idx, targets, clean=not self.store.in_candidate)
        finally:
            self.dense = None  # the dense stream is this walk's only

    def _check_dense_memory(self, acts, targets: Targets) -> None:
        """``dense_target`` holds a second copy of the layer inputs and the dense inputs of one layer's projections;
        refused before any work when that exceeds the memory available on a CPU execution device."""
        if torch.device(self.device).type != "cpu":
            return
        widths = max(
            sum(targets[i][o].in_features for o in set(input_owners(self.spec, targets[i]).values())) for i in targets
        )
        need = (
            acts.hidden.numel() * acts.hidden.element_size() + acts.hidden.shape[0] * acts.hidden.shape[1] * widths * 4
        )
        free = psutil.virtual_memory().available
        if need > free:
            raise CalibrationError(
                f"dense_target needs {need / 2**30:.1f} GiB more (the dense stream and one layer's dense inputs for "
                f"{acts.hidden.shape[0]} × {acts.hidden.shape[1]} tokens), {free / 2**30:.1f} GiB are available: "
                "calibrate on fewer tokens (nsamples, seqlen) or leave dense_target off"
            )

    def adopt(self, name: str, targets: Targets) -> None:
        """Offloaded λ/M search: the winning candidate's layers become the result; then the clean-up its walk
        skipped."""
        self.store.adopt(name)
        for idx in sorted(targets):
            with self.resident(idx, write=True) as layer:
                self.finish_offloaded(layer, idx, targets)

    def finish_offloaded(self, layer, idx: int, targets: Targets, clean: bool = True) -> None:
        """An offloaded layer before it is written: the in-memory clean-up of empty units (not while a λ/M
        candidate is pruned: the skeleton's shapes must stay those of the checkpoint), then its zero counts."""
        if clean:
            remove_empty_units_in_layer(layer, self.spec)
            targets[idx] = layer_projections(layer, self.spec, list(targets[idx]))
        self.store.counts.update(count_zeros({idx: targets[idx]}))

    def _prune_one(
        self, targets: Targets, plan, kernel, config: PrunedConfig, idx: int, proj: str, stats, shard=None
    ) -> None:
        """Prune one projection; with ``shard`` this process solves its block of rows and the blocks are gathered."""
        lin, sparsity = targets[idx][proj], plan[(idx, proj)]
        if sparsity == 0:
            return
        info = {}
        options = dict(nm=config.nm, dampening=config.dampening, block_size=config.block_size, saliency=config.saliency)
        iterations = dict(
            max_iterations=config.admm_iterations, cg_iterations=config.cg_iterations, rho=config.admm_rho
        )
        options.update({k: v for k, v in iterations.items() if v is not None})  # else the kernel's default
        if shard is None:
            lin.weight.data.copy_(kernel.fn(lin.weight.data, stats, sparsity, info=info, **options))
        else:
            rows = kernel.fn(shard.local(lin.weight.data), stats, sparsity, info=info, shard=shard, **options)
            lin.weight.data.copy_(shard.gather(rows))
        if info.get("dampening", config.dampening) != config.dampening:
            self.dampening[f"{idx}.{proj}"] = info["dampening"]

    def _walk_layer(self, layer, acts, idx, targets: Targets, kernel, config, cut, prune, propagate: bool) -> None:
        """Layer ``idx``: remove units (``cut``), prune its projections, and (``propagate``) compute its outputs
        for the next layer from the pruned layer."""
        hessian = "hessian" in kernel.needs
        stats = self._remove_units(layer, acts, idx, targets, cut, config, hessian) if cut else None
        if idx not in targets or not kernel.needs:
            if self.dense is not None and propagate:
                self.dense.hidden = forward_layer(layer, self.dense, idx, "in_place")
            self._solve(targets, idx, list(targets.get(idx, {})), lambda p: None, prune)
            if propagate:
                acts.hidden = forward_layer(layer, acts, idx, "in_place")
        elif config.sequential == "projection":
            acts.hidden = self._forward_pruning(layer, acts, idx, targets, hessian, prune)
        else:
            if stats is None:
                stats, _ = self._layer_statistics(layer, acts, idx, targets, hessian)
            self._solve(targets, idx, list(stats), stats.__getitem__, prune)
            if propagate:
                acts.hidden = forward_layer(layer, acts, idx, "in_place")

    def _solve(self, targets: Targets, idx: int, projs: list[str], stats_of, prune) -> None:
        """Prune ``projs`` of layer ``idx`` (``prune(idx, proj, stats_of(proj), shard)``). With several processes each
        solves its share (``split_solves``: whole projections balanced by cost; one that outweighs a process's share
        is solved by all, a block of rows each, ``shard``) and every result is broadcast from the process that
        solved it, so all processes hold the weights one process would compute."""
        rank, size = world()
        shapes = {p: tuple(targets[idx][p].weight.shape) for p in projs}
        owners = split_solves(shapes, size, rows=self.row_kernel)
        mine = [p for p in projs if owners[p] in (rank, ROWS)]
        for i, proj in enumerate(mine):
            stats = stats_of(proj)
            last = stats is not None and all(stats_of(p) is not stats for p in mine[i + 1 :])
            if last:  # the kernels need not cache factors for later readers; what they cached is freed after
                stats.final_read = True
            prune(idx, proj, stats, row_shard(shapes[proj][0]) if owners[proj] == ROWS else None)
            if last:
                stats.cache.clear()
        if size == 1:
            return
        for proj in (p for p in projs if owners[p] != ROWS):  # a shared one is whole on every process already
            broadcast_tensor(targets[idx][proj].weight.data, owners[proj])
            damp = broadcast_object(self.dampening.get(f"{idx}.{proj}"), owners[proj])
            if damp is not None:
                self.dampening[f"{idx}.{proj}"] = damp

    def _remove_units(self, layer, acts, idx, targets: Targets, cut, config, hessian: bool) -> dict | None:
        """Structured step of layer ``idx``: statistics of the layer as it is, remove units with compensation,
        refresh ``targets[idx]``. With ``sequential="layer"`` the statistics serve the unstructured step too
        (restricted to the kept inputs of ``o`` and ``down``); otherwise the pruning forward collects its own."""
        reuse = config.sequential == "layer"
        stats, _ = self._layer_statistics(layer, acts, idx, targets, True if reuse and hessian else ("o", "down"))
        keep = remove_units(layer, self.spec, stats, cut, config.dampening)
        targets[idx] = layer_projections(layer, self.spec, list(targets[idx]))
        if not reuse:
            return None
        stats["o"] = restrict_statistics(stats["o"], keep["heads"], layer.get_submodule(self.spec.attention).head_dim)
        stats["down"] = restrict_statistics(stats["down"], keep["channels"])
        return stats

    def _forward_pruning(self, layer, acts, idx, targets: Targets, hessian: bool, prune) -> torch.Tensor:
        """One forward of the layer; each input group is pruned as its input arrives (q, k, v share one)."""
        owners = input_owners(self.spec, targets[idx])
        members = {o: [p for p, owner in owners.items() if owner == o] for o in set(owners.values())}

        def prune_group(owner: str, stats) -> None:
            self._solve(targets, idx, members[owner], lambda p: stats, prune)

        hooked = {o: targets[idx][o] for o in members}
        dense = dense_inputs(layer, self.dense, idx, hooked) if self.dense is not None else None
        return forward_pruning(layer, acts, idx, hooked, hessian, prune_group, layer_halves(layer, self.spec), dense)
