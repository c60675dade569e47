"""benchmarks/compare.py: zero counting, shared windows, median/ratio/table maths, and one tiny end-to-end run.

The llm-compressor rows need a second venv, which CI does not have; here they are only checked to be skipped."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from optimum_mosaic.calibration import data as calibration_data
from optimum_mosaic.calibration.data import sample_windows
from optimum_mosaic.evaluation import mean_nll, perplexity

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def compare(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compare

    return compare


def _text(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij klmnop.") for _ in range(chars))


def test_sparsity_counts_zeros_and_removed_entries(compare):
    from compare_worker import sparsity

    a = torch.ones(2, 4)
    a[0, :3] = 0  # 3 zeros, and 4 entries of the dense 3×4 weight removed
    dense = {"a": 12, "b": 4, "c": 8}  # "b" removed entirely, "c" dense
    assert sparsity({"a": a, "c": torch.ones(8)}, dense) == pytest.approx((3 + 4 + 4) / 24)
    with pytest.raises(ValueError, match="not in the dense model"):
        sparsity({"d": a}, dense)


def test_arranged_windows_make_the_pruner_draw_exactly_the_shared_windows(compare):
    from compare_worker import arranged_windows

    calibration, held = torch.randint(0, 50, (5, 8)), torch.randint(0, 50, (3, 8))
    for holdout in (0, 3):
        rows = arranged_windows(calibration, held[:holdout], seed=7)
        got, rest = sample_windows(None, rows, 5, 8, 7, holdout)
        assert torch.equal(got, calibration) and torch.equal(rest, held[:holdout])


def test_method_specs_and_peer_resolution(compare, tmp_path):
    args = compare.parse_args(["--methods", "owl-wanda", "composite", "--structured", "0.2"])
    owl, composite = (compare.method_spec(m, args) for m in args.methods)
    assert owl["config"]["allocation"] == "layer" and owl["kernel"] == "wanda"
    assert composite["config"] | {"allocation": "projection", "pruner": "sparsegpt"} == composite["config"]
    assert composite["config"]["structured_sparsity"] == 0.2 and composite["config"]["nsamples"] == 32
    peer = compare.method_spec("llmcompressor-sparsegpt", args)
    assert (peer["library"], peer["dampening"], peer["block_size"]) == ("llmcompressor", 0.01, 128)
    with pytest.raises(ValueError, match="unknown method"):
        compare.method_spec("uniform-alps", args)
    with pytest.raises(SystemExit):
        compare.resolve_peer_python(str(tmp_path / "no-python"))


def _run(method, library, kernel, prune_s, ppl, repeat=0, rss=100.0):
    return dict(method=method, library=library, kernel=kernel, prune_s=prune_s, ppl=ppl, repeat=repeat,
                sparsity=0.5, lm_head_sparsity=0.0, peak_rss_mib=rss)  # fmt: skip


def test_medians_ratios_and_table_from_given_numbers(compare):
    runs = [
        _run("uniform-sparsegpt", "mosaic", "sparsegpt", 10.0, 50.0, 0, rss=300.0),
        _run("uniform-sparsegpt", "mosaic", "sparsegpt", 30.0, 50.0, 1),
        _run("uniform-sparsegpt", "mosaic", "sparsegpt", 20.0, 50.0, 2),
        _run("composite", "mosaic", "sparsegpt", 40.0, 60.0),
        _run("uniform-magnitude", "mosaic", "magnitude", 1.0, 90.0),
        _run("llmcompressor-sparsegpt", "llmcompressor", "sparsegpt", 8.0, 40.0),
        _run("llmcompressor-sparsegpt", "llmcompressor", "sparsegpt", 16.0, 40.0, 1),
        {"method": "uniform-wanda", "repeat": 0, "error": "Traceback\nRuntimeError: boom"},
    ]
    order = ["uniform-sparsegpt", "composite", "uniform-magnitude", "uniform-wanda", "llmcompressor-sparsegpt"]
    rows = {r["method"]: r for r in compare.add_ratios(compare.aggregate(runs, order))}
    ours, peer = rows["uniform-sparsegpt"], rows["llmcompressor-sparsegpt"]
    assert (ours["prune_s"], ours["repeats"], ours["peak_rss_mib"]) == (20.0, 3, 300.0)
    assert peer["prune_s"] == 12.0  # median of two
    assert ours["time_ratio"] == pytest.approx(20 / 12) and ours["ppl_ratio"] == pytest.approx(50 / 40)
    assert rows["composite"]["time_ratio"] == pytest.approx(40 / 12)  # composite pairs with SparseGPTModifier
    assert rows["uniform-magnitude"]["time_ratio"] is None and peer["ppl_ratio"] is None
    assert rows["uniform-wanda"]["error"] == "RuntimeError: boom"
    table = compare.markdown(list(rows.values()))
    assert "| uniform-sparsegpt | sparsegpt | 0.5000 | 50.00 | 20.0 | 300.00 | 1.667× | 1.250× |" in table
    assert "- uniform-wanda failed: RuntimeError: boom" in table
    assert "lm_head_sparsity" not in table
    pruned_head = {**rows["composite"], "lm_head_sparsity": 0.5, "lm_head_dense_sparsity": 0.01}
    assert "| composite | sparsegpt | 0.5000 | 0.5000 | 60.00 |" in compare.markdown([pruned_head])


def test_evaluation_windows_are_the_ones_perplexity_scores(compare, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(calibration_data, "load_default_corpus", lambda split="calibration": _text(1, 3000))
    model, tokenizer = tiny_llama(), char_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = compare.parse_args(["--nsamples", "4", "--seqlen", "32", "--eval-windows", "3"])
    windows = compare.make_windows(str(tmp_path), args, 8, tmp_path / "w.pt")
    assert [tuple(w.shape) for w in windows.values()] == [(4, 32), (8, 32), (3, 32)]
    assert torch.equal(torch.load(tmp_path / "w.pt")["calibration"], windows["calibration"])
    expected = perplexity(model, tokenizer, _text(1, 3000), seqlen=32, max_windows=3, progress=False)
    assert math.exp(mean_nll(model, windows["evaluation"])) == pytest.approx(expected, rel=1e-6)


def test_end_to_end_on_a_tiny_llama(compare, tmp_path, monkeypatch):
    texts = {"calibration": _text(2, 4000), "evaluation": _text(3, 1000)}
    monkeypatch.setattr(calibration_data, "load_default_corpus", lambda split="calibration": texts[split])
    monkeypatch.setattr(compare, "resolve_peer_python", lambda given: (None, "no llm-compressor: skipped"))
    model_dir = tmp_path / "tiny"
    tiny_llama(num_hidden_layers=2).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "res" / "compare.json"
    methods = ["uniform-sparsegpt", "projection-wanda", "llmcompressor-wanda"]
    argv = ["--model", str(model_dir), "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--threads", "1"]
    report = compare.main([*argv, "--methods", *methods, "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == methods[:2]  # the llm-compressor row was skipped, with a note
    assert "no llm-compressor: skipped" in report["notes"]
    for row in rows.values():
        assert "error" not in row, row
        assert row["sparsity"] == pytest.approx(0.5, abs=1e-6) and row["lm_head_sparsity"] == 0.0
        assert 1.0 < row["ppl"] < 200.0 and row["prune_s"] > 0 and row["peak_rss_mib"] > 50
        assert row["time_ratio"] is None
    assert [r["threads"] for r in report["runs"]] == [1, 1]
    table = out.with_suffix(".md").read_text()
    assert all(f"| {m} |" in table for m in methods[:2]) and "llmcompressor" not in table
