"""How many units each layer gives up: a budget across layers from comparable removal costs.

For every layer and unit kind the walk's dense pre-pass lists *options*: remove ``k`` MLP channels (greedy
structured-OBS order, ``obs.greedy_channels``) or keep ``g`` key/value groups × ``r`` query heads
(``obs.greedy_heads``), each with the parameters it removes and its cost ``ε`` divided by the layer's scale
(``Σ‖h‖²`` of the residual stream entering the layer, so that costs of different depths compare as relative
perturbations of what the next layers read). ``allocate_removal`` then minimises ``Σ cost`` subject to
``Σ params ≤ β·N`` by a Lagrangian sweep (each layer picks ``argmin cost − μ·params``; bisection on ``μ``) and
fills what is left of the budget with the cheapest further steps per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
MLP_ROWS = ("gate", "up")  # projections whose rows are MLP channels (no gate in a non-GLU MLP)
MAX_CHANNEL_REMOVAL = 0.9  # a layer keeps at least a tenth of its MLP channels


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_matrices: int = 3  # gate, up, down (2 without a gate)

    @property
    def attention_params(self) -> int:
        return self.attention_size(self.kv_heads, self.heads // self.kv_heads)

    def attention_size(self, groups: int, heads_per_group: int) -> int:
        """Parameters of q, k, v, o with ``groups`` key/value heads of ``heads_per_group`` query heads each."""
        return 2 * self.hidden * self.head_dim * (groups * heads_per_group + groups)

    @property
    def mlp_params(self) -> int:
        return self.mlp_matrices * self.hidden * self.intermediate


@dataclass(frozen=True)
class LayerCut:
    """What one layer keeps: ``channels`` MLP channels, ``groups`` key/value heads × ``heads_per_group``."""

    channels: int
    groups: int
    heads_per_group: int

    @classmethod
    def whole(cls, shape: LayerShape) -> LayerCut:
        return cls(shape.intermediate, shape.kv_heads, shape.heads // shape.kv_heads)

    def numel(self, shape: LayerShape, keys) -> dict[str, int]:
        """Parameters of each projection after the cut."""
        q = self.groups * self.heads_per_group * shape.head_dim * shape.hidden
        kv = self.groups * shape.head_dim * shape.hidden
        sizes = dict(q=q, k=kv, v=kv, o=q, gate=self.channels * shape.hidden, up=self.channels * shape.hidden)
        sizes["down"] = self.channels * shape.hidden
        return {k: sizes[k] for k in keys}


@dataclass(frozen=True)
class Option:
    """One choice for a (layer, unit kind): what is kept (``value``), parameters removed, normalised cost."""

    value: int | tuple[int, int]  # channels removed, or (groups kept, query heads per group)
    params: int
    cost: float


def allocate_removal(options: dict, budget: float) -> dict:
    """``{key: Option}`` with ``Σ params ≤ budget`` and a small ``Σ cost``; ``options[key]`` must include a
    zero-removal option. Lagrangian: for a price ``μ`` every key takes ``argmin cost − μ·params``."""

    def pick(mu: float) -> dict:
        return {key: min(opts, key=lambda o: (o.cost - mu * o.params, -o.params)) for key, opts in options.items()}

    def removed(choice: dict) -> int:
        return sum(o.params for o in choice.values())

    lo, hi = 0.0, 1.0
    while removed(pick(hi)) <= budget and hi < 1e30:
        lo, hi = hi, hi * 10
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(pick(mid)) <= budget else (lo, mid)
    choice = pick(lo)
    while True:  # fill the rest of the budget with the cheapest step per parameter that still fits
        left = budget - removed(choice)
        steps = [
            ((o.cost - choice[key].cost) / (o.params - choice[key].params), key, o)
            for key, opts in options.items()
            for o in opts
            if 0 < o.params - choice[key].params <= left
        ]
        if not steps:
            return choice
        _, key, option = min(steps, key=lambda s: (s[0], str(s[1])))
        choice[key] = option


def layer_cuts(choice: dict, shapes: dict[int, LayerShape]) -> dict[int, LayerCut]:
    """Per-layer ``LayerCut`` from ``allocate_removal``'s choice (keys ``(layer, "mlp" | "attention")``)."""
    cuts = {}
    for layer, shape in shapes.items():
        whole = LayerCut.whole(shape)
        mlp, attention = choice.get((layer, "mlp")), choice.get((layer, "attention"))
        channels = shape.intermediate - (mlp.value if mlp else 0)
        groups, per_group = attention.value if attention else (whole.groups, whole.heads_per_group)
        cut = LayerCut(channels, groups, per_group)
        if cut != whole:
            cuts[layer] = cut
    return cuts


def plan_cuts(options: dict, shapes: dict[int, LayerShape], beta: float, dense_numel: dict) -> tuple[dict, dict]:
    """``(cuts, numel)``: the per-layer cuts that remove about ``β`` of the prunable parameters at the least total
    cost, and every projection's parameter count after them (``dense_numel`` keys: ``(layer, projection)``)."""
    layers = {idx for idx, _ in options}
    shapes = {idx: shape for idx, shape in shapes.items() if idx in layers}
    cuts = layer_cuts(allocate_removal(options, beta * sum(dense_numel.values())), shapes)
    return cuts, numel_after(cuts, shapes, dense_numel)


def numel_after(cuts: dict, shapes: dict[int, LayerShape], dense_numel: dict) -> dict:
    """Every projection's parameter count once ``cuts`` are applied (keys of ``dense_numel``: ``(layer, projection)``)."""
    numel = dict(dense_numel)
    for idx, cut in cuts.items():
        keys = [p for layer, p in dense_numel if layer == idx]
        numel.update({(idx, p): n for p, n in cut.numel(shapes[idx], keys).items()})
    return numel
