"""Push a Mosaic-pruned model to the Hugging Face Hub with its generated model card (``model_card.py``).

``push_to_hub`` saves an in-memory model (or takes a checkpoint directory), creates the repo, reads the
README.md already there, and uploads weights, config, tokenizer, sidecar and card in one commit.
``attach_hub_methods(model)`` makes ``model.push_to_hub(repo_id)`` do exactly that.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import shutil
import tempfile
from pathlib import Path

from .model_card import (  # noqa: F401  (re-exported: the card API is part of the Hub API)
    MARK_END,
    MARK_START,
    TAGS,
    TOKENIZER_FILES,
    facts_from_dir,
    is_mosaic_dir,
    looks_like_repo_id,
    model_record,
    render,
    render_card,
    template_path,
)

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


# -- push ---------------------------------------------------------------------------------------------
def _source_card(source: str | None) -> str | None:
    """The card of the Mosaic checkpoint the model was loaded from (its edits outside our section are kept)."""
    readme = Path(str(source or "")) / "README.md"
    return readme.read_text(encoding="utf-8") if source and is_mosaic_dir(readme.parent) else None


def _copy_companions(source: str | None, target: Path) -> None:
    """Tokenizer files of the directory the model was loaded from."""
    source_dir = Path(str(source or ""))
    if not source or not source_dir.is_dir():
        return
    patterns = TOKENIZER_FILES
    for file in source_dir.iterdir():
        if (
            file.is_file()
            and any(fnmatch.fnmatch(file.name, p) for p in patterns)
            and not (target / file.name).exists()
        ):
            shutil.copyfile(file, target / file.name)


@contextlib.contextmanager
def _checkpoint(model_or_dir, tokenizer):
    """Yield ``(directory, name_or_path)``: the directory as is, or the model saved into a temporary one."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir)
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory: pass a pruned checkpoint directory or a pruned model")
        yield path, None
        return
    model = model_or_dir
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("push the unquantized pruned model; bitsandbytes quantization is applied at load time")
    from .serialization import save_pruned

    model_record(model)  # a clear error for a model without a pruning record
    with tempfile.TemporaryDirectory(prefix="mosaic-push-") as tmp:
        target = Path(tmp) / "checkpoint"
        name_or_path = getattr(model, "name_or_path", None)
        save_pruned(model, tokenizer, target, card=_source_card(name_or_path))  # sparsity measured from the weights
        _copy_companions(name_or_path, target)
        yield target, name_or_path


def check_pushable(directory: Path, force: bool = False) -> None:
    """The card is made from the sidecar: refuse a push whose sidecar disagrees with the weights being pushed,
    or (unless ``force``) whose weights hold fewer zeros than the prune left."""
    from .configuration import SIDECAR_NAME
    from .exceptions import CheckpointMismatchError, SparsityLostError
    from .quantization import checkpoint_tensor_reader
    from .sidecar import read_sidecar

    sidecar = read_sidecar(directory)
    read = checkpoint_tensor_reader(directory)
    for name, recorded in sidecar["zeros"].items():
        found = int((read(f"{name}.weight") == 0).sum())
        if found != recorded:
            raise CheckpointMismatchError(
                f"{name}: the weights in {directory} hold {found} zeros but {directory / SIDECAR_NAME} records "
                f"{recorded}; the card would state the wrong numbers. Re-save the model (model.save_pretrained) first."
            )
    _check_summary(directory)
    report = sidecar["report"]
    after_prune, now = report.get("sparsity_after_prune"), report["achieved_sparsity"]
    if after_prune is not None and now < after_prune - 1e-6 and not force:
        raise SparsityLostError(
            f"the weights hold sparsity {now:.4f} but the prune left {after_prune:.4f}: zeros were lost after "
            "pruning (fine-tuning without SparsityPreservingCallback, or peft's plain merge_and_unload instead of "
            "optimum_mosaic.adapters.merge_and_remask). Re-apply the masks, or push with force=True (--force) to "
            "publish the measured sparsity with a warning in the card."
        )


def _check_summary(directory: Path) -> None:
    """Load the checkpoint with its checks: a sidecar whose sparsity figures its weights contradict (edited) is
    refused before any of its figures reach a card (``CheckpointMismatchError``)."""
    import warnings

    from .exceptions import SparsityLostWarning
    from .modeling import PrunedModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityLostWarning)  # refused or stated below, with the fix
        PrunedModelForCausalLM.from_pretrained(directory, dtype="auto")


def _remote_card(api, repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub.errors import RemoteEntryNotFoundError

    with tempfile.TemporaryDirectory(prefix="mosaic-card-") as cache:
        try:
            path = api.hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=cache)
        except RemoteEntryNotFoundError:
            return None
        return Path(path).read_text(encoding="utf-8")


def _local_files(directory: Path) -> dict[str, Path]:
    files = {}
    for file in sorted(directory.rglob("*")):
        rel = file.relative_to(directory)
        if file.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            files[rel.as_posix()] = file
    return files


def _operations(api, repo_id: str, revision: str | None, directory: Path, card: str) -> list:
    """Add every local file and the card; delete remote weight files the new checkpoint does not have."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    local = _local_files(directory)
    local.pop("README.md", None)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in local.items()]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    remote = api.list_repo_files(repo_id, revision=revision)
    stale = [f for f in remote if f not in local and any(fnmatch.fnmatch(f.split("/")[-1], p) for p in _WEIGHT_FILES)]
    return ops + [CommitOperationDelete(path_in_repo=f) for f in stale]


def push_to_hub(
    model_or_dir,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    tokenizer=None,
    tags: list[str] | None = None,
    endpoint: str | None = None,
    force: bool = False,
) -> str:
    """Upload a pruned checkpoint directory, or a pruned model (saved first, with ``tokenizer`` if given),
    to ``repo_id`` with its card, in one commit. Returns the commit URL.

    ``token``: default the ``HF_TOKEN`` environment variable or the cached login, as huggingface_hub does;
    it is sent to the Hub only and never written to a file. ``revision``: a branch, created if missing.
    The card's numbers are those of the weights pushed: a directory whose weights disagree with its sidecar is
    refused, and so is (unless ``force=True``) a model holding fewer zeros than its prune left (fine-tuned
    without ``SparsityPreservingCallback``, merged with peft's plain ``merge_and_unload``); with ``force`` the
    card states the measured sparsity and says that zeros were lost.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with _checkpoint(model_or_dir, tokenizer) as (directory, name_or_path):
        check_pushable(directory, force)
        facts = facts_from_dir(directory)
        facts.name_or_path = name_or_path or facts.name_or_path
        api.create_repo(repo_id, exist_ok=True, private=private)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = _remote_card(api, repo_id, revision)
        card = render(facts, base_model, remote, repo_id, tags)
        commit = api.create_commit(
            repo_id,
            _operations(api, repo_id, revision, directory, str(card)),
            commit_message=commit_message or "Upload Mosaic-pruned model with optimum-mosaic",
            revision=revision,
        )
    return commit.commit_url


def attach_hub_methods(model):
    """Bind ``model.push_to_hub(repo_id, **options)`` to :func:`push_to_hub` (weights + sidecar + card) and
    ``model.save_pretrained(dir, **options)`` to ``serialization.save_pretrained`` (weights + sidecar, atomically)
    instead of transformers' plain ones. Returns the model."""
    from .serialization import save_pretrained

    model.push_to_hub = functools.partial(push_to_hub, model)
    model.save_pretrained = functools.partial(save_pretrained, model)
    return model
