"""``Pruner``: calibrate → measure → allocate → prune each layer → save. Orchestration only: the maths lives in
``allocation/``, ``pruning/`` and ``structured/``, the walk over the layers (devices, disk, processes) in
``layer_walk.py``."""

from __future__ import annotations

import time

import torch
from transformers.utils import logging

from .allocation.outliers import OutlierProfile
from .allocation.search import search_allocation, search_grid, search_thresholds
from .allocation.sensitivity import hutchinson_traces
from .architectures import check_structured, decoder_layers, get_arch_spec
from .calibration.data import CORPUS_NAMES, sample_windows
from .calibration.distributed import barrier, shard_windows, world
from .calibration.layerwise import Activations, capture, windows_per_forward
from .configuration import AUTO, PrunedConfig
from .copies import close_copy, copy_tensors
from .evaluation import mean_nll
from .layer_walk import LayerWalk
from .models import fit_config_to_shapes
from .registry import get_method
from .report import PruningReport, Targets, achieved, count_zeros, prunable_numel, select_targets
from .serialization import linear_summary
from .structured import model_shapes, plan_cuts
from .structured.composite import remainder_plan, remove_empty_units

logger = logging.get_logger(__name__)
HELD_OUT_BATCH = 8  # windows per forward when the λ/M search scores its held-out windows and no batch_size is given


class Pruner:
    """Prunes a causal LM in place. ``Pruner(model, tokenizer)`` or ``Pruner.from_pretrained(path)``."""

    def __init__(self, model, tokenizer=None, device: str | torch.device | None = None, store=None, source=None):
        from .validation import check_device

        self.spec = get_arch_spec(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = check_device(device) if device is not None else next(model.parameters()).device
        self.report: PruningReport | None = None
        self.store = store  # offload.LayerStore when the decoder layers stay on disk
        if source is None:  # the model that was pruned, recorded in the report, sidecar and card
            from .packaged_models import source_record

            name = str(getattr(model, "name_or_path", "") or "an in-memory model")
            source = source_record(name, name)
        self.source = source

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | None = None, device=None, offload: bool = False, **load_kwargs
    ) -> Pruner:
        """Load a model and tokenizer (a packaged-model alias such as ``smollm2-135m`` works offline).

        ``offload=True`` keeps the decoder layers on disk and loads one at a time (``offload.py``): for
        checkpoints larger than memory; ``prune`` then needs a ``save_directory``. ``dtype``: float32 by default;
        ``"auto"`` keeps the checkpoint's own (bf16 in → bf16 pruned and saved; each layer is upcast to float32
        while the walk holds it, statistics are float64)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from .packaged_models import DEFAULT_MODEL, clear_gguf_quantizer, resolve_model_path, source_record
        from .validation import check_device, check_hub_model, check_model_path

        name = model_id_or_path or DEFAULT_MODEL
        device = check_device(device) if device is not None else None  # before any weight is read
        check_hub_model(check_model_path(name))  # a missing Hub id: one line at once, not 30 s of retries
        path = resolve_model_path(name)
        if offload:
            from .offload import LayerStore, load_skeleton

            dtype = _resolve_dtype(load_kwargs.get("dtype", torch.float32), path)
            model = load_skeleton(path, dtype)
            return cls(model, _tokenizer(path), device, LayerStore(model, path, dtype), source_record(name, path))
        gguf = {"gguf_file": load_kwargs["gguf_file"]} if "gguf_file" in load_kwargs else {}
        get_arch_spec(AutoConfig.from_pretrained(path, **gguf))  # fail before loading any weights
        load_kwargs["dtype"] = _resolve_dtype(load_kwargs.get("dtype", torch.float32), path, gguf)
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        if gguf:
            clear_gguf_quantizer(model)
        return cls(model, _tokenizer(path, **gguf), device, source=source_record(name, path))

    # -- the pipeline --------------------------------------------------------------------------
    def prune(
        self,
        config: PrunedConfig | None = None,
        calibration_dataset=None,
        save_directory=None,
        batch_size: int | None = None,
        *,
        overwrite: bool = False,
        restore_on_error: bool = True,
        compressed: bool = False,
    ):
        """Prune the model in place as ``config`` says; return it (``model.mosaic_report`` holds the report).

        Everything that can be checked before work is (config, batch size, sequence length against the model's
        positions, calibration data, ``save_directory``). ``overwrite``: replace a non-empty ``save_directory``
        that is not an optimum-mosaic checkpoint. If the prune fails, the model is restored as it was
        (``restore_on_error=False`` skips the copy of the decoder layers this takes — a temporary file beyond 256 MiB,
        else host memory — and leaves a failed model modified).
        ``compressed``: save the projections in the bitmap format (see ``save_pruned``). ``batch_size``: calibration
        windows per layer forward (activation memory; the results do not depend on it); default: as many as keep one
        activation of the widest projection within 1 GiB (``windows_per_forward``).
        """
        from .rollback import restore_on_error as rollback
        from .validation import check_prune_inputs

        config = config or PrunedConfig()
        calibration_dataset = check_prune_inputs(
            self, config, calibration_dataset, save_directory, batch_size, overwrite
        )
        if self.store is not None:
            if compressed:
                raise ValueError("an offloaded prune writes dense layer shards; drop compressed=True")
            from .offload import prune_offloaded

            return prune_offloaded(self, config, calibration_dataset, save_directory, batch_size, overwrite)
        with rollback(self.model, restore_on_error):
            self._run(config, calibration_dataset, batch_size)
        from .hub import attach_hub_methods

        attach_hub_methods(self.model)
        if save_directory is not None:
            from .serialization import save_pruned

            if world()[0] == 0:  # every process holds the same model: one writes it
                save_pruned(
                    self.model,
                    self.tokenizer,
                    save_directory,
                    config,
                    self.report,
                    overwrite=overwrite,
                    compressed=compressed,
                )
            barrier()
        return self.model

    def _run(self, config: PrunedConfig, calibration_dataset, batch_size: int) -> None:
        """calibrate → measure the dense model → allocate → budget the structured removal → walk the layers
        (per layer: statistics → structured → unstructured) → report (in ``self.report``). One call per stage."""
        clock = {"start": time.perf_counter()}
        walk = LayerWalk(self.model, self.spec, self.device, self.store)
        targets = self._targets(config)
        self._dense_shapes = linear_summary(self.model, count=False)[0]
        dense_numel = prunable_numel(targets)
        allocator = get_method("allocation", config.allocation)
        kernel = get_method("unstructured", config.pruner)
        needs_data = allocator.needs or kernel.needs or config.structured_sparsity > 0
        acts, heldout = self._calibrate(config, calibration_dataset, batch_size) if needs_data else (None, None)
        clock["calibration"] = time.perf_counter()
        profile, options = self._measure(walk, config, allocator, targets, acts, dense_numel)
        clock["outliers"] = time.perf_counter()
        plan, choice, searched = self._allocate(
            walk, config, allocator, kernel, profile, targets, acts, heldout, batch_size
        )
        clock["allocation"] = time.perf_counter()
        plan, cuts = self._structured_budget(config, options, plan, dense_numel)
        clock["structured"] = time.perf_counter()
        targets = self._prune(walk, config, kernel, targets, acts, plan, cuts, searched)
        clock["prune"] = time.perf_counter()
        self.report = self._build_report(config, targets, dense_numel, plan, choice, acts, clock, walk.dampening)
        self.model.mosaic_report = self.report
        self.model.mosaic_config = config

    def _targets(self, config: PrunedConfig) -> Targets:
        if config.structured_sparsity > 0:  # fail before calibrating
            check_structured(self.spec, config.structured_units, self.model.config.model_type)
        targets = select_targets(self.model, self.spec, config.targets, config.ignore)
        if not targets:
            raise ValueError(
                f"targets/ignore: targets={config.targets} ignore={config.ignore} leave no linear layer to prune"
            )
        return targets

    def _calibrate(self, config, data, batch_size) -> tuple[Activations, torch.Tensor | None]:
        """Calibration windows (this process's share) → the first decoder layer's inputs; the held-out windows the
        λ/M search scores on."""
        if self.tokenizer is None and not isinstance(data, torch.Tensor):
            raise ValueError("calibration text needs a tokenizer: Pruner(model, tokenizer), or pass token ids")
        holdout = config.search_samples if config.search_grid and config.allocation.startswith("projection") else 0
        windows, heldout = sample_windows(
            self.tokenizer, data, config.nsamples, config.seqlen, config.seed, holdout, config.calibration_corpus
        )
        self._calibration = {
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "seed": config.seed,
            "held_out": holdout,
            "source": CORPUS_NAMES[config.calibration_corpus] if data is None else "user data",
        }
        self._windows = windows
        windows = shard_windows(windows)  # this process's share when launched on several
        if batch_size is None:
            batch_size = windows_per_forward(decoder_layers(self.model, self.spec)[0], *windows.shape)
        return capture(self.model, self.spec, windows, self.device, batch_size), heldout

    def _measure(self, walk, config, allocator, targets, acts, dense_numel) -> tuple[OutlierProfile, dict]:
        """The dense model's profile: loss-Hessian traces (when the allocator asks), outlier ratios per projection
        and, for composite pruning, each layer's structured-removal options (one dense walk for both)."""
        profile, options = OutlierProfile(dense_numel), {}
        if "loss_hessian" in allocator.needs:  # Hutchinson estimate of every target matrix's loss-Hessian trace
            weights = {key: lin.weight for key, lin in _flat(targets).items()}
            self.model.to(self.device)  # the double backward needs the whole model on one device
            windows = self._windows[: config.hessian_samples]
            profile.sensitivity = hutchinson_traces(self.model, windows, weights, samples=1, seed=config.seed)
        if "outliers" in allocator.needs or config.structured_sparsity > 0:
            thresholds = search_thresholds(config.lamda, config.outlier_threshold)
            options = walk.profile(acts.clone(), targets, profile, thresholds, config)
        return profile, options

    def _allocate(self, walk, config, allocator, kernel, profile, targets, acts, heldout, batch_size):
        """Per-projection sparsity: ``(plan, (λ, M, search table), searched)``. The λ/M search scores each candidate
        plan by a whole prune; ``searched`` is the winner's result (weights, or its directory when offloaded) when
        the search pruned with the configured kernel, else None."""
        if not allocator.needs:
            return allocator.fn(profile, config.sparsity), (None, None, []), None
        lamda, threshold, table, best = config.lamda, config.outlier_threshold, [], {}
        if config.search_grid and config.structured_sparsity > 0:
            # the search would score three whole composite prunes; the unstructured remainder is spread evenly
            threshold = search_thresholds(lamda, threshold)[0]  # the first M the outlier pass measured
            lamda = 0.0 if lamda == AUTO else lamda
            logger.info("structured_sparsity > 0: no λ/M search, λ=%.3f M=%.1f", lamda, threshold)
        elif config.search_grid:
            candidates = search_grid(config.sparsity, lamda, threshold)
            scorer = get_method("unstructured", config.search_pruner or config.pruner)
            proxy = self._offloaded_score if self.store is not None else self._proxy_score
            score, best = proxy(walk, scorer, config, targets, acts, heldout, batch_size, keep=scorer is kernel)
            lamda, threshold, table = search_allocation(allocator.fn, profile, config.sparsity, candidates, score)
            logger.info("λ/M search chose λ=%.3f M=%.1f", lamda, threshold)
        plan = allocator.fn(profile, config.sparsity, lamda=lamda, outlier_threshold=threshold)
        return plan, (lamda, threshold, table), best.get("result")

    def _proxy_score(self, walk, kernel, config, targets: Targets, acts, heldout, batch_size, keep: bool = True):
        """Score a plan by a prune with ``kernel`` (same calibration) and the mean NLL of the held-out calibration
        windows. With ``keep`` (``kernel`` is the pruner) the best candidate's weights are kept (``best["result"]``),
        so the search costs one prune per candidate and the final prune comes free. (Cheaper proxies than a whole
        prune mis-ranked plans on SmolLM2-135M.) The dense weights and the best candidate's are ``copy_tensors``
        copies: beyond 256 MiB each, a temporary file rather than host memory."""

        def weights() -> dict:
            return {k: lin.weight for k, lin in _flat(targets).items()}

        dense = copy_tensors(weights(), "the λ/M search's copy of the dense weights")
        best = {"loss": float("inf")}

        def score(plan, label: str = "") -> float:
            walk.prune(acts.clone(), targets, plan, kernel, config, label=label)
            loss = mean_nll(self.model, heldout, batch_size or HELD_OUT_BATCH)
            if loss < best["loss"] and keep:
                close_copy(best.get("result"))
                best.update(loss=loss, result=copy_tensors(weights(), "the λ/M search's best candidate"))
            self._restore(targets, dense)
            return loss

        return score, best

    def _offloaded_score(self, walk, kernel, config, targets: Targets, acts, heldout, batch_size, keep: bool):
        """``_proxy_score`` with the layers on disk: each candidate's layers are written to a directory of their
        own and scored with the model streamed layer by layer; the best candidate's directory is kept."""
        best, names = {"loss": float("inf")}, iter(range(10**6))

        def score(plan, label: str = "") -> float:
            name = f".candidate-{next(names)}"
            with self.store.candidate(name):
                walk.prune(acts.clone(), targets, plan, kernel, config, label=label)
                with self.store.streamed(self.device) as model:
                    loss = mean_nll(model, heldout, batch_size or HELD_OUT_BATCH)
            if loss < best["loss"] and keep:
                if "result" in best:
                    self.store.discard(best["result"])
                best.update(loss=loss, result=name)
            else:
                self.store.discard(name)
            return loss

        return score, best

    def _structured_budget(self, config, options, plan, dense_numel):
        """Composite: how many units each layer gives up (the walk chooses and removes them), and the unstructured
        plan rescaled to what is left so the total stays the target."""
        if config.structured_sparsity <= 0:
            return plan, {}
        shapes = model_shapes(self.model, self.spec)
        cuts, numel = plan_cuts(options, shapes, config.structured_sparsity, dense_numel)
        return remainder_plan(plan, dense_numel, numel, config.sparsity), cuts

    def _prune(self, walk, config, kernel, targets, acts, plan, cuts, searched) -> Targets:
        """Walk the layers (or take the λ/M search's winner, which already is this prune), then the lossless
        clean-up of emptied units; the targets as the pruned model holds them."""
        if searched is None:
            walk.prune(acts, targets, plan, kernel, config, cuts)
        elif self.store is not None:
            walk.adopt(searched, targets)
        else:
            self._restore(targets, searched)
            close_copy(searched)
        if self.store is None:  # offloaded: the walk cleaned each layer up while it was resident
            remove_empty_units(self.model, self.spec)
        fit_config_to_shapes(self.model)  # reads shapes only (offloaded layers are on ``meta``)
        return targets if self.store is not None else self._targets(config)

    @staticmethod
    def _restore(targets: Targets, weights: dict) -> None:
        for key, lin in _flat(targets).items():
            lin.weight.data.copy_(weights[key])

    def _build_report(self, config, targets, dense_numel, plan, choice, acts, clock, dampening) -> PruningReport:
        lamda, threshold, table = choice
        if self.store is not None:  # counted per layer as it was written; removed weights count as zeros
            counts = {k: (z + dense_numel[k] - n, dense_numel[k]) for k, (z, n) in self.store.counts.items()}
        else:
            counts = count_zeros(targets, dense_numel)
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
        if dampening:
            notes.append(f"SparseGPT needed more dampening for {dampening}")
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
            dense_shapes=self._dense_shapes,
            sparsity_after_prune=round(glob, 6),
            source=dict(self.source),
        )


def _resolve_dtype(dtype, path, gguf: dict | None = None) -> torch.dtype:
    """``dtype`` as a torch dtype: ``"auto"`` is the checkpoint's own (its config's ``dtype``; float32 if unset)."""
    if dtype == "auto":
        from transformers import AutoConfig

        dtype = getattr(AutoConfig.from_pretrained(path, **(gguf or {})), "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: use 'auto', torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def _tokenizer(path, **kwargs):
    """The checkpoint's tokenizer, or None (then calibrate with token ids) when it ships none."""
    from transformers import AutoTokenizer

    from .validation import has_tokenizer

    if not kwargs and not has_tokenizer(path):  # transformers' own error would ask to install sentencepiece
        logger.warning("%s holds no tokenizer; calibrate with token ids, or pass Pruner(model, tokenizer)", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer loaded from %s (%s); pass token ids as calibration data", path, err)
        return None


def _flat(targets: Targets) -> dict:
    return {(idx, proj): lin for idx, projs in targets.items() for proj, lin in projs.items()}
