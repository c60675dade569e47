"""``optimum-mosaic eval``: perplexity on held-out text or named domains, and zero-shot task accuracy through
lm-evaluation-harness (``--tasks``). Checkpoints written by optimum-mosaic go through the checked loader
(``PrunedModelForCausalLM``: composite and compressed ones included, no ``trust_remote_code`` prompt); anything
else loads as a plain model. Everything that can be checked (options, text files, tokenizer, task names, the
lm-eval install) is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOMAIN_HELP = "evaluation domain(s), comma-separated: persuasion, python-code, python-docs, shakespeare, or all"


def add_eval_arguments(parser: argparse.ArgumentParser, formatter, aliases: str) -> None:
    parser.formatter_class = formatter
    parser.add_argument("--model", default="smollm2-135m", help=f"a checkpoint directory or alias: {aliases}")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: the bundled evaluation novel)")
    parser.add_argument("--domains", default=None, help=f"perplexity on {DOMAIN_HELP}")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's own)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    parser.add_argument(
        "--tasks",
        default=None,
        help="zero-shot lm-eval task(s), comma-separated (needs the [eval] extra): Hub tasks such as hellaswag "
        "where the Hub is reachable, local YAML tasks (--include-path), or this package's offline tasks "
        "mosaic_lastword_<domain> / mosaic_nextsent_<domain> (persuasion, shakespeare). Perplexity is computed too "
        "only when --text, --domains or --max-windows is given",
    )
    parser.add_argument("--include-path", default=None, help="a folder of lm-eval YAML task files")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")


def _domains(value: str | None) -> list[str]:
    from .domains import DOMAINS
    from .validation import InputError

    if not value:
        return []
    names = list(DOMAINS) if value.strip() == "all" else [d.strip() for d in value.split(",") if d.strip()]
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise InputError(f"--domains: unknown domain(s) {unknown}; known: {', '.join(DOMAINS)}, or all")
    return names


def _check(args):
    """Everything that needs no model: returns (model path, text, domains, tasks, lm-eval task manager)."""
    from .validation import InputError, check_model_path, check_positive_int, check_text_file, has_tokenizer

    check_positive_int("--seqlen", args.seqlen)
    for option in ("max_windows", "limit", "batch_size"):
        if getattr(args, option) is not None:
            check_positive_int(f"--{option.replace('_', '-')}", getattr(args, option))
    if args.text and args.domains:
        raise InputError("--text and --domains: give one (the text file, or named domains)")
    path = check_model_path(args.model)
    text = check_text_file("--text", args.text, "evaluation") if args.text else None  # read as far as evaluated
    domains = _domains(args.domains)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise InputError("--tasks: give at least one task name")
    if (args.include_path or args.limit) and not tasks:
        raise InputError("--include-path and --limit go with --tasks")
    if args.include_path and not Path(args.include_path).is_dir():
        raise InputError(f"--include-path: {args.include_path} is not a directory")
    manager = None
    if tasks:
        from .zero_shot import check_tasks, task_manager

        manager = task_manager(args.include_path, tasks)  # MissingLmEvalError names the extra
        check_tasks(tasks, manager)
    if not args.tokenizer and not has_tokenizer(path):
        from .validation import no_tokenizer_error

        raise no_tokenizer_error(path, "the evaluation text must be tokenised")
    return path, text, domains, tasks, manager


def load_for_eval(path: str, tokenizer_source: str | None, seqlen: int | None):
    """``(model, tokenizer, pruned)``: a Mosaic checkpoint through the checked loader, anything else plainly;
    ``seqlen`` (when perplexity is computed) is checked against the model's positions."""
    from .cli_checks import check_seqlen, load_tokenizer
    from .serialization import is_checkpoint
    from .validation import check_hub_model

    check_hub_model(path)
    if Path(path).is_dir() and is_checkpoint(path):
        from .modeling import PrunedModelForCausalLM
        from .validation import check_seqlen as check_positions

        tokenizer = load_tokenizer(tokenizer_source or path, "--tokenizer" if tokenizer_source else "model")
        model = PrunedModelForCausalLM.from_pretrained(path)
        if seqlen is not None:
            check_positions("--seqlen", seqlen, model.config)
        return model, tokenizer, True
    from .pruner import Pruner

    if seqlen is not None:
        check_seqlen(path, seqlen)
    pruner = Pruner.from_pretrained(path)
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else pruner.tokenizer
    return pruner.model, tokenizer, False


def run_eval(args) -> dict:
    """Perplexity (one JSON line per text) and/or the zero-shot table; returns what was printed."""
    from .evaluation import perplexity

    path, text, domains, tasks, manager = _check(args)
    wants_perplexity = bool(domains) or text is not None or bool(args.max_windows) or not tasks
    model, tokenizer, pruned = load_for_eval(path, args.tokenizer, args.seqlen if wants_perplexity else None)
    from .domains import domain_text

    result = {"model": args.model, "seqlen": args.seqlen}
    if domains:
        texts = {d: domain_text(d) for d in domains}
    elif wants_perplexity:  # alongside --tasks only when asked for
        texts = {None: text}
    else:
        texts = {}
    for domain, data in texts.items():
        ppl = perplexity(model, tokenizer, data, seqlen=args.seqlen, max_windows=args.max_windows)
        line = {"model": args.model, "seqlen": args.seqlen, "perplexity": round(ppl, 4)}
        print(json.dumps(line if domain is None else {**line, "domain": domain}))
        result.setdefault("perplexity", {})[domain or "text"] = ppl
    if tasks:
        from .zero_shot import evaluate_tasks, format_rows

        rows = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, manager=manager)
        print(format_rows(rows, "pruned" if pruned else "dense"))
        result["tasks"] = rows
    return result
