"""The README's headline figures are the numbers in ``benchmarks/results/`` (issue 18, item 6).

Each claim below is a regular expression anchored on the README sentence that states the figures and a
function that recomputes them from the JSON the benchmark scripts wrote; a figure must equal the computed
value at the number of decimals the README prints. Editing a figure, or a results file, without the other
fails here. ``test_every_ratio_in_the_readme_is_checked`` makes sure a new "N×" figure cannot slip in unchecked.
No model is loaded: this reads text and JSON only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # sentences wrap: one line
NUMBER = r"(\d+(?:\.\d+)?)"
# "N×" figures in the README that are not measurements: the time budget the default was chosen within
NOT_MEASURED = ("within 1.5× SparseGPT's prune time",)


def results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def one(rows: list[dict], **match) -> dict:
    """The single row whose fields equal ``match``."""
    found = [row for row in rows if all(row.get(key) == value for key, value in match.items())]
    assert len(found) == 1, (match, len(found))
    return found[0]


def agrees(printed: str, value: float) -> None:
    """``value`` rounds to ``printed`` at the decimals printed (half a unit of the last digit, either way)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(value - float(printed)) <= 0.5 * 10**-decimals + 1e-9, f"README says {printed}, results give {value}"


def main_job(prune: str, evaluations: str) -> None:
    run = results("main_job")  # the README command itself, timed on idle cores
    minutes = float(prune.rstrip("½") or 0) + (0.5 if prune.endswith("½") else 0)  # "1½" → 1.5
    assert minutes == round(run["prune_s"] / 30) / 2, (prune, run["prune_s"])  # to the nearest half minute
    agrees("1" if evaluations == "another minute" else evaluations.split()[0], run["evaluations_s"] / 60)


def defaults_smollm2(ppl50, ppl70, time50, time70, old50, old70, old_low, old_high) -> None:
    rows = results("defaults_smollm2")["rows"]
    base = {s: one(rows, run="uniform SparseGPT", sparsity=s) for s in (0.5, 0.6, 0.7)}
    default = {s: one(rows, run="default", sparsity=s) for s in (0.5, 0.7)}
    old = {s: one(rows, run="projection (auto) SparseGPT", sparsity=s) for s in (0.5, 0.6, 0.7)}
    agrees(ppl50, default[0.5]["ppl"] / base[0.5]["ppl"])
    agrees(ppl70, default[0.7]["ppl"] / base[0.7]["ppl"])
    agrees(time50, default[0.5]["prune_s"] / base[0.5]["prune_s"])
    agrees(time70, default[0.7]["prune_s"] / base[0.7]["prune_s"])
    agrees(old50, old[0.5]["ppl"] / base[0.5]["ppl"])
    agrees(old70, old[0.7]["ppl"] / base[0.7]["ppl"])
    old_times = [old[s]["prune_s"] / base[s]["prune_s"] for s in old]
    agrees(old_low, min(old_times))
    agrees(old_high, max(old_times))


def defaults_gemma3(ppl50, ppl60, ppl70, time_low, time_high) -> None:
    rows = results("defaults_gemma3")["rows"]
    ratios = {}
    for s in (0.5, 0.6, 0.7):
        base, default = one(rows, run="uniform SparseGPT", sparsity=s), one(rows, run="default", sparsity=s)
        ratios[s] = (default["ppl"] / base["ppl"], default["prune_s"] / base["prune_s"])
    for printed, s in ((ppl50, 0.5), (ppl60, 0.6), (ppl70, 0.7)):
        agrees(printed, ratios[s][0])
    agrees(time_low, min(t for _, t in ratios.values()))
    agrees(time_high, max(t for _, t in ratios.values()))


def defaults_domains(*printed) -> None:
    rows = results("domains_smollm2-135m")["rows"]
    domains = ("persuasion", "python-code", "python-docs", "shakespeare")
    for i, s in enumerate((0.5, 0.7)):
        base, default = one(rows, run="uniform SparseGPT", sparsity=s), one(rows, run="default", sparsity=s)
        for j, d in enumerate(domains):
            agrees(printed[4 * i + j], default["ppl"][d] / base["ppl"][d])
        agrees(printed[8 + i], default["prune_s"] / base["prune_s"])
    ratios = [  # "never worse than uniform SparseGPT on any of these domains at 50, 60 or 70 %, on either corpus"
        one(rows, run="default", sparsity=s)["ppl"][d] / one(rows, run=base, sparsity=s)["ppl"][d]
        for s in (0.5, 0.6, 0.7)
        for d in domains
        for base in ("uniform SparseGPT", "uniform SparseGPT, mixed corpus")
    ]
    assert max(ratios) < 1.0, ratios


def composite_smollm2(ratio, old_ratio, fewer_params, smaller_file, decode, kernel, steps, healed, dense) -> None:
    rows = results("structured")["rows"]
    base = one(rows, model="dense")
    unstructured = one(rows, model="unstructured-only", code="new")
    composite = one(rows, model="composite β=0.2", code="new")
    agrees(ratio, composite["perplexity"] / unstructured["perplexity"])
    agrees(old_ratio, one(rows, model="composite β=0.2", code="old")["perplexity"] / unstructured["perplexity"])
    agrees(fewer_params, 100 * (1 - composite["decoder_parameters"] / base["decoder_parameters"]))
    agrees(smaller_file, 100 * (1 - composite["safetensors_mib"] / base["safetensors_mib"]))
    agrees(decode, composite["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    agrees(kernel, composite["decode_kernel_tokens_per_s"] / base["decode_tokens_per_s"])
    agrees(healed, one(rows, model=f"composite β=0.2 + LoRA {steps} steps", code="new")["perplexity"])
    agrees(dense, base["perplexity"])


def composite_gemma3(post_norm, ratio, old_ratio, decode) -> None:
    rows = results("structured_gemma3")["rows"]
    unstructured = one(rows, model="unstructured-only", code="new")
    composite = one(rows, model="composite β=0.2", code="new")
    weighed = one(results("structured_gemma3_postnorm")["rows"], model="composite β=0.2", code="post-norm")
    agrees(post_norm, weighed["perplexity"] / unstructured["perplexity"])
    agrees(ratio, composite["perplexity"] / unstructured["perplexity"])
    agrees(old_ratio, one(rows, model="composite β=0.2", code="old")["perplexity"] / unstructured["perplexity"])
    agrees(decode, composite["decode_tokens_per_s"] / one(rows, model="dense")["decode_tokens_per_s"])


def sparse_kernel(threads, at70, at50, composite, weights, file) -> None:
    rows = [row for row in results("sparse_kernel")["e2e"] if row["threads"] == int(threads)]

    def pair(model):
        return one(rows, model=model, mode="dense fp32"), one(rows, model=model, mode="kernel fp32")

    for printed, model in ((at70, "70 % unstructured"), (at50, "50 % unstructured"), (composite, "composite 70 %")):
        dense, kernel = pair(model)
        agrees(printed, kernel["decode_tokens_per_s"] / dense["decode_tokens_per_s"])
        assert kernel["same_greedy_tokens"], model  # "same tokens as dense"
    dense, kernel = pair("70 % unstructured")
    agrees(weights, kernel["decoder_weight_bytes"] / dense["decoder_weight_bytes"])
    agrees(file, kernel["file_mib"] / dense["file_mib"])


def packed_bytes(ratio) -> None:
    rows = results("sparse_kernel")["e2e"]
    dense = one(rows, model="70 % unstructured", mode="dense fp32", threads=1)
    kernel = one(rows, model="70 % unstructured", mode="kernel fp32", threads=1)
    agrees(ratio, kernel["decoder_weight_bytes"] / dense["decoder_weight_bytes"])


def scale_8b(within_gib, ratio) -> None:
    rows = results("scale_llama3-8b")["rows"]
    default = one(rows, method="default (86d072e)", tokens=128 * 2048)
    peer = one(rows, method="llm-compressor SparseGPT (86d072e)", tokens=128 * 2048)  # the same sequence
    assert float(within_gib) - 1 < default["peak_rss_mib"] / 1024 <= float(within_gib)
    agrees(ratio, default["prune_s"] / peer["prune_s"])


def peak_8b(default_gib, peer_gib) -> None:
    rows = results("scale_llama3-8b")["rows"]
    default = one(rows, method="default (73f70a4)", tokens=4 * 2048)
    peer = one(rows, method="llm-compressor SparseGPT (73f70a4)", tokens=4 * 2048)  # the same sequence
    agrees(default_gib, default["peak_rss_mib"] / 1024)
    agrees(peer_gib, peer["peak_rss_mib"] / 1024)


def distributed(smollm2, forked, smollm2_again, forked_again, layer_8b, windows) -> None:
    small, again = results("distributed_speed"), results("distributed_speed_64db238_first")
    large = results("distributed_speed_llama3-8b")
    for run in (small, again, large):
        assert run["tensors_differing"] == [] and [r["procs"] for r in run["rows"]][:2] == [1, 2]
    for run, printed in ((small, (smollm2, forked)), (again, (smollm2_again, forked_again))):
        launched = {r["launcher"]: r["wall_s"] for r in run["rows"][1:]}
        for figure, launcher in zip(printed, ("torchrun", "fork"), strict=True):
            agrees(figure, run["rows"][0]["wall_s"] / launched[launcher])
    agrees(layer_8b, large["rows"][0]["wall_s"] / large["rows"][1]["wall_s"])
    assert large["argv"] == ["--nsamples", windows, "--seqlen", "2048"], large["argv"]


def dense_target(persuasion, shakespeare, worst) -> None:
    runs = {m: results(f"dense_target_{m}")["rows"] for m in ("smollm2-135m", "gemma3-270m")}
    target = "ALPS-warm, mixed corpus, dense target"
    ratios = {}
    for model, rows in runs.items():
        for row in (r for r in rows if r["run"] == target):
            base = one(rows, run="default", sparsity=row["sparsity"])
            ratios[(model, row["sparsity"])] = {d: row["ppl"][d] / base["ppl"][d] for d in row["ppl"]}
    assert len(ratios) == 4  # "all four runs"
    agrees(persuasion, ratios[("smollm2-135m", 0.7)]["persuasion"])
    assert all(run["shakespeare"] > 1 for run in ratios.values())
    agrees(shakespeare, max(run["shakespeare"] for run in ratios.values()))
    losing = [run for run in ratios.values() if run["python-code"] > 1 and run["python-docs"] > 1]
    assert len(losing) == 3  # "in three of them"
    agrees(worst, max(max(run["python-code"], run["python-docs"]) for run in losing))


CLAIMS = {
    "main job": (
        r"on 2 idle CPU cores the prune takes ≈ (\d*½?) min and the two evaluations about (another minute|\d+ minutes)",
        main_job,
    ),
    "defaults, SmolLM2": (
        rf"it gives {NUMBER}× / {NUMBER}× uniform SparseGPT's perplexity at 50 % / 70 % for {NUMBER}× / {NUMBER}× its"
        rf" prune time; the previous default \(Mosaic `projection`, auto λ, SparseGPT\) gave {NUMBER}× / {NUMBER}× for"
        rf" {NUMBER}–{NUMBER}×",
        defaults_smollm2,
    ),
    "defaults, Gemma-3": (
        rf"On Gemma-3-270M: {NUMBER}× / {NUMBER}× / {NUMBER}× at 50 / 60 / 70 % for {NUMBER}–{NUMBER}× the time",
        defaults_gemma3,
    ),
    "defaults, domains": (
        rf"on SmolLM2-135M the default is then {NUMBER}× / {NUMBER}× / {NUMBER}× / {NUMBER}× uniform SparseGPT's"
        rf" perplexity \(SparseGPT calibrated on the novels\) on \*Persuasion\* / Python code / technical prose /"
        rf" Shakespeare at 50 % and {NUMBER}× / {NUMBER}× / {NUMBER}× / {NUMBER}× at 70 %, for {NUMBER}× /"
        rf" {NUMBER}× its prune time",
        defaults_domains,
    ),
    "dense target": (
        rf"wins every held-out calibration window and \*Persuasion\* \({NUMBER}× the default's perplexity at 70 % on"
        rf" SmolLM2-135M\) but loses on Shakespeare in all four runs \(up to {NUMBER}×\) and on Python code and technical"
        rf" prose in three of them \(up to {NUMBER}×\)",
        dense_target,
    ),
    "composite, SmolLM2": (
        rf"keeps {NUMBER}× the perplexity of unstructured-only \(the code before gave {NUMBER}×\), with {NUMBER} %"
        rf" fewer decoder parameters, a {NUMBER} % smaller file and {NUMBER}× dense decode speed on dense kernels"
        rf" \({NUMBER}× with the sparse kernel\); (\d+) LoRA steps on the calibration text bring it to {NUMBER}"
        rf" \(dense {NUMBER}\)",
        composite_smollm2,
    ),
    "composite, Gemma-3": (
        rf"On Gemma-3-270M the same setting keeps {NUMBER}× now that removal costs are weighed after Gemma's"
        rf" post-norms \({NUMBER}× before, old code {NUMBER}×\); its 262k-token output layer dominates decoding, so"
        rf" decode gains only {NUMBER}× there",
        composite_gemma3,
    ),
    "sparse kernel": (
        rf"Measured\*\* on SmolLM2-135M, (\d+) thread: greedy decoding {NUMBER}× dense at 70 %, {NUMBER}× at 50 %,"
        rf" composite {NUMBER}×, same tokens as dense; decoder weights {NUMBER}× at 70 % \(file {NUMBER}×",
        sparse_kernel,
    ),
    "packed format": (rf"rows·4` bytes: {NUMBER}× dense fp32 at 70 %", packed_bytes),
    "processes": (
        (
            rf"2 processes × 1 thread prune SmolLM2-135M {NUMBER}× faster than one process end to end under `torchrun`"
            rf" \({NUMBER}× with the example's own `--procs 2`; {NUMBER}× / {NUMBER}× in another run\), one"
            rf" Llama-3-8B-shaped layer {NUMBER}× at (\d+) × 2048 tokens"
        ).replace(" ", r"\s+"),
        distributed,
    ),
    "scale, Llama-3-8B layer": (
        rf"prunes a Llama-3-8B-shaped layer within {NUMBER} GiB, in {NUMBER}× llm-compressor's time",
        scale_8b,
    ),
    "peak, Llama-3-8B layer": (
        rf"On 4 × 2048 tokens its peak is {NUMBER} GiB against llm-compressor's {NUMBER} GiB",
        peak_8b,
    ),
}


@pytest.mark.parametrize("name", list(CLAIMS))
def test_readme_figure_matches_results(name):
    pattern, check = CLAIMS[name]
    match = re.search(pattern, README)
    assert match, f"the README no longer states the {name} figures in the checked sentence: {pattern}"
    check(*match.groups())


def test_every_ratio_in_the_readme_is_checked():
    """Each "N×" figure of the README lies inside a checked sentence, or is a stated budget, not a measurement."""
    covered = [m.span() for pattern, _ in CLAIMS.values() for m in re.finditer(pattern, README)]
    covered += [m.span() for text in NOT_MEASURED for m in re.finditer(re.escape(text), README)]
    unchecked = [
        README[max(0, m.start() - 40) : m.end() + 10]
        for m in re.finditer(r"\d+(?:\.\d+)?×", README)
        if not any(start <= m.start() < end for start, end in covered)
    ]
    assert not unchecked, f"README figures without a check against benchmarks/results/: {unchecked}"
