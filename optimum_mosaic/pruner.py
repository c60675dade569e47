"""``Pruner``: calibrate → allocate → prune each layer → save. Orchestration only; the maths lives in
``allocation/`` and ``pruning/``."""

from __future__ import annotations

import functools
import re
import time

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .allocation.outliers import OutlierProfile, wanda_scores
from .allocation.search import search_allocation, search_grid, search_thresholds
from .allocation.sensitivity import hutchinson_traces, input_hessian_proxy
from .architectures import check_structured, decoder_layers, get_arch_spec, layer_projections
from .calibration.data import sample_windows
from .calibration.distributed import barrier, shard_windows, world
from .calibration.layerwise import (
    Activations,
    capture,
    collect_statistics,
    forward_layer,
    forward_pruning,
    on_device,
)
from .configuration import AUTO, PrunedConfig
from .evaluation import mean_nll
from .models import fit_config_to_shapes
from .registry import get_method
from .report import PruningReport, Targets, achieved, count_zeros, prunable_numel
from .structured import model_shapes, plan_cuts, remove_units, unit_options
from .structured.composite import remainder_plan, remove_empty_units, restrict_statistics

logger = logging.get_logger(__name__)


class Pruner:
    """Prunes a causal LM in place. ``Pruner(model, tokenizer)`` or ``Pruner.from_pretrained(path)``."""

    def __init__(self, model, tokenizer=None, device: str | torch.device | None = None, store=None):
        self.spec = get_arch_spec(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.report: PruningReport | None = None
        self.store = store  # offload.LayerStore when the decoder layers stay on disk

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | None = None, device=None, offload: bool = False, **load_kwargs
    ) -> Pruner:
        """Load a model and tokenizer (a packaged-model alias such as ``smollm2-135m`` works offline).

        ``offload=True`` keeps the decoder layers on disk and loads one at a time (``offload.py``): for
        checkpoints larger than memory; ``prune`` then needs a ``save_directory``."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from .packaged_models import DEFAULT_MODEL, clear_gguf_quantizer, resolve_model_path

        path = resolve_model_path(model_id_or_path or DEFAULT_MODEL)
        if offload:
            from .offload import LayerStore, load_skeleton

            dtype = load_kwargs.get("dtype", torch.float32)
            model = load_skeleton(path, dtype)
            return cls(model, _tokenizer(path), device, LayerStore(model, path, dtype))
        gguf = {"gguf_file": load_kwargs["gguf_file"]} if "gguf_file" in load_kwargs else {}
        get_arch_spec(AutoConfig.from_pretrained(path, **gguf))  # fail before loading any weights
        load_kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        if gguf:
            clear_gguf_quantizer(model)
        return cls(model, _tokenizer(path, **gguf), device)

    # -- the pipeline --------------------------------------------------------------------------
    def prune(
        self,
        config: PrunedConfig | None = None,
        calibration_dataset=None,
        save_directory=None,
        batch_size: int = 8,
        compressed: bool = False,
    ):
        """Prune the model in place as ``config`` says; return it (``model.mosaic_report`` holds the report).
        ``compressed``: save the projections in the bitmap format (see ``save_pruned``)."""
        config = config or PrunedConfig()
        if self.store is not None:
            if compressed:
                raise ValueError("an offloaded prune writes dense layer shards; drop compressed=True")
            from .offload import prune_offloaded

            return prune_offloaded(self, config, calibration_dataset, save_directory, batch_size)
        self._run(config, calibration_dataset, batch_size)
        from .hub import attach_hub_methods

        attach_hub_methods(self.model)
        if save_directory is not None:
            from .serialization import save_pruned

            if world()[0] == 0:  # every process holds the same model: one writes it
                save_pruned(self.model, self.tokenizer, save_directory, config, self.report, compressed=compressed)
            barrier()
        return self.model

    def _run(self, config: PrunedConfig, calibration_dataset, batch_size: int) -> None:
        """calibrate → allocate → shrink structure → prune each layer → report (in ``self.report``)."""
        clock = {"start": time.perf_counter()}
        targets = self._targets(config)
        allocator = get_method("allocation", config.allocation)
        kernel = get_method("unstructured", config.pruner)
        dense_numel = prunable_numel(targets)
        profile = OutlierProfile(dense_numel)
        acts, heldout = None, None
        structured = config.structured_sparsity > 0
        if allocator.needs or kernel.needs or structured:
            acts, heldout = self._calibrate(config, calibration_dataset, batch_size)
        if "loss_hessian" in allocator.needs:
            profile.sensitivity = self._loss_hessian_traces(config, targets)
        clock["calibration"] = time.perf_counter()
        options = {}
        if "outliers" in allocator.needs or structured:
            thresholds = search_thresholds(config.lamda, config.outlier_threshold)
            options = self._outlier_pass(acts.clone(), targets, profile, thresholds, config)
        clock["outliers"] = time.perf_counter()
        plan, lamda, threshold, table = self._allocate(
            config, allocator, kernel, profile, targets, acts, heldout, batch_size
        )
        clock["allocation"] = time.perf_counter()
        cuts = {}
        if structured:  # how many units each layer gives up; the walk chooses and removes them
            cuts, numel = plan_cuts(
                options, model_shapes(self.model, self.spec), config.structured_sparsity, dense_numel
            )
            plan = remainder_plan(plan, dense_numel, numel, config.sparsity)
        clock["structured"] = time.perf_counter()
        if self._searched is not None:
            self._restore(targets, self._searched)  # the winning candidate already is this prune
        else:
            self._prune_layers(acts, targets, plan, kernel, config, cuts)
        self._searched = None
        if self.store is None:  # offloaded layers are not all at hand; the clean-up is skipped there
            remove_empty_units(self.model, self.spec)
            fit_config_to_shapes(self.model)
            targets = self._targets(config)
        clock["prune"] = time.perf_counter()
        self.report = self._build_report(config, targets, dense_numel, plan, lamda, threshold, table, acts, clock)
        self.model.mosaic_report = self.report
        self.model.mosaic_config = config

    def _resident(self, idx: int, write: bool = False):
        """Layer ``idx`` on the execution device for a block (loaded from disk and written back when offloaded)."""
        if self.store is not None:
            return self.store.resident(idx, self.device, write)
        return on_device(decoder_layers(self.model, self.spec)[idx], self.device)

    def _targets(self, config: PrunedConfig) -> Targets:
        if config.structured_sparsity > 0:  # fail before calibrating
            check_structured(self.spec, config.structured_units, self.model.config.model_type)
        layers = decoder_layers(self.model, self.spec)
        prefix = self.spec.layers
        ignore = [re.compile(p) for p in config.ignore]
        targets = {}
        for idx, layer in enumerate(layers):
            projs = layer_projections(layer, self.spec, config.targets)
            keep = {
                p: lin
                for p, lin in projs.items()
                if not any(r.search(f"{prefix}.{idx}.{self.spec.projections[p]}") for r in ignore)
            }
            if keep:
                targets[idx] = keep
        if not targets:
            raise ValueError("targets/ignore leave no linear layer to prune")
        return targets

    def _calibrate(self, config, data, batch_size) -> tuple[Activations, torch.Tensor | None]:
        if self.tokenizer is None and not isinstance(data, torch.Tensor):
            raise ValueError("calibration text needs a tokenizer: Pruner(model, tokenizer), or pass token ids")
        holdout = config.search_samples if config.search_grid and config.allocation.startswith("projection") else 0
        windows, heldout = sample_windows(self.tokenizer, data, config.nsamples, config.seqlen, config.seed, holdout)
        self._calibration = {
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "seed": config.seed,
            "held_out": holdout,
            "source": "bundled Austen novels" if data is None else "user data",
        }
        self._windows = windows
        windows = shard_windows(windows)  # this process's share when launched on several
        one_batch = config.sequential == "projection"  # forward_pruning runs each layer once over everything
        batch = windows.shape[0] if one_batch else batch_size
        return capture(self.model, self.spec, windows, self.device, batch), heldout

    def _loss_hessian_traces(self, config, targets: Targets) -> dict:
        """Hutchinson estimate of every target matrix's loss-Hessian trace (allocation/sensitivity.py)."""
        weights = {key: lin.weight for key, lin in _flat(targets).items()}
        windows = self._windows[: config.hessian_samples]
        self.model.to(self.device)  # the double backward needs the whole model on one device
        return hutchinson_traces(self.model, windows, weights, samples=1, seed=config.seed)

    def _owners(self, idx: int, targets: Targets) -> dict[str, str]:
        """Projection → the projection whose input hook serves it (q, k, v share one input, so do gate and up)."""
        owners = {}
        for group in self.spec.input_groups:
            present = [p for p in group if p in targets[idx]]
            owners.update({p: present[0] for p in present})
        return owners

    def _layer_statistics(self, layer, acts, idx, targets, hessian) -> tuple[dict, torch.Tensor]:
        owners = self._owners(idx, targets)
        hooked = {o: targets[idx][o] for o in set(owners.values())}
        stats, out = collect_statistics(layer, acts, idx, hooked, hessian)
        return {p: stats[o] for p, o in owners.items()}, out

    def _outlier_pass(self, acts: Activations, targets: Targets, profile: OutlierProfile, thresholds, config):
        """Dense walk: Wanda scores of every projection → outlier ratios (profile updated in place). With
        structured removal, also what each layer could give up: ``{(layer, kind): [Option]}``."""
        units = config.structured_units if config.structured_sparsity > 0 else ()
        options = {}
        layers = decoder_layers(self.model, self.spec)
        for idx in tqdm(range(len(layers)), desc="Outlier profile"):
            with self._resident(idx) as layer:
                if idx in targets:
                    whole = units and len(targets[idx]) == len(self.spec.keys)  # units need every projection
                    hessian = ("o", "down") if whole else False
                    stats, out = self._layer_statistics(layer, acts, idx, targets, hessian)
                    scores = {p: wanda_scores(lin.weight, stats[p].sumsq) for p, lin in targets[idx].items()}
                    profile.add_layer(idx, scores, thresholds)
                    for p, s in stats.items():  # sensitivity proxy, unless a Hutchinson estimate is there
                        profile.sensitivity.setdefault((idx, p), input_hessian_proxy(s.sumsq, s.tokens))
                    if whole:
                        scale = float(acts.hidden.double().square().sum())
                        found = unit_options(layer, self.spec, stats, units, config.dampening, scale)
                        options.update({(idx, kind): opts for kind, opts in found.items()})
                else:
                    out = forward_layer(layer, acts, idx)
            acts.hidden = out
        return options

    def _allocate(self, config, allocator, kernel, profile, targets, acts, heldout, batch_size):
        self._searched = None
        if not allocator.needs:
            return allocator.fn(profile, config.sparsity), None, None, []
        lamda, threshold, table = config.lamda, config.outlier_threshold, []
        if config.search_grid and config.structured_sparsity > 0:
            # the search would score three whole composite prunes; the unstructured remainder is spread evenly
            threshold = search_thresholds(lamda, threshold)[0]  # the first M the outlier pass measured
            lamda = 0.0 if lamda == AUTO else lamda
            logger.info("structured_sparsity > 0: no λ/M search, λ=%.3f M=%.1f", lamda, threshold)
        elif config.search_grid:
            candidates = search_grid(config.sparsity, lamda, threshold)
            score = self._proxy_score(kernel, config, targets, acts, heldout, batch_size)
            lamda, threshold, table = search_allocation(allocator.fn, profile, config.sparsity, candidates, score)
            logger.info("λ/M search chose λ=%.3f M=%.1f", lamda, threshold)
        plan = allocator.fn(profile, config.sparsity, lamda=lamda, outlier_threshold=threshold)
        return plan, lamda, threshold, table

    def _proxy_score(self, kernel, config, targets: Targets, acts, heldout, batch_size):
        """Score a plan by the prune itself (same calibration, same kernel) and the mean NLL of the held-out
        calibration windows. The best candidate's weights are kept, so the search costs one prune per
        candidate and the final prune comes free. (Cheaper proxies mis-ranked plans on SmolLM2-135M.)"""
        dense = {k: lin.weight.detach().clone() for k, lin in _flat(targets).items()}
        best = {"loss": float("inf")}

        def score(plan) -> float:
            self._prune_layers(acts.clone(), targets, plan, kernel, config)
            loss = mean_nll(self.model, heldout, batch_size)
            if loss < best["loss"]:
                best.update(loss=loss, weights={k: lin.weight.detach().clone() for k, lin in _flat(targets).items()})
                self._searched = best["weights"]
            self._restore(targets, dense)
            return loss

        return score

    @staticmethod
    def _restore(targets: Targets, weights: dict) -> None:
        for key, lin in _flat(targets).items():
            lin.weight.data.copy_(weights[key])

    @torch.no_grad()
    def _prune_layers(self, acts, targets: Targets, plan, kernel, config: PrunedConfig, cuts=None) -> None:
        """Sequential pass: statistics from already-pruned inputs, remove units (``cuts``), prune, propagate."""
        cuts = cuts or {}
        self._dampening = {}
        last = max(targets)
        if not cuts and all(s == 0 for s in plan.values()):
            return  # nothing to remove
        prune = functools.partial(self._prune_one, targets, plan, kernel, config)
        walk = bool(kernel.needs or cuts)  # the layers must see the outputs of the pruned layers before them
        for idx in tqdm(range(last + 1), desc=f"Pruning ({config.pruner})"):
            with self._resident(idx, write=self.store is not None) as layer:
                propagate = walk and idx < last
                self._walk_layer(layer, acts, idx, targets, kernel, config, cuts.get(idx), prune, propagate)
                if self.store is not None and idx in targets:
                    self.store.counts.update(count_zeros({idx: targets[idx]}))

    def _prune_one(self, targets: Targets, plan, kernel, config: PrunedConfig, idx: int, proj: str, stats) -> None:
        lin, sparsity = targets[idx][proj], plan[(idx, proj)]
        if sparsity == 0:
            return
        info = {}
        options = dict(nm=config.nm, dampening=config.dampening, block_size=config.block_size, saliency=config.saliency)
        lin.weight.data.copy_(kernel.fn(lin.weight.data, stats, sparsity, info=info, **options))
        if info.get("dampening", config.dampening) != config.dampening:
            self._dampening[f"{idx}.{proj}"] = info["dampening"]

    def _walk_layer(self, layer, acts, idx, targets: Targets, kernel, config, cut, prune, propagate: bool) -> None:
        """Layer ``idx``: remove units (``cut``), prune its projections, and (``propagate``) compute its outputs
        for the next layer from the pruned layer."""
        hessian = "hessian" in kernel.needs
        stats = self._remove_units(layer, acts, idx, targets, cut, config, hessian) if cut else None
        if idx not in targets or not kernel.needs:
            for proj in targets.get(idx, {}):
                prune(idx, proj, None)
            if propagate:
                acts.hidden = forward_layer(layer, acts, idx)
        elif config.sequential == "projection":
            acts.hidden = self._forward_pruning(layer, acts, idx, targets, hessian, prune)
        else:
            if stats is None:
                stats, _ = self._layer_statistics(layer, acts, idx, targets, hessian)
            for proj, s in stats.items():
                prune(idx, proj, s)
            if propagate:
                acts.hidden = forward_layer(layer, acts, idx)

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
        owners = self._owners(idx, targets)
        members = {o: [p for p, owner in owners.items() if owner == o] for o in set(owners.values())}

        def prune_group(owner: str, stats) -> None:
            for proj in members[owner]:
                prune(idx, proj, stats)

        hooked = {o: targets[idx][o] for o in members}
        return forward_pruning(layer, acts, idx, hooked, hessian, prune_group)

    def _build_report(self, config, targets, dense_numel, plan, lamda, threshold, table, acts, clock) -> PruningReport:
        counts = self.store.counts if self.store is not None else count_zeros(targets, dense_numel)
        glob, per_projection, per_layer, per_type = achieved(counts)
        dense_total = sum(dense_numel.values())
        removed = dense_total - sum(prunable_numel(targets).values())
        kept = sum(plan.numel.values())  # the plan covers what structured pruning left
        planned = (plan.global_sparsity() * kept + dense_total - kept) / dense_total
        notes = []
        if abs(planned - config.sparsity) > 1e-3:
            notes.append(f"the {config.allocation} plan averages {planned:.4f}, not the target {config.sparsity}")
            logger.warning(
                "Allocation %s drifts from the target: %.4f vs %.4f", config.allocation, planned, config.sparsity
            )
        if getattr(self, "_dampening", None):
            notes.append(f"SparseGPT needed more dampening for {self._dampening}")
        stages = ("start", "calibration", "outliers", "allocation", "structured", "prune")
        names = ("calibration_s", "outlier_profile_s", "allocation_s", "structured_s", "prune_s")
        timings = {n: clock[b] - clock[a] for n, a, b in zip(names, stages, stages[1:], strict=False)}
        timings["total_s"] = clock["prune"] - clock["start"]
        return PruningReport(
            target_sparsity=config.sparsity,
            planned_sparsity=round(planned, 6),
            achieved_sparsity=round(glob, 6),
            per_projection=per_projection,
            per_layer=per_layer,
            per_type=per_type,
            plan=plan.to_dict(),
            lamda=None if lamda == AUTO else lamda,
            outlier_threshold=None if threshold == AUTO else threshold,
            search=table,
            calibration=getattr(self, "_calibration", {}) if acts is not None else {},
            timings={k: round(v, 3) for k, v in timings.items()},
            notes=notes,
            structured_sparsity=round(removed / dense_total, 6),
            layer_shapes=getattr(self.model.config, "layer_shapes", None),
        )


def _tokenizer(path, **kwargs):
    """The checkpoint's tokenizer, or None (then calibrate with token ids) when it ships none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer loaded from %s (%s); pass token ids as calibration data", path, err)
        return None


def _flat(targets: Targets) -> dict:
    return {(idx, proj): lin for idx, projs in targets.items() for proj, lin in projs.items()}
