"""What the command line checks before loading a model (options, files, the Hub id, the tokenizer, free space), and
how expected errors become one line. Imports neither torch nor transformers at import time (``commands`` needs
``--help`` and argument errors to stay fast)."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

from .exceptions import SaveError, is_network_error

SHARD_BYTES = 50 * 10**9  # transformers' default max_shard_size: no weights file is larger
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}  # disk full, file too large, quota


def check_prune_args(args, config) -> None:
    from .validation import (
        InputError,
        _needs_calibration,
        check_device,
        check_hub_model,
        check_model_path,
        check_positive_int,
        check_text_file,
        has_tokenizer,
        no_tokenizer_error,
    )

    if not args.output and not args.no_save:
        raise ValueError("--output: give --output DIR to save the pruned model, or --no-save to only print the table")
    if args.offload and (not args.output or args.eval_windows):
        raise ValueError(
            "--offload writes to --output and cannot evaluate in memory: give --output, drop --eval-windows"
        )
    if args.offload and args.compressed:
        raise ValueError("--offload writes dense layer shards; drop --compressed (re-save the result compressed later)")
    if args.batch_size is not None:
        check_positive_int("--batch-size", args.batch_size)
    if args.eval_windows < 0:
        raise ValueError(f"--eval-windows: must be >= 0, got {args.eval_windows}")
    if args.eval_text and not args.eval_windows:
        raise ValueError("--eval-text: give --eval-windows N (> 0) to evaluate on it")
    args.task_manager = check_eval_tasks(args)
    if args.structured_units is not None and not config.structured_sparsity:
        raise InputError(
            "--structured-units: it chooses what --structured-sparsity removes, and that is 0 here: give "
            "--structured-sparsity (> 0), or drop --structured-units"
        )
    if args.device is not None:
        check_device(args.device)
    args.model = check_model_path(args.model)
    args.calibration_data = (  # a Path: read later, only as far as the calibration windows need
        check_text_file("--calibration-text", args.calibration_text) if args.calibration_text else None
    )
    args.eval_data = check_text_file("--eval-text", args.eval_text, "evaluation") if args.eval_text else None
    if args.output:
        from .serialization import check_output_dir

        check_output_dir(args.output, args.overwrite)
    if not args.tokenizer and not has_tokenizer(args.model) and (_needs_calibration(config) or args.eval_windows):
        raise no_tokenizer_error(args.model, "the calibration text must be tokenised")
    check_hub_model(args.model)
    check_seqlen(args.model, config.seqlen)


def check_seqlen(model: str, seqlen: int) -> None:
    from .validation import check_seqlen as check

    if Path(model).is_dir():  # an alias is fetched later; its positions (8192, 32768) exceed any sane seqlen
        from transformers import AutoConfig

        check("--seqlen", seqlen, AutoConfig.from_pretrained(model))


def load_tokenizer(source: str, option: str = "--tokenizer"):
    """``AutoTokenizer.from_pretrained(source)``; a failure is one line naming ``option``."""
    from transformers import AutoTokenizer

    from .validation import InputError

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"{option}: no tokenizer could be loaded from {source!r} ({one_line(err)})") from None


def check_free_space(model, output, compressed: bool, sparsity: float) -> None:
    """Refuse, before the prune, a save that cannot fit: the dense checkpoint takes the parameters' bytes (a
    compressed one at least their kept share), all written before the old files go; a file-size limit
    (``ulimit -f``) must allow its weights file."""
    import shutil

    seen, size = set(), 0
    for p in model.parameters():
        if p.device.type != "meta" and p.data_ptr() not in seen:  # tied weights are saved once
            seen.add(p.data_ptr())
            size += p.numel() * p.element_size()
    need = int(size * (1 - sparsity)) if compressed else size
    folder = Path(output).expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SaveError(
            f"--output: the checkpoint needs about {_size(need)}, but the file system of {folder} has {_size(free)} "
            "free: free some space or choose another --output (nothing was pruned)"
        )
    limit = _file_size_limit()
    if limit is not None and min(need, SHARD_BYTES) > limit:
        raise SaveError(
            f"--output: the weights file needs about {_size(min(need, SHARD_BYTES))}, but this process may write "
            f"files of at most {_size(limit)} (ulimit -f): raise the limit (ulimit -f unlimited); nothing was pruned"
        )


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextlib.contextmanager
def writing(output):
    """A write that fails for lack of room (disk full, quota, ``ulimit -f``: an ``OSError`` or safetensors'
    ``SafetensorError``) becomes one ``SaveError`` line."""
    try:
        yield
    except SaveError as err:  # the save's own translation (serialization.save_pruned)
        raise SaveError(f"--output: {err}") from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError" and not (isinstance(err, OSError) and err.errno in _FULL):
            raise
        raise SaveError(
            f"--output: could not write the checkpoint to {output} ({one_line(err)}): free disk space (or raise the "
            "file-size limit, ulimit -f), then run again"
        ) from None


def check_eval_tasks(args):
    """``prune --eval-tasks``: lm-eval installed and every task known, before the model is loaded; returns the
    task manager (None without ``--eval-tasks``)."""
    from .validation import InputError, check_positive_int

    tasks = [t.strip() for t in (getattr(args, "eval_tasks", None) or "").split(",") if t.strip()]
    args.eval_task_list = tasks
    if getattr(args, "task_limit", None) is not None:
        check_positive_int("--task-limit", args.task_limit)
        if not tasks:
            raise InputError("--task-limit goes with --eval-tasks")
    if not tasks:
        return None
    if args.offload:
        raise InputError("--offload cannot evaluate in memory: drop --eval-tasks")
    from .zero_shot import check_tasks, task_manager

    manager = task_manager(None, tasks)
    check_tasks(tasks, manager)
    return manager


def one_line(err: BaseException) -> str:
    return " ".join((str(err).strip() or type(err).__name__).split())


def error_line(err: BaseException) -> str | None:
    """The one-line message of an expected error, or None for a bug (which keeps its traceback)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return (
            "the Hub refused the request (401 Unauthorized): log in with `hf auth login`, set HF_TOKEN, or pass "
            "--token (a token with write access to push)"
        )
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        return f"the Hub answered {status}: {str(err).splitlines()[0]}"
    if is_network_error(err) and not isinstance(err, OSError):  # httpx / requests: the Hub client
        return (
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({one_line(err)}): check the network "
            "connection (or HF_ENDPOINT, a proxy), then run the command again"
        )
    if isinstance(err, OSError) and err.errno in _FULL:
        return f"{one_line(err)}: free disk space (or raise the file-size limit, ulimit -f), then run again"
    if type(err).__name__ == "SafetensorError":
        return f"safetensors: {one_line(err)}"
    if isinstance(err, (ValueError, OSError, ImportError)):
        return one_line(err)
    return None
