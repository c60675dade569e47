"""Load a pruned checkpoint in 8-bit or 4-bit with bitsandbytes and see what survives of its sparsity.

python examples/prune_smollm2.py --output smollm2-composite
python examples/bnb_on_pruned.py --model smollm2-composite --bits 4
"""

import argparse

from transformers import AutoTokenizer, BitsAndBytesConfig

from optimum_mosaic import PrunedModelForCausalLM, perplexity


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a checkpoint saved by Pruner.prune(save_directory=...)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"), help="4-bit codebook")
    parser.add_argument("--prompt", default="It was a bright morning in Bath, and Anne")
    parser.add_argument("--eval-windows", type=int, default=10, help="perplexity windows of held-out text (0: skip)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--text", default=None, help="evaluation text (default: the bundled held-out novel)")
    args = parser.parse_args(argv)

    if args.bits == 8:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_type)
    full = PrunedModelForCausalLM.from_pretrained(args.model)
    model = PrunedModelForCausalLM.from_pretrained(args.model, quantization_config=quantization_config)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = model.mosaic_quantization  # masks read from the full-precision weights before quantizing
    print(
        f"{report.method}: weights {full.get_memory_footprint() / 2**20:.1f} MiB -> "
        f"{report.memory_footprint_bytes / 2**20:.1f} MiB; sparsity {report.sparsity_before:.4f} -> "
        f"{report.sparsity_after:.4f} (pruned zeros kept {report.pruned_zeros_kept}/{report.zeros_before}, "
        f"{report.extra_zeros} kept weights rounded to zero)"
    )
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"{args.prompt}{text}")
    result = {"report": report, "text": text}
    if args.eval_windows:
        evaluation_text = open(args.text, encoding="utf-8").read() if args.text else None
        kwargs = dict(seqlen=args.seqlen, max_windows=args.eval_windows, progress=False)
        result["perplexity"] = {
            "full": perplexity(full, tokenizer, evaluation_text, **kwargs),
            "quantized": perplexity(model, tokenizer, evaluation_text, **kwargs),
        }
        print(f"perplexity {result['perplexity']['full']:.2f} -> {result['perplexity']['quantized']:.2f}")
    return result


if __name__ == "__main__":
    main()
