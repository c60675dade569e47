"""Push a Mosaic-pruned checkpoint to the Hugging Face Hub with its generated model card.

    optimum-mosaic prune --sparsity 0.5 --eval-windows 20 --output smollm2-mosaic
    python examples/push_to_hub.py --model smollm2-mosaic --repo-id user/smollm2-mosaic

The card (method, λ/M, per-layer × per-projection sparsity, calibration, perplexity, size) is rendered from
the checkpoint's mosaic_config.json and previewed first; ``--preview`` stops there. A card already in the
repo is extended, not overwritten. ``--endpoint`` points at another Hub (a mirror, or a local test server).
The token comes from ``--token``, ``$HF_TOKEN`` or the cached ``hf auth login``; it is never written to disk.
"""

from __future__ import annotations

import argparse

from optimum_mosaic.hub import push_to_hub, render_card


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pruned checkpoint directory (with mosaic_config.json)")
    parser.add_argument("--repo-id", required=True, help="'owner/name' on the Hub")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the cached login)")
    parser.add_argument("--base-model", default=None, help="Hub id of the model that was pruned")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--preview", action="store_true", help="print the card and stop, without pushing")
    return parser.parse_args(argv)


def preview(card) -> str:
    """The card's summary line and sparsity table: enough to check the numbers before pushing."""
    lines = card.text.splitlines()
    summary = next(line for line in lines if line.startswith("**"))
    table = [line for line in lines if line.startswith(("| layer |", "| **all** |")) or line[2:3].isdigit()]
    return "\n".join([summary, *table])


def main(argv=None) -> str | None:
    args = parse_args(argv)
    card = render_card(args.model, base_model=args.base_model, repo_id=args.repo_id)  # local, no network
    print(preview(card))
    if args.preview:
        print(card)
        return None
    url = push_to_hub(
        args.model,
        args.repo_id,
        token=args.token,
        private=args.private,
        base_model=args.base_model,
        endpoint=args.endpoint,
    )
    print(f"Pushed {args.model} to {args.repo_id}: {url}")
    return url


if __name__ == "__main__":
    main()
