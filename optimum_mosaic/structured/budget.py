"""How many units each layer gives up, from the allocation plan.

A layer whose projections the plan prunes harder (fewer outliers) gives up more structure:
the attention of layer l aims at removing ``β · s̄_l^attn / S`` of its parameters, the MLP
``β · s̄_l^mlp / S`` (``s̄`` = the plan's mean over the block's projections). Attention moves in
whole heads under the GQA constraint, so its choice is discrete; the MLP channels, fine-grained,
then absorb the difference so that the removed total is ``β`` of the prunable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
MLP_ROWS = ("gate", "up")  # projections whose rows are MLP channels (no gate in a non-GLU MLP)


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
        return 2 * self.hidden * self.head_dim * (self.heads + self.kv_heads)

    @property
    def mlp_params(self) -> int:
        return self.mlp_matrices * self.hidden * self.intermediate


@dataclass(frozen=True)
class LayerCut:
    """What one layer keeps: ``channels`` MLP channels, ``groups`` key/value heads × ``heads_per_group``."""

    channels: int
    groups: int
    heads_per_group: int


def attention_option(shape: LayerShape, remove_fraction: float) -> tuple[int, int]:
    """The (groups kept, query heads per group) whose size is closest to removing ``remove_fraction``."""
    n_rep = shape.heads // shape.kv_heads
    want = (1 - remove_fraction) * shape.attention_params
    options = [(g, r) for g in range(1, shape.kv_heads + 1) for r in range(1, n_rep + 1)]
    size = lambda g, r: 2 * shape.hidden * shape.head_dim * (g * r + g)  # noqa: E731
    return min(options, key=lambda o: (abs(size(*o) - want), -o[0] * o[1]))


def plan_cuts(
    plan, shapes: dict[int, LayerShape], structured_sparsity: float, units=("mlp", "attention"), min_keep: float = 0.1
) -> dict[int, LayerCut]:
    """Per-layer units to keep so that about ``structured_sparsity`` of the prunable parameters go."""
    sparsity = plan.global_sparsity()

    def mean(layer, keys) -> float:
        present = [plan[(layer, k)] for k in keys if (layer, k) in plan]
        return sum(present) / len(present)

    total = sum(s.attention_params + s.mlp_params for s in shapes.values())
    cuts, removed_attention = {}, 0
    for layer, shape in shapes.items():
        g, r = shape.kv_heads, shape.heads // shape.kv_heads
        if "attention" in units:
            g, r = attention_option(shape, structured_sparsity * mean(layer, ATTENTION) / sparsity)
        removed_attention += shape.attention_params - 2 * shape.hidden * shape.head_dim * (g * r + g)
        cuts[layer] = (g, r)
    # MLP channels take the rest of the budget, in proportion to the plan's MLP sparsity
    rest = max(0.0, structured_sparsity * total - removed_attention) if "mlp" in units else 0.0
    weights = {layer: mean(layer, MLP) * shapes[layer].mlp_params for layer in shapes}
    norm = sum(weights.values())
    out = {}
    for layer, shape in shapes.items():
        remove_params = rest * weights[layer] / norm
        channels = shape.intermediate - round(remove_params / (shape.mlp_matrices * shape.hidden))
        channels = max(int(min_keep * shape.intermediate), min(shape.intermediate, channels))
        out[layer] = LayerCut(channels, *cuts[layer])
    return out
