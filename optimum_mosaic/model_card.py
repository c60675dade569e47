"""The model card of a Mosaic-pruned model, rendered from its sidecar with ``model_cards/template.md``.

``render_card`` builds a ``huggingface_hub.ModelCard`` from a checkpoint's ``mosaic_config.json`` (method,
hyper-parameters, per-layer × per-projection sparsity, calibration, perplexity, size) with the Jinja template;
it makes no network call. An existing card is extended: its text and metadata stay, tags are merged, and only
the section between the optimum-mosaic markers is added or replaced (rendering twice gives the same card).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

CARD_NAME = "README.md"
MARK_START = "<!-- optimum-mosaic:start -->"
MARK_END = "<!-- optimum-mosaic:end -->"
TAGS = ("pruned", "sparse", "mosaic", "optimum-mosaic")
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "chat_template.*",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALLOCATIONS = {
    "uniform": "the same sparsity in every projection",
    "layer": "OWL, one sparsity per layer from its outlier ratio",
    "projection": "Mosaic, one sparsity per (layer, projection) from the projection outlier distribution",
    "projection_official": "Mosaic as in the released code (OWL plus an offset per projection type)",
    "sensitivity": "sensitivity-aware mixed sparsity, ranked by the input-Hessian trace proxy",
    "sensitivity_hutchinson": "sensitivity-aware mixed sparsity, ranked by Hutchinson loss-Hessian traces",
}
_PRUNERS = {
    "magnitude": "smallest weight magnitudes of the whole matrix",
    "wanda": "smallest magnitude × input-activation norm in each output row",
    "sparsegpt": "SparseGPT, second-order pruning with weight updates",
    "alps": "ALPS, ADMM layer-wise pruning with conjugate-gradient refinement",
    "alps_warm": "ALPS started from SparseGPT's solution: a few ADMM iterations, then a conjugate-gradient refit",
    "sparsegpt_refit": "SparseGPT's mask, then the kept weights refitted by least squares (conjugate gradient)",
    "apt": "APT-style joint multi-weight OBS pruning per column block",
}


@dataclass
class _Facts:
    """What a card is made of: the sidecar plus what only the files (or the model) can tell."""

    sidecar: dict
    parameters: int
    size: str
    dtypes: list[str]
    name_or_path: str | None = None
    card: str | None = None  # README.md stored next to the weights
    name: str | None = None


# -- facts ------------------------------------------------------------------------------------------
def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length))


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


_PACKED = (".weight_bitmaps", ".weight_values", ".weight_offsets")  # a projection in the bitmap format


def _parameter_count(tensors: dict[str, list[int]], shapes: dict) -> int:
    """Parameters the checkpoint represents: its tensors, with each projection stored in the bitmap format
    counted as its dense ``out × in`` (from the sidecar's shapes) instead of its bitmap/value/offset bytes."""
    packed = {name.rsplit(".weight_", 1)[0] for name in tensors if name.endswith(_PACKED)}
    plain = sum(math.prod(shape) for name, shape in tensors.items() if not name.endswith(_PACKED))
    return plain + sum(math.prod(shapes[name]) for name in packed)


def facts_from_dir(path: Path) -> _Facts:
    from .sidecar import read_sidecar

    sidecar = read_sidecar(path)
    files = sorted(path.glob("*.safetensors"))
    headers = {k: t for f in files for k, t in _safetensors_header(f).items() if k != "__metadata__"}
    tensors = list(headers.values())
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    readme = path / "README.md"
    return _Facts(
        sidecar=sidecar,
        parameters=_parameter_count({k: t["shape"] for k, t in headers.items()}, sidecar.get("shapes", {})),
        size=f"{_human_bytes(sum(f.stat().st_size for f in files))} in {len(files)} safetensors file(s)",
        dtypes=sorted({t["dtype"] for t in tensors}),
        name_or_path=sidecar.get("base_model") or config.get("_name_or_path"),
        card=readme.read_text(encoding="utf-8") if readme.is_file() else None,
        name=path.resolve().name,
    )


def model_record(model) -> tuple:
    """``(PrunedConfig, report dict)`` of a pruned model, its sparsity counted from its weights now."""
    from .report import measured_report, record_of

    config, report = record_of(model)
    return config, measured_report(model, config, report).to_dict()


def _model_sidecar(model) -> dict:
    from .serialization import linear_summary, versions

    config, report = model_record(model)
    shapes, zeros = linear_summary(model)
    return {"config": config.to_dict(), "report": report, "shapes": shapes, "zeros": zeros, "versions": versions()}


def _facts_from_model(model) -> _Facts:
    params = list(model.parameters())
    packed = [b for name, b in model.named_buffers() if name.endswith(_PACKED)]  # projections on the sparse kernel
    tensor_bytes = sum(t.numel() * t.element_size() for t in params + packed)
    sidecar = _model_sidecar(model)
    tensors = {name: list(t.shape) for name, t in model.named_parameters()}
    tensors.update({name: list(t.shape) for name, t in model.named_buffers() if name.endswith(_PACKED)})
    source = Path(str(getattr(model, "name_or_path", "") or "")) / "README.md"
    return _Facts(
        sidecar=sidecar,
        parameters=_parameter_count(tensors, sidecar["shapes"]),
        size=f"≈ {_human_bytes(tensor_bytes)} of tensors (not saved yet)",
        dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        name_or_path=getattr(model, "name_or_path", None),
        card=source.read_text(encoding="utf-8") if is_mosaic_dir(source.parent) else None,
    )


def is_mosaic_dir(path: Path) -> bool:
    """A Mosaic checkpoint with a card (``mosaic_config.json`` and README.md)."""
    return str(path) not in ("", ".") and (path / "mosaic_config.json").is_file() and (path / CARD_NAME).is_file()


def looks_like_repo_id(text: str | None) -> bool:
    """``owner/name`` that is not a local path: only those become card metadata ``base_model``."""
    ok = bool(text) and bool(_REPO_ID.match(text)) and not Path(text).exists()
    return ok and ".." not in text and not text.endswith((".", "-"))


# -- card ---------------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "–" if value is None else f"{100 * float(value):.2f} %"


def _searched(value, configured, what: str) -> str:
    if value is None:
        return f"not used by this allocation ({what})"
    chosen = " (chosen by the λ/M search)" if configured == "auto" else ""
    return f"{float(value):g}{chosen}"


def _hyperparameters(config: dict, report: dict) -> list[list[str]]:
    structured = "none"
    if config.get("structured_sparsity"):
        units = " and ".join(
            {"mlp": "MLP channels", "attention": "attention heads"}[u] for u in config["structured_units"]
        )
        structured = (
            f"target {_pct(config['structured_sparsity'])}, removed {_pct(report.get('structured_sparsity'))} "
            f"of the prunable weights as whole units ({units})"
        )
    rows = [
        ["pruned model", _source(report.get("source") or {})],
        ["allocation", f"`{config['allocation']}`: {_ALLOCATIONS.get(config['allocation'], '')}"],
        ["pruner", f"`{config['pruner']}`: {_PRUNERS.get(config['pruner'], '')}"],
        ["target sparsity S", _pct(config["sparsity"])],
        ["achieved sparsity", _pct(report["achieved_sparsity"])],
        ["λ (allocation spread)", _searched(report.get("lamda"), config.get("lamda"), "λ")],
        ["M (outlier threshold)", _searched(report.get("outlier_threshold"), config.get("outlier_threshold"), "M")],
        ["pattern", f"`{config['pattern']}`"],
        ["structured sparsity β", structured],
        ["calibration windows", _windows(report)],
        ["pruned projections", ", ".join(config["targets"])],
    ]
    if config.get("ignore"):
        rows.append(["left dense", ", ".join(f"`{p}`" for p in config["ignore"])])
    if config["pruner"] == "sparsegpt":
        rows.append(["SparseGPT", f"dampening {config['dampening']:g}, block size {config['block_size']}"])
    return rows


def _windows(report: dict) -> str:
    """The windows the prune read (from the report's calibration record, as the calibration section)."""
    cal = report.get("calibration") or {}
    if not cal:
        return "none (this allocation and pruner need no data)"
    return f"{cal['nsamples']} × {cal['seqlen']} tokens, seed {cal['seed']}"


def _source(source: dict) -> str:
    if not source:
        return "unrecorded"
    text = str(source.get("description") or source.get("model"))
    return f"{text} (licence: {source['licence']})" if source.get("licence") else text


def _calibration(report: dict) -> str:
    cal = report.get("calibration") or {}
    if not cal:
        return "No calibration data was used: this allocation and pruner need none."
    sources = {
        "bundled Austen novels": "the Jane Austen novels bundled with optimum-mosaic",
        "user data": "user-provided data (its content is not recorded in the checkpoint)",
    }
    text = f"{cal['nsamples']} windows × {cal['seqlen']} tokens (seed {cal['seed']}) sampled from "
    text += sources.get(cal.get("source"), str(cal.get("source", "unrecorded data")))
    if cal.get("held_out"):
        text += f"; {cal['held_out']} further held-out windows scored the λ/M candidates"
    return text + "."


def _sparsity_table(report: dict) -> tuple[list[str], list[list[str]]]:
    from .architectures import PROJECTIONS

    per_projection = report["per_projection"]
    present = {p for projs in per_projection.values() for p in projs}
    projs = [p for p in PROJECTIONS if p in present]
    rows = [
        [layer, *(_pct(per_projection[layer].get(p)) for p in projs), _pct(report["per_layer"].get(layer))]
        for layer in sorted(per_projection, key=int)
    ]
    totals = [_pct(report["per_type"].get(p)) for p in projs]
    rows.append(["**all**", *totals, f"**{_pct(report['achieved_sparsity'])}**"])
    return ["layer", *projs, "layer total"], rows


def _evaluation(report: dict) -> dict | None:
    ev = report.get("evaluation") or {}
    if ev.get("perplexity_before") is None and ev.get("perplexity_after") is None:
        return None
    fmt = lambda v: "–" if v is None else f"{float(v):.2f}"  # noqa: E731
    return {
        "before": fmt(ev.get("perplexity_before")),
        "after": fmt(ev.get("perplexity_after")),
        "text": ev.get("text") or "held-out text",
        "windows": ev.get("windows", "?"),
        "seqlen": ev.get("seqlen", "?"),
    }


def _structured_removed(sidecar: dict) -> int:
    beta = float(sidecar["report"].get("structured_sparsity") or 0.0)
    kept = sum(math.prod(shape) for shape in sidecar.get("shapes", {}).values())
    return round(kept * beta / (1.0 - beta)) if 0 < beta < 1 else 0


def _template_fields(facts: _Facts, base_model: str | None, repo_id: str | None) -> dict:
    sidecar = facts.sidecar
    config, report = sidecar["config"], sidecar["report"]
    zeros = sum(sidecar.get("zeros", {}).values())
    removed = _structured_removed(sidecar)
    columns, rows = _sparsity_table(report)
    size = [
        ["parameters", f"{facts.parameters:,}"],
        ["zeros in the pruned projections", f"{zeros:,} ({facts.parameters - zeros:,} non-zero parameters)"],
        ["safetensors size", facts.size],
        ["dtype", ", ".join(facts.dtypes)],
    ]
    if removed:
        size.append(["removed by structured pruning", f"≈ {removed:,} parameters"])
    structure = f"; {_pct(report.get('structured_sparsity'))} of them removed as whole units" if removed else ""
    dense = sum(math.prod(shape) for shape in (report.get("dense_shapes") or sidecar.get("shapes", {})).values())
    summary = (
        f"**{_pct(report['achieved_sparsity'])}** sparsity, counted from the saved weights: exact zeros among the "
        f"{dense:,} weights of the pruned decoder projections of the dense model, weights removed by structured "
        f"pruning counting as zeros (target {_pct(config['sparsity'])}{structure}). `{config['allocation']}` "
        f"allocation, `{config['pruner']}` pruner. Embeddings, norms and `lm_head` stay dense."
    )
    lost = report.get("sparsity_after_prune")
    if lost is not None and report["achieved_sparsity"] < lost - 1e-6:
        summary += (
            f"\n\n**Warning:** the prune left {_pct(lost)}; these weights hold only {_pct(report['achieved_sparsity'])}"
            " (zeros were lost after pruning, e.g. by fine-tuning without the masks)."
        )
    name = (repo_id or "").split("/")[-1] or facts.name or "Mosaic-pruned model"
    return {
        "model_name": name,
        "base_model": base_model,
        "summary": summary,
        "hyperparameters": _hyperparameters(config, report),
        "calibration": _calibration(report),
        "sparsity_columns": columns,
        "sparsity_rows": rows,
        "evaluation": _evaluation(report),
        "zero_shot": (report.get("evaluation") or {}).get("tasks") or [],
        "size": size,
        "structured": bool(removed),
        "structured_removed": f"≈ {removed:,} parameters ({_pct(report.get('structured_sparsity'))} of the prunable weights)",
        "nm_pattern": None if config["pattern"] == "unstructured" else config["pattern"],
        "compressed": sidecar.get("format_version") == 2 or "compressed" in sidecar,
        "repo_id": repo_id or "path/to/checkpoint",
        "remote_code": bool(report.get("layer_shapes")),
        "notes": list(report.get("notes") or []),
        "versions": ", ".join(f"{k} {v}" for k, v in (sidecar.get("versions") or {}).items()) or "unrecorded",
    }


def template_path() -> Path:
    """The packaged Jinja template (``model_cards/template.md``, shipped as ``optimum_mosaic.model_cards``)."""
    from importlib.resources import files

    return Path(str(files("optimum_mosaic.model_cards") / "template.md"))


def _section(text: str) -> str | None:
    start, end = text.find(MARK_START), text.find(MARK_END)
    return text[start : end + len(MARK_END)] if start != -1 and end > start else None


def _merge_tags(*groups) -> list[str]:
    merged = []
    for group in groups:
        group = [group] if isinstance(group, str) else list(group or [])
        merged += [t for t in group if t not in merged]
    return merged


def _extend(existing: str, fresh, base_model: str | None, explicit_base: bool):
    """``existing`` with ``fresh``'s Mosaic section spliced in and the metadata merged."""
    from huggingface_hub import ModelCard

    card = ModelCard(existing, ignore_metadata_errors=True)
    data = card.data
    data.tags = _merge_tags(data.tags, fresh.data.tags)
    data.library_name = data.library_name or fresh.data.library_name
    data.pipeline_tag = data.pipeline_tag or fresh.data.pipeline_tag
    data.license = data.license or fresh.data.license
    if base_model and (explicit_base or not data.base_model):
        data.base_model = base_model
    section, text = _section(fresh.text), card.text
    old = _section(text)
    if old is not None:
        card.text = text.replace(old, section, 1)
    else:
        card.text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    return ModelCard(str(card), ignore_metadata_errors=True)


def render(facts: _Facts, base_model, existing, repo_id, tags):
    from huggingface_hub import ModelCard, ModelCardData

    explicit = base_model is not None
    source = facts.sidecar["report"].get("source") or {}
    if base_model is None and looks_like_repo_id(source.get("base_model")):
        base_model = source["base_model"]
    if base_model is None and looks_like_repo_id(facts.name_or_path):
        base_model = facts.name_or_path
    licence = source.get("licence")
    data = ModelCardData(
        license=licence,
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=_merge_tags(TAGS, tags),
    )
    fields = _template_fields(facts, base_model, repo_id)
    fresh = ModelCard.from_template(data, template_path=str(template_path()), **fields)
    if _section(fresh.text) is None:
        raise ValueError(f"{template_path()} lacks the {MARK_START} / {MARK_END} markers")
    existing = facts.card if existing is None else existing
    if existing is None:
        return fresh
    return _extend(str(existing), fresh, base_model, explicit)


def render_card(checkpoint_dir_or_model, base_model: str | None = None, existing=None, *, repo_id=None, tags=None):
    """The model card of a Mosaic checkpoint directory or of an in-memory pruned model (no network call).

    ``base_model``: Hub id of the model that was pruned (default: the model's ``name_or_path`` when it is a
    repo id, never a local path). ``existing``: a card (text or ``ModelCard``) to extend; default the
    README.md next to the weights. ``repo_id`` names the model and fills the usage snippet.
    """
    if isinstance(checkpoint_dir_or_model, (str, os.PathLike)):
        facts = facts_from_dir(Path(checkpoint_dir_or_model))
    else:
        facts = _facts_from_model(checkpoint_dir_or_model)
    return render(facts, base_model, existing, repo_id, tags)


def write_card(directory: Path, name: str, existing: str | None = None) -> None:
    """Write the card of the checkpoint in ``directory`` (``name``: the model's name in its title) as README.md,
    extending ``existing`` (an earlier card's text: only its optimum-mosaic section is replaced)."""
    facts = facts_from_dir(Path(directory))
    facts.name, facts.card = name, None
    (Path(directory) / CARD_NAME).write_text(str(render(facts, None, existing, None, None)), encoding="utf-8")
