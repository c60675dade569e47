"""Fine-tune a LoRA adapter on a pruned checkpoint, merge it and keep the pruned zeros.

python examples/lora_on_pruned.py --model smollm2-composite --steps 20 --output smollm2-composite-lora
"""

import argparse

import torch
from transformers import AutoTokenizer

from optimum_mosaic import PrunedModelForCausalLM
from optimum_mosaic.adapters import merge_and_remask, prepare_lora
from optimum_mosaic.calibration.data import load_default_corpus, sample_windows
from optimum_mosaic.report import measured_sparsity
from optimum_mosaic.serialization import save_pruned


def sparsity(model) -> float:
    """The package's one definition (``report.DENOMINATOR``): exact zeros over the pruned projections of the
    *dense* model, weights removed by structured pruning counting as zeros, counted from the weights now."""
    value = measured_sparsity(model)
    if value is None:
        raise SystemExit(
            "this checkpoint carries no Mosaic pruning record: save it with Pruner.prune(save_directory=...)"
        )
    return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a checkpoint saved by Pruner.prune(save_directory=...)")
    parser.add_argument("--text", default=None, help="training text (default: the bundled calibration novels)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    model = PrunedModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = open(args.text, encoding="utf-8").read() if args.text else load_default_corpus("calibration")
    windows, _ = sample_windows(tokenizer, text, nsamples=args.steps, seqlen=args.seqlen, seed=0)
    before = sparsity(model)

    peft_model = prepare_lora(model, r=args.rank, lora_alpha=2 * args.rank)  # records the masks first
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    peft_model.train()
    for step, batch in enumerate(windows.split(1)):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}")

    merged = merge_and_remask(peft_model).eval()  # merge, then W ← W ⊙ M
    after = sparsity(merged)
    save_pruned(merged, tokenizer, args.output, merged.mosaic_config, merged.mosaic_report)
    print(f"sparsity {before:.4f} -> {after:.4f} after merging ({merged.mosaic_cleared} adapter entries re-masked)")
    return {"before": before, "after": after, "loss": loss.item()}


if __name__ == "__main__":
    main()
