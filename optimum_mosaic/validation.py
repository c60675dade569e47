"""Checks made before any model is loaded or any calibration window is run; each error names the option,
what was given and what is accepted (``ValueError`` subclasses, so the CLI prints them as one line)."""

from __future__ import annotations

import os
from pathlib import Path

from .exceptions import CalibrationError, MosaicError

ACCEPTED_DATA = (
    "None (the bundled corpus), text (str), a list of str, a datasets.Dataset with a 'text' column, a text file "
    "(pathlib.Path or any os.PathLike), or token ids (an integer torch.Tensor, 1-D or [windows, seqlen])"
)


class InputError(MosaicError, ValueError):
    """An argument that cannot work, found before any work was done."""


# torch's device types (torch.device's own error lists them): a typo is caught without importing torch
_DEVICE_TYPES = (
    "cpu cuda ipu xpu mkldnn opengl opencl ideep hip ve fpga maia xla lazy vulkan mps meta hpu mtia privateuseone"
).split()


def check_device(device):
    """``torch.device(device)`` after checking it exists here (``'cuda'`` without CUDA, ``'gpu'`` are errors)."""
    if isinstance(device, str) and device.split(":", 1)[0] not in _DEVICE_TYPES:
        raise InputError(f"device: {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if str(device).split(":", 1)[0] == "meta":  # shapes without data: nothing can be calibrated or pruned there
        raise InputError(f"device: {device!r} holds no data (tensors there have shapes only); use 'cpu' or 'cuda'")
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(
            f"device: {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps' ({err})"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device: {device!r} asked for, but CUDA is not available (torch {torch.__version__}); use 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device: {device!r} asked for, but MPS is not available; use 'cpu'")
    return dev


def check_model_path(name) -> str:
    """A packaged alias, an existing checkpoint directory, or a Hub id ``owner/name``; a missing local path is an
    error here (rather than a Hub lookup that retries for half a minute)."""
    from .packaged_models import PACKAGED_MODELS

    text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None
    if not text:
        raise InputError(f"model: expected a checkpoint directory, a packaged alias or a Hub id, got {name!r}")
    path = Path(text).expanduser()
    if text in PACKAGED_MODELS and not path.exists():
        return text
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise InputError(f"model: {text} is not a checkpoint directory (no config.json in it)")
        return str(path)
    parts = text.split("/")
    hub_id = len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(parts[0]).is_dir()
    if not hub_id:
        raise InputError(
            f"model: {text!r} does not exist. Give a local checkpoint directory, a packaged model alias "
            f"({', '.join(sorted(PACKAGED_MODELS))}) or a Hub id 'owner/name'."
        )
    return text


def check_hub_model(name: str, timeout: float = 10.0) -> None:
    """For a Hub id ``owner/name`` that is about to be loaded: one quick request (or, offline, a look in the cache)
    so that a missing repository or an unreachable Hub is one line at once (transformers retries the download for
    half a minute first). An unreachable Hub with the model cached switches this process to offline mode."""
    if Path(name).expanduser().exists() or name.count("/") != 1:
        return  # a local directory or a packaged alias
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from .exceptions import is_network_error

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise InputError(
                f"model: {name!r} is not in the local Hub cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to "
                "download it, or give a local checkpoint directory"
            )
        return
    try:
        HfApi().model_info(name, timeout=timeout)
    except RepositoryNotFoundError:
        raise InputError(
            f"model: {name!r} is no local directory, no packaged alias and no model on the Hub (or a private one: log "
            "in with `hf auth login` or set HF_TOKEN); check the name"
        ) from None
    except HfHubHTTPError:
        return  # gated, rate-limited...: the load itself says what it is
    except Exception as err:
        if not is_network_error(err):
            raise
        if not cached:
            raise InputError(
                f"model: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({err}) to fetch {name!r}, and it "
                "is not in the local cache: check the network connection (or HF_ENDPOINT), or give a local directory"
            ) from None
        constants.HF_HUB_OFFLINE = True  # the cached copy, without half a minute of retries first


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: must be an integer >= 1, got {value!r}")
    return value


def read_text_file(name: str, path) -> str:
    path = check_text_file(name, path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: {path} is not UTF-8 text ({err})") from None


def check_text_file(name: str, path, what: str = "calibration") -> Path:
    """An existing UTF-8 text file with text in it, as a ``Path`` (read later in pieces, as far as needed); only
    its start is read here (up to the first piece with text: bounded memory whatever its size)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{name}: {str(path)!r} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            while piece := f.read(1 << 20):
                if not piece.isspace():
                    return path
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: {path} is not UTF-8 text ({err})") from None
    raise InputError(f"{name}: {path} is empty (no text in it): give a UTF-8 file with the {what} text")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(path) -> bool:
    """Whether a local checkpoint directory holds a tokenizer (a Hub id or alias is assumed to)."""
    folder = Path(path)
    return not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)


def no_tokenizer_error(path, why: str) -> InputError:
    return InputError(
        f"model: {path} holds no tokenizer (no tokenizer.json or tokenizer_config.json: model.save_pretrained(dir) "
        f"saves none), and {why}: pass --tokenizer DIR_OR_HUB_ID (the tokenizer of the model it came from), or save "
        f"one into it with tokenizer.save_pretrained({str(path)!r})"
    )


def _looks_like_file_name(text: str) -> bool:
    if "\n" in text or not 0 < len(text) < 1024:
        return False
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: text
        return False


def check_calibration_data(data, tokenizer, vocab_size: int | None):
    """The calibration data in a form ``calibration.data`` accepts, or an error saying what is accepted."""
    import torch

    if data is None:
        return None
    if isinstance(data, os.PathLike):
        data = check_text_file("calibration_dataset", data)  # read later, only as far as the windows need
    elif isinstance(data, str) and _looks_like_file_name(data):
        raise CalibrationError(
            f"calibration_dataset: the string {data!r} names a file; a str is calibrated on as text. Pass "
            f"pathlib.Path({data!r}) to read the file, or the text itself."
        )
    if isinstance(data, torch.Tensor):
        return _check_ids(data, vocab_size)
    if isinstance(data, dict):
        hint = " (a DatasetDict: pick a split, e.g. ds['train'])" if hasattr(data, "column_names") else ""
        raise CalibrationError(f"calibration_dataset: a dict is not accepted{hint}; accepted: {ACCEPTED_DATA}")
    is_dataset = hasattr(data, "column_names")
    if isinstance(data, (list, tuple)):
        bad = next((x for x in data if not isinstance(x, str)), None)
        if bad is not None:
            raise CalibrationError(
                f"calibration_dataset: a list must hold str only, found {type(bad).__name__} {bad!r}; token ids go "
                f"in a torch.Tensor (torch.tensor(ids)). Accepted: {ACCEPTED_DATA}"
            )
    elif not (isinstance(data, (str, Path)) or is_dataset):
        raise CalibrationError(f"calibration_dataset: {type(data).__name__} is not accepted; accepted: {ACCEPTED_DATA}")
    if tokenizer is None:
        raise CalibrationError(
            "calibration_dataset: text needs a tokenizer: Pruner(model, tokenizer), or pass token ids (torch.Tensor)"
        )
    return data


def _check_ids(ids, vocab_size: int | None):
    import torch

    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(f"calibration_dataset: token ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise CalibrationError(
            f"calibration_dataset: token ids must be 1-D or [windows, seqlen], got {tuple(ids.shape)}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise CalibrationError(
            f"calibration_dataset: token ids must be in [0, {vocab_size}) (the model's vocabulary), found {low}..{high}"
        )
    return ids


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(name: str, seqlen: int, config) -> None:
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise InputError(f"{name}: {seqlen} tokens exceed the model's {limit} positions (max_position_embeddings)")


def check_prune_inputs(pruner, config, data, save_directory, batch_size, overwrite: bool):
    """Everything ``Pruner.prune`` can check before it runs; returns the calibration data, normalised."""
    from .configuration import PrunedConfig

    if not isinstance(config, PrunedConfig):
        raise InputError(f"config: expected a PrunedConfig, got {type(config).__name__}")
    config.validate()  # fields may have been changed after construction
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    pruner._targets(config)  # architecture limits (structured units, targets/ignore leaving nothing) come first
    calibrates = _needs_calibration(config)
    if calibrates:
        check_seqlen("seqlen", config.seqlen, pruner.model.config)
    embeddings = pruner.model.get_input_embeddings() if hasattr(pruner.model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(pruner.model.config, "vocab_size", None)
    data = check_calibration_data(data, pruner.tokenizer, vocab)
    if data is None and pruner.tokenizer is None and calibrates:
        raise CalibrationError(
            "calibration_dataset: the bundled corpus is text and this model has no tokenizer: "
            "Pruner(model, tokenizer), or pass token ids (torch.Tensor)"
        )
    if save_directory is not None:
        from .serialization import check_output_dir

        check_output_dir(save_directory, overwrite)
    return data


def _needs_calibration(config) -> bool:
    from .registry import get_method

    needs = get_method("allocation", config.allocation).needs or get_method("unstructured", config.pruner).needs
    return bool(needs) or config.structured_sparsity > 0
