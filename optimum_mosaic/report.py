"""What a prune achieved: sparsity per projection, per layer, per projection type and globally.

One definition of sparsity everywhere (report, sidecar, card, CLI summary, Trainer callbacks): the fraction
of exact zeros among the weights of the pruned projections *of the dense model*, weights removed by
structured pruning counting as zeros (``DENOMINATOR`` says it in words). ``measured_report`` counts them
again from the weights, which every save does, so a checkpoint states what its files hold.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

Targets = dict[int, dict[str, "nn.Linear"]]


@dataclass
class PruningReport:
    target_sparsity: float
    planned_sparsity: float  # parameter-weighted mean of the plan
    achieved_sparsity: float  # fraction of exact zeros among the prunable weights
    per_projection: dict[str, dict[str, float]]  # {layer: {projection: achieved}}
    per_layer: dict[str, float]
    per_type: dict[str, float]
    plan: dict[str, dict[str, float]]
    lamda: float | None = None
    outlier_threshold: float | None = None
    search: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    structured_sparsity: float = 0.0  # fraction of the prunable parameters removed as whole units
    layer_shapes: list[dict] | None = None
    evaluation: dict = field(default_factory=dict)  # perplexity before/after, when measured (CLI, benchmarks)
    dense_shapes: dict[str, list[int]] = field(default_factory=dict)  # module name → [out, in] before pruning
    sparsity_after_prune: float | None = None  # achieved_sparsity when the prune ended (a save re-measures)
    source: dict = field(default_factory=dict)  # the model that was pruned: name, description, licence

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruningReport:
        """Inverse of ``to_dict``; keys this version does not know (from a newer writer) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


DENOMINATOR = (
    "exact zeros among the weights of the pruned decoder projections of the dense model "
    "(weights removed by structured pruning count as zeros; embeddings, norms and lm_head excluded)"
)


def select_targets(model, spec, keys, ignore) -> Targets:
    """``{layer: {projection: Linear}}`` that a prune with these ``targets``/``ignore`` options prunes."""
    from .architectures import decoder_layers, layer_projections

    patterns = [re.compile(p) for p in ignore]
    targets = {}
    for idx, layer in enumerate(decoder_layers(model, spec)):
        keep = {
            p: lin
            for p, lin in layer_projections(layer, spec, keys).items()
            if not any(r.search(f"{spec.layers}.{idx}.{spec.projections[p]}") for r in patterns)
        }
        if keep:
            targets[idx] = keep
    return targets


def dense_numel_of(targets: Targets, spec, dense_shapes: dict) -> dict[tuple[int, str], int]:
    """Each target's parameter count in the dense model (its current one if ``dense_shapes`` lacks it)."""
    out = {}
    for idx, projs in targets.items():
        for proj, lin in projs.items():
            path = spec.projections[proj]
            shape = dense_shapes.get(f"{spec.layers}.{idx}.{path}")
            out[(idx, proj)] = math.prod(shape) if shape and path not in spec.fused else lin.weight.numel()
    return out


def record_of(model, config=None, report=None):
    """``(PrunedConfig, PruningReport)`` given, or carried by the model (``mosaic_config``/``mosaic_report``)."""
    config = config if config is not None else getattr(model, "mosaic_config", None)
    report = report if report is not None else getattr(model, "mosaic_report", None)
    if report is None and getattr(model, "mosaic_sidecar", None) is not None:
        report = model.mosaic_sidecar["report"]
    if isinstance(report, dict):
        report = PruningReport.from_dict(report)
    if config is None or report is None:
        raise ValueError(
            "this model carries no Mosaic pruning record (mosaic_config/mosaic_report): prune it with "
            "Pruner.prune or load it with PrunedModelForCausalLM.from_pretrained"
        )
    return config, report


def measured_counts(model, config, dense_shapes: dict) -> dict:
    """``{(layer, projection): (zeros incl. removed, dense numel)}`` counted from the weights now."""
    spec = _spec(model)
    targets = select_targets(model, spec, config.targets, config.ignore)
    return count_zeros(targets, dense_numel_of(targets, spec, dense_shapes))


def measured_sparsity(model) -> float | None:
    """The global sparsity of a model carrying a pruning record, counted from its weights (``None`` without one)."""
    try:
        config, report = record_of(model)
    except ValueError:
        return None
    return achieved(measured_counts(model, config, report.dense_shapes))[0]


def measured_report(model, config, report: PruningReport) -> PruningReport:
    """``report`` with its sparsity figures counted again from the model's weights."""
    if not report.dense_shapes:  # written by an older version: nothing to measure against
        return report
    counts = measured_counts(model, config, report.dense_shapes)
    glob, per_projection, per_layer, per_type = achieved(counts)
    dense = sum(n for _, n in counts.values())
    kept = sum(
        lin.weight.numel()
        for projs in select_targets(model, _spec(model), config.targets, config.ignore).values()
        for lin in projs.values()
    )
    return dataclasses.replace(
        report,
        achieved_sparsity=round(glob, 6),
        per_projection=per_projection,
        per_layer=per_layer,
        per_type=per_type,
        structured_sparsity=round((dense - kept) / max(1, dense), 6),
    )


_SUMMARY = ("achieved_sparsity", "structured_sparsity", "per_type", "per_layer", "per_projection")


def summary_mismatch(stated: PruningReport, measured: PruningReport, tol: float = 2e-6) -> str | None:
    """The first sparsity figure of ``stated`` (a sidecar's report) that the weights' recount ``measured``
    contradicts, as ``"field: stated X, counted Y"``; None when every figure agrees (to the stored rounding)."""

    def flat(value, prefix):
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}[{key}]").items()}
        return {prefix: value}

    for name in _SUMMARY:
        want, got = flat(getattr(stated, name), name), flat(getattr(measured, name), name)
        for key in sorted(set(want) | set(got)):
            a, b = want.get(key), got.get(key)
            if a is None or b is None or not isinstance(a, (int, float)) or abs(float(a) - float(b)) > tol:
                return f"{key}: stated {a!r}, counted {b!r}"
    return None


def warn_if_zeros_lost(report: PruningReport, context: str) -> bool:
    """Warn (one line, ``SparsityLostWarning``) when the weights hold fewer zeros than the prune left."""
    import warnings

    from .exceptions import SparsityLostWarning

    after = report.sparsity_after_prune
    if after is None or report.achieved_sparsity >= after - 1e-6:
        return False
    warnings.warn(
        f"{context}: the weights hold sparsity {report.achieved_sparsity:.4f} but the prune left {after:.4f} — zeros "
        "were lost (fine-tuning without SparsityPreservingCallback, or peft's merge_and_unload instead of "
        "optimum_mosaic.adapters.merge_and_remask)",
        SparsityLostWarning,
        stacklevel=3,
    )
    return True


def _spec(model):
    from .architectures import get_arch_spec

    return get_arch_spec(model)


def count_zeros(targets: Targets, dense_numel: dict | None = None) -> dict[tuple[int, str], tuple[int, int]]:
    """``{(layer, projection): (zeros, numel)}``; with ``dense_numel``, weights removed by structured
    pruning count as zeros of the dense projection."""
    counts = {}
    for layer, projs in targets.items():
        for proj, lin in projs.items():
            zeros, numel = int((lin.weight == 0).count_nonzero()), lin.weight.numel()  # .sum() would copy to int64
            if dense_numel is not None:
                zeros, numel = zeros + dense_numel[(layer, proj)] - numel, dense_numel[(layer, proj)]
            counts[(layer, proj)] = (zeros, numel)
    return counts


def achieved(counts: dict[tuple[int, str], tuple[int, int]]) -> tuple[float, dict, dict, dict]:
    """Global, per-projection, per-layer and per-type sparsity from zero counts (numel-weighted)."""

    def ratio(keys) -> float:
        zeros = sum(counts[k][0] for k in keys)
        return zeros / max(1, sum(counts[k][1] for k in keys))

    per_projection: dict[str, dict[str, float]] = {}
    for layer, proj in counts:
        per_projection.setdefault(str(layer), {})[proj] = round(ratio([(layer, proj)]), 6)
    layers = sorted({k[0] for k in counts})
    types = list(dict.fromkeys(k[1] for k in counts))
    per_layer = {str(i): round(ratio([k for k in counts if k[0] == i]), 6) for i in layers}
    per_type = {p: round(ratio([k for k in counts if k[1] == p]), 6) for p in types}
    return ratio(list(counts)), per_projection, per_layer, per_type


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A small Markdown table."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    body = ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, *body])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def prunable_numel(targets: Targets) -> dict[tuple[int, str], int]:
    return {(layer, proj): lin.weight.numel() for layer, projs in targets.items() for proj, lin in projs.items()}
