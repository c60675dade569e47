"""``PrunedConfig``: every option of a prune, validated, and saved as the ``mosaic_config.json`` sidecar.

Mosaic (Eccles, Wong, Varghese, arXiv 2504.06323) allocates a sparsity to every (layer, projection) pair
from the projection outlier distribution, then prunes each projection with a layer-wise method.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .architectures import PROJECTIONS

FORMAT_VERSION = 1  # dense safetensors with exact zeros: any transformers reads them
COMPRESSED_FORMAT_VERSION = 2  # projections in the bitmap format (optimum_mosaic/sparse/checkpoint.py)
FORMAT_VERSIONS = (FORMAT_VERSION, COMPRESSED_FORMAT_VERSION)
SIDECAR_NAME = "mosaic_config.json"
AUTO = "auto"
PAPER_LAMDA = 0.08  # λ of the paper's README example
PAPER_OUTLIER_THRESHOLD = 5.0  # M of the paper's README example (its argparse default is 3)
SENSITIVITY_ALPHA = 0.1  # α of the sensitivity-aware allocation (Shao et al.)
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass
class PrunedConfig:
    """Options of one prune. See the field help texts; ``optimum-mosaic prune --help`` prints them."""

    sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Target fraction of zeros among the prunable weights, in (0, 1). Default 0.5, or N/M for an N:M pattern."
        },
    )
    allocation: str | None = field(
        default="uniform",
        metadata={
            "help": "How sparsity is spread: uniform | layer (OWL) | projection (Mosaic POD) | projection_official | "
            "sensitivity (input-Hessian proxy) | sensitivity_hutchinson (loss-Hessian trace). Default uniform "
            "(measured best within the default's time budget; see benchmarks/RESULTS.md)."
        },
    )
    pruner: str = field(
        default="alps_warm",
        metadata={
            "help": "Unstructured method: magnitude | wanda | sparsegpt | sparsegpt_refit | alps | alps_warm | apt. "
            "Default alps_warm (ALPS started from SparseGPT's solution)."
        },
    )
    pattern: str = field(
        default="unstructured",
        metadata={"help": "'unstructured', or 'N:M' = N zeros in every M consecutive input weights (e.g. 2:4)."},
    )
    lamda: float | str | None = field(
        default=None,
        metadata={
            "help": "λ: sparsities stay in [S-|λ|, S+|λ|]; λ > 0 keeps more weights where outliers are denser "
            "(the paper), λ < 0 the reverse; 'auto' searches both signs on held-out calibration windows. "
            "Default 'auto' for projection, 0.1 (the paper's α) for sensitivity, 0.08 otherwise."
        },
    )
    outlier_threshold: float | str | None = field(
        default=None,
        metadata={
            "help": "M: a Wanda score counts as an outlier above M x the mean, or 'auto'. Default 'auto' for projection, 5 otherwise."
        },
    )
    structured_sparsity: float = field(
        default=0.0,
        metadata={
            "help": "β: about this fraction of the prunable parameters is removed as whole units (MLP channels, attention "
            "heads), chosen and compensated by structured OBS inside the layer walk, before unstructured pruning; "
            "composite when 0 < β < sparsity, structured only when β = sparsity."
        },
    )
    structured_units: list[str] = field(
        default_factory=lambda: ["mlp"],
        metadata={
            "help": "Units structured pruning may remove: mlp (channels) and/or attention (query heads; key/value heads "
            "only as whole GQA groups). Default mlp: measured better than mlp + attention on held-out calibration windows."
        },
    )
    nsamples: int = field(default=128, metadata={"help": "Number of calibration windows."})
    seqlen: int = field(default=2048, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration window sampler."})
    calibration_corpus: str = field(
        default="mixed",
        metadata={
            "help": "Bundled corpus calibrated on when no calibration data is passed: mixed (default: fiction, Python "
            "code and technical prose; data/README.md) or austen (five novels)."
        },
    )
    targets: list[str] = field(
        default_factory=lambda: list(PROJECTIONS),
        metadata={"help": "Projections to prune (canonical keys q k v o gate up down)."},
    )
    ignore: list[str] = field(
        default_factory=list,
        metadata={"help": "Regular expressions; linear modules whose full name matches one are left dense."},
    )
    dampening: float = field(
        default=0.01,
        metadata={
            "help": "Ridge added to diag(H), as a fraction of its mean, in every Hessian solve (SparseGPT, ALPS, "
            "structured OBS)."
        },
    )
    block_size: int = field(default=128, metadata={"help": "SparseGPT: columns per lazy-update block."})
    saliency: str = field(
        default="obs",
        metadata={"help": "SparseGPT mask score: obs (w²/[H⁻¹]_jj) or isc (Shao et al.: w²·(H_jj + 1/[H⁻¹]_jj))."},
    )
    admm_iterations: int | None = field(
        default=None,
        metadata={"help": "alps, alps_warm: cap on ADMM iterations. Default: the method's (alps 300, alps_warm 6)."},
    )
    admm_rho: float | None = field(
        default=None,
        metadata={"help": "alps, alps_warm: initial ADMM penalty ρ₀. Default: the method's (alps 0.1, alps_warm 0.5)."},
    )
    cg_iterations: int | None = field(
        default=None,
        metadata={
            "help": "sparsegpt_refit, alps, alps_warm: masked-CG refit steps. Default: the method's (10, 10, 3)."
        },
    )
    hessian_samples: int = field(
        default=16,
        metadata={"help": "sensitivity_hutchinson: calibration windows (one Rademacher vector each) in the estimate."},
    )
    sequential: str = field(
        default="projection",
        metadata={
            "help": "projection: every projection is pruned just before it runs, seeing the outputs of the pruned "
            "projections before it (one forward per layer when all windows fit one batch; in several batches, one "
            "forward per input group that stops at that input, plus one for the outputs). layer: statistics from the "
            "dense layer, then a second forward of the pruned layer (two forwards per layer)."
        },
    )
    dense_target: bool = field(
        default=False,
        metadata={
            "help": "alps, alps_warm: solve each projection for the dense model's outputs, ‖XŴᵀ − X_dWᵀ‖² (X_d: the "
            "dense model's inputs of the same tokens), instead of its own outputs on the pruned inputs, ‖XŴᵀ − XWᵀ‖²: "
            "each layer also corrects the error the pruned layers before it left. A second, dense stream of "
            "activations is walked beside the pruned one."
        },
    )
    search_samples: int = field(
        default=8, metadata={"help": "Extra held-out calibration windows that score the 'auto' λ/M candidates."}
    )
    search_pruner: str | None = field(
        default=None,
        metadata={
            "help": "Unstructured method that prunes the 'auto' λ/M candidates. Default: pruner itself (the winner's "
            "weights are kept). Another (e.g. sparsegpt) prunes the candidates, then the winner is pruned with pruner."
        },
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of the sidecar format."})

    def __post_init__(self) -> None:
        self._check_types()
        nm = self.nm
        if self.allocation is None:
            self.allocation = "uniform"
        if self.sparsity is None:
            self.sparsity = nm[0] / nm[1] if nm else 0.5
        projection = self.allocation == "projection"
        if self.lamda is None:
            self.lamda = (
                AUTO if projection else SENSITIVITY_ALPHA if self.allocation.startswith("sensitivity") else PAPER_LAMDA
            )
        if self.outlier_threshold is None:
            self.outlier_threshold = AUTO if projection else PAPER_OUTLIER_THRESHOLD
        self._validate()

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, ``None`` for unstructured."""
        if self.pattern == "unstructured":
            return None
        match = _NM.match(str(self.pattern))
        if not match:
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {self.pattern!r}")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {self.pattern!r}: N:M needs 0 < N < M (N zeros in every M weights)")
        return n, m

    @property
    def search_grid(self) -> bool:
        return AUTO in (self.lamda, self.outlier_threshold)

    def validate(self) -> None:
        """Check every field again (``Pruner.prune`` calls this: fields may have been changed since construction)."""
        self._check_types()
        self._validate()

    def _check_types(self) -> None:
        """Numbers must be numbers (``sparsity="0.5"`` and ``nsamples=2.7`` are errors); a lone string for a list
        field is one entry (``ignore="mlp"`` is one regular expression, not three)."""
        for name in _LIST_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name}: must be a list of str, got {value!r}")
            else:
                setattr(self, name, list(value))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            _check(_is_int(value), name, f"must be an integer, got {value!r} ({type(value).__name__})")
            setattr(self, name, int(value))  # numpy integers become plain ints (JSON, comparisons)
        for name in _NUMBER_FIELDS:
            value = getattr(self, name)
            auto = name in ("lamda", "outlier_threshold") and value in (AUTO, None)
            none_ok = name == "sparsity" and value is None
            _check(
                auto or none_ok or _is_number(value),
                name,
                f"must be a number{' or ' + repr(AUTO) if name in ('lamda', 'outlier_threshold') else ''}, "
                f"got {value!r} ({type(value).__name__})",
            )
        for name in ("allocation", "pruner", "pattern", "saliency", "sequential", "search_pruner"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), name, f"must be a str, got {value!r}")

    def _validate(self) -> None:
        _check(0.0 < float(self.sparsity) < 1.0, "sparsity", f"must be in (0, 1), got {self.sparsity}")
        self._validate_methods()
        self._validate_options()

    def _validate_methods(self) -> None:
        from .registry import BUILTIN_METHODS, is_method, list_methods

        nm = self.nm
        if nm and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(
                f"sparsity: pattern {self.pattern} fixes the sparsity to N/M = {nm[0] / nm[1]:g}, got {self.sparsity}"
            )
        if not is_method("allocation", self.allocation):
            raise ValueError(f"allocation: must be one of {list_methods('allocation')}, got {self.allocation!r}")
        if nm and self.allocation != "uniform":
            raise ValueError(
                "allocation: an N:M pattern fixes every projection's sparsity, so allocation must be 'uniform'"
            )
        for name in ("pruner", "search_pruner"):
            value = getattr(self, name)
            if (value is not None or name == "pruner") and not is_method("unstructured", value):
                raise ValueError(f"{name}: must be one of {list_methods('unstructured')}, got {value!r}")
        builtin = self.pruner in BUILTIN_METHODS["unstructured"]
        for name, users in _KERNEL_OPTIONS.items():  # silently ignored by the other built-in pruners otherwise
            if getattr(self, name) is not None and builtin and self.pruner not in users:
                raise ValueError(f"{name}: used only by pruner {' / '.join(users)}, not {self.pruner!r}; drop it")
        if self.search_grid and not self.allocation.startswith("projection"):
            auto = [n for n in ("lamda", "outlier_threshold") if getattr(self, n) == AUTO]
            raise ValueError(
                f"{'/'.join(auto)}: 'auto' is searched only for allocation 'projection' or 'projection_official'; "
                f"with allocation={self.allocation!r} give a number (e.g. lamda={PAPER_LAMDA}, "
                f"outlier_threshold={PAPER_OUTLIER_THRESHOLD:g}) or leave it unset for the default"
            )

    def _validate_options(self) -> None:
        nm = self.nm
        if self.lamda != AUTO:
            self.lamda = float(self.lamda)
            _check(-0.5 < self.lamda < 0.5, "lamda", f"must be 'auto' or in (-0.5, 0.5), got {self.lamda}")
        if self.outlier_threshold != AUTO:
            self.outlier_threshold = m = float(self.outlier_threshold)
            _check(m > 1.0, "outlier_threshold", f"must be 'auto' or > 1, got {m}")
        _check(
            0.0 <= float(self.structured_sparsity) <= self.sparsity,
            "structured_sparsity",
            f"must be in [0, sparsity={self.sparsity}], got {self.structured_sparsity}",
        )
        if nm and self.structured_sparsity:
            raise ValueError("structured_sparsity: N:M patterns cannot be combined with structured removal")
        bad_units = sorted(set(self.structured_units) - {"mlp", "attention"})
        _check(
            not bad_units and self.structured_units,
            "structured_units",
            f"must be a non-empty subset of ['mlp', 'attention'], got {self.structured_units}",
        )
        for name, choices in (("sequential", ("projection", "layer")), ("saliency", ("obs", "isc")),
                              ("calibration_corpus", ("austen", "mixed"))):  # fmt: skip
            value = getattr(self, name)
            _check(value in choices, name, f"must be {' or '.join(map(repr, choices))}, got {value!r}")
        for name in ("nsamples", "seqlen", "block_size", "search_samples", "hessian_samples"):
            _check(
                int(getattr(self, name)) >= (2 if name == "seqlen" else 1),
                name,
                f"must be a positive integer, got {getattr(self, name)}",
            )
        _check(self.dampening > 0, "dampening", f"must be > 0, got {self.dampening}")
        for name in ("admm_iterations", "cg_iterations"):
            value = getattr(self, name)
            _check(value is None or int(value) >= 0, name, f"must be None or an integer >= 0, got {value}")
        rho = self.admm_rho
        _check(rho is None or (_is_number(rho) and rho > 0), "admm_rho", f"must be None or a number > 0, got {rho!r}")
        _check(isinstance(self.dense_target, bool), "dense_target", f"must be True or False, got {self.dense_target!r}")
        if self.dense_target:
            _check(
                self.pruner in ("alps", "alps_warm"),
                "dense_target",
                f"is solved by pruner 'alps' or 'alps_warm' only, not {self.pruner!r}",
            )
            _check(self.sequential == "projection", "dense_target", "needs sequential='projection'")
            _check(not self.structured_sparsity, "dense_target", "cannot be combined with structured removal yet")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        _check(
            not unknown and self.targets,
            "targets",
            f"must be a non-empty subset of {list(PROJECTIONS)}, got unknown {unknown}",
        )
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"ignore: {pattern!r} is not a valid regular expression ({err})") from None
        from .sidecar import format_version_problem  # the sidecar module reads configs: imported here, not above

        problem = format_version_problem(self.format_version)
        if problem:
            raise ValueError(problem)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PrunedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PrunedConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PrunedConfig:
        """Read the ``config`` part of a checkpoint's ``mosaic_config.json``."""
        from .sidecar import read_sidecar

        return cls.from_dict(read_sidecar(directory)["config"])


_LIST_FIELDS = ("structured_units", "targets", "ignore")
_KERNEL_OPTIONS = {
    "admm_rho": ("alps", "alps_warm"),
    "admm_iterations": ("alps", "alps_warm"),
    "cg_iterations": ("alps", "alps_warm", "sparsegpt_refit"),
}
_INT_FIELDS = ("nsamples", "seqlen", "seed", "block_size", "hessian_samples", "search_samples", "format_version")
_NUMBER_FIELDS = ("sparsity", "lamda", "outlier_threshold", "structured_sparsity", "dampening")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value  # not NaN


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")
