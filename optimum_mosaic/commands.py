"""Command line: ``optimum-mosaic prune|eval|push`` (also ``optimum-cli mosaic ...``). The prune flags are
generated from ``PrunedConfig``'s fields and help texts, so the CLI and the Python API cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing

from .configuration import PrunedConfig


def _number_or_auto(text: str):
    return text if text == "auto" else float(text)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(PrunedConfig)
    for f in dataclasses.fields(PrunedConfig):
        if f.name == "format_version":
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list:
            parser.add_argument(flag, nargs="+", default=None, help=f.metadata["help"])
        elif str in args and float in args:
            parser.add_argument(flag, type=_number_or_auto, default=None, help=f.metadata["help"])
        else:
            kind = next((t for t in (int, float, str) if t is hint or t in args), str)
            parser.add_argument(flag, type=kind, default=None, help=f.metadata["help"])


def config_from_args(args: argparse.Namespace) -> PrunedConfig:
    names = {f.name for f in dataclasses.fields(PrunedConfig)}
    return PrunedConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint path, or a packaged model alias")
    parser.add_argument("--output", default=None, help="directory to save the pruned checkpoint")
    parser.add_argument("--device", default=None, help="execution device for the layer walk (cpu, cuda)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="calibration windows per forward with --sequential layer (the default runs all windows as one batch)",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="keep the decoder layers on disk, one resident at a time (models larger than memory; needs --output)",
    )
    parser.add_argument(
        "--compressed",
        action="store_true",
        help="save the projections in the bitmap format (smaller files; read by PrunedModelForCausalLM and by "
        "transformers with trust_remote_code=True); default: dense safetensors any transformers reads",
    )
    parser.add_argument(
        "--calibration-text", default=None, help="a UTF-8 text file to calibrate on (default: the bundled corpus)"
    )
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=0,
        help="evaluate perplexity before and after on this many windows of held-out text (0: skip)",
    )
    add_config_arguments(parser)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: the bundled evaluation novel)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)


def run_prune(args) -> dict:
    import torch

    from .evaluation import perplexity
    from .report import format_table

    config = config_from_args(args)
    from .pruner import Pruner

    if args.offload:
        return _run_prune_offloaded(args, config)
    pruner = Pruner.from_pretrained(args.model, device=args.device)
    evaluate = lambda: perplexity(pruner.model, pruner.tokenizer, seqlen=config.seqlen, max_windows=args.eval_windows)  # noqa: E731
    before = evaluate() if args.eval_windows else None
    nonzero = lambda: sum(int((p != 0).sum()) for p in pruner.model.parameters())  # noqa: E731
    dense_nonzero = nonzero()
    start = time.perf_counter()
    data = open(args.calibration_text, encoding="utf-8").read() if args.calibration_text else None
    pruner.prune(config, calibration_dataset=data, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    report = pruner.report
    after = evaluate() if args.eval_windows else None
    if args.eval_windows:
        report.evaluation = {
            "text": "bundled Austen novel (Persuasion), held out from calibration",
            "windows": args.eval_windows,
            "seqlen": config.seqlen,
            "perplexity_before": round(before, 4),
            "perplexity_after": round(after, 4),
        }
    if args.output:
        from .serialization import save_pruned

        save_pruned(pruner.model, pruner.tokenizer, args.output, config, report, compressed=args.compressed)
    print(
        f"\nPruned {args.model}: {config.allocation} allocation (λ={report.lamda}, M={report.outlier_threshold}), "
        f"{config.pruner}, calibration {config.nsamples} x {config.seqlen} tokens, "
        f"evaluation {args.eval_windows} x {config.seqlen} tokens of held-out text, {torch.get_num_threads()} threads"
    )
    rows = [
        {
            "model": "dense",
            "sparsity": 0.0,
            "non-zero params": dense_nonzero,
            "perplexity": before or "-",
            "time (s)": "-",
        },
        {
            "model": "pruned",
            "sparsity": report.achieved_sparsity,
            "non-zero params": nonzero(),
            "perplexity": after or "-",
            "time (s)": round(elapsed, 1),
        },
    ]
    print(format_table(rows, list(rows[0])))
    if args.output:
        print(f"Saved to {args.output}")
    return {"before": before, "after": after, "report": report.to_dict()}


def _run_prune_offloaded(args, config) -> dict:
    """``--offload``: the pruned layers go straight to ``--output``; nothing is evaluated in memory."""
    from .pruner import Pruner

    if args.compressed:
        raise SystemExit("--offload writes dense layer shards; drop --compressed (re-save the result compressed later)")
    if not args.output or args.eval_windows:
        raise ValueError(
            "--offload writes the result to --output and cannot evaluate in memory: give --output, drop --eval-windows"
        )
    data = open(args.calibration_text, encoding="utf-8").read() if args.calibration_text else None
    pruner = Pruner.from_pretrained(args.model, device=args.device, offload=True)
    pruner.prune(config, calibration_dataset=data, save_directory=args.output, batch_size=args.batch_size)
    report = pruner.report
    print(
        f"Pruned {args.model} offloaded: sparsity {report.achieved_sparsity}, {report.timings['total_s']} s. Saved to {args.output}"
    )
    return {"before": None, "after": None, "report": report.to_dict()}


def run_eval(args) -> float:
    from .evaluation import perplexity
    from .pruner import Pruner

    pruner = Pruner.from_pretrained(args.model)
    text = open(args.text, encoding="utf-8").read() if args.text else None
    ppl = perplexity(pruner.model, pruner.tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows)
    print(json.dumps({"model": args.model, "seqlen": args.seqlen, "perplexity": round(ppl, 4)}))
    return ppl


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pruned checkpoint directory (with mosaic_config.json)")
    parser.add_argument("--repo-id", required=True, help="Hub repository to push to, 'owner/name' (created if missing)")
    parser.add_argument(
        "--token", default=None, help="Hub token (default: $HF_TOKEN or the cached `hf auth login` token)"
    )
    parser.add_argument(
        "--private", action="store_true", default=None, help="create the repo private (an existing repo is unchanged)"
    )
    parser.add_argument("--revision", default=None, help="branch to push to, created if missing (default: main)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--base-model", default=None, help="Hub id of the model that was pruned (card metadata)")


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
    )
    print(f"Pushed {args.model} to {args.repo_id} with its model card: {url}")
    return url


# name → (help, add_arguments, run); the ``optimum-cli mosaic`` plug-in builds its sub-commands from this table.
SUBCOMMANDS = {
    "prune": ("prune a model and save it (with a before/after table)", add_prune_arguments, run_prune),
    "eval": ("perplexity of a model on held-out text", add_eval_arguments, run_eval),
    "push": ("push a pruned checkpoint and its model card to the Hub", add_push_arguments, run_push),
}


def build_parser(prog: str = "optimum-mosaic") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Mosaic composite projection pruning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def run(name: str, args: argparse.Namespace) -> int:
    """Run one sub-command; configuration and input errors become one clear line and exit status 2."""
    try:
        SUBCOMMANDS[name][2](args)
    except ValueError as err:
        print(f"optimum-mosaic: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
