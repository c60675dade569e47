"""Fine-tune a pruned checkpoint without losing its zeros (SparsityPreservingCallback), and save it.

python examples/finetune_with_callback.py --model smollm2-pruned --max-steps 100 --output smollm2-finetuned
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from optimum_mosaic import PrunedModelForCausalLM
from optimum_mosaic.calibration.data import bos_id, load_default_corpus, split_windows, tokenize
from optimum_mosaic.callbacks import SparsityPreservingCallback, prunable_linears, weight_sparsity
from optimum_mosaic.configuration import SIDECAR_NAME


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint saved by Pruner.prune(save_directory=...)")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: the bundled Austen novels)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--output", default="mosaic-finetuned")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    return parser.parse_args(argv)


def windows(tokenizer, text: str, seqlen: int) -> list[dict]:
    ids = split_windows(tokenize(tokenizer, text), seqlen, bos_id(tokenizer))
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = PrunedModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else load_default_corpus("calibration")
    dataset = windows(tokenizer, text, args.seqlen)
    before = weight_sparsity(prunable_linears(model))

    callback = SparsityPreservingCallback()
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=args.cpu or not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[callback])
    result = trainer.train()
    after = weight_sparsity(prunable_linears(model))

    # the zeros are unchanged, so the pruned checkpoint's sidecar still describes the fine-tuned weights
    trainer.save_model(args.output)
    tokenizer.save_pretrained(args.output)
    shutil.copy(Path(args.model) / SIDECAR_NAME, Path(args.output) / SIDECAR_NAME)
    print(f"sparsity before {before:.6f}, after {after:.6f}; training loss {result.training_loss:.4f}")
    return {"sparsity_before": before, "sparsity_after": after, "loss": result.training_loss}


if __name__ == "__main__":
    main()
