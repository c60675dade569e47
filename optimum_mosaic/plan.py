"""``SparsityPlan``: a frozen mapping ``(layer, projection) -> sparsity`` and its parameter-weighted total."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType

Key = tuple[int, str]


class SparsityPlan(Mapping):
    """Immutable per-(layer, projection) sparsities, with the parameter counts they are weighted by."""

    def __init__(self, sparsity: Mapping[Key, float], numel: Mapping[Key, int]):
        if set(sparsity) != set(numel):
            raise ValueError("sparsity and numel must have the same (layer, projection) keys")
        for key, value in sparsity.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"sparsity of {key} must be in [0, 1), got {value}")
        self._sparsity = MappingProxyType(dict(sorted(sparsity.items())))
        self._numel = MappingProxyType(dict(numel))

    def __getitem__(self, key: Key) -> float:
        return self._sparsity[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._sparsity)

    def __len__(self) -> int:
        return len(self._sparsity)

    @property
    def numel(self) -> Mapping[Key, int]:
        return self._numel

    def global_sparsity(self) -> float:
        """Σ s·n / Σ n over all entries (n = the projection's parameter count)."""
        total = sum(self._numel.values())
        return sum(s * self._numel[k] for k, s in self._sparsity.items()) / total

    def to_dict(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (layer, proj), s in self._sparsity.items():
            out.setdefault(str(layer), {})[proj] = round(s, 6)
        return out

    def __repr__(self) -> str:
        return f"SparsityPlan({len(self)} entries, global={self.global_sparsity():.4f})"
