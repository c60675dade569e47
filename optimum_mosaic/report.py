"""What a prune achieved: sparsity per projection, per layer, per projection type and globally."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from torch import nn

Targets = dict[int, dict[str, nn.Linear]]


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruningReport:
        """Inverse of ``to_dict``; keys this version does not know (from a newer writer) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def count_zeros(targets: Targets, dense_numel: dict | None = None) -> dict[tuple[int, str], tuple[int, int]]:
    """``{(layer, projection): (zeros, numel)}``; with ``dense_numel``, weights removed by structured
    pruning count as zeros of the dense projection."""
    counts = {}
    for layer, projs in targets.items():
        for proj, lin in projs.items():
            zeros, numel = int((lin.weight == 0).sum().item()), lin.weight.numel()
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
