"""benchmarks/scale.py: the stage timers charge nested work once, the extrapolation scales only what grows with
tokens, and one tiny end-to-end run (random weights, a Llama with 2 layers of 256 / 704) splits the prune into
stages that add up to the measured prune time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def scale(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import scale

    return scale


def test_nested_stages_are_charged_once(scale):
    stages = scale.Stages()
    with stages.stage("solve"):
        time.sleep(0.05)
        with stages.stage("hessian"):
            time.sleep(0.1)
    assert stages.seconds["hessian"] == pytest.approx(0.1, abs=0.03)
    assert stages.seconds["solve"] == pytest.approx(0.05, abs=0.03)  # the inner 0.1 s is not counted twice


def test_extrapolation_scales_only_the_token_bound_stages(scale):
    row = {"prune_s": 20.0, "stages_s": {"statistics": 4.0, "forward": 2.0, "hessian": 5.0, "solve": 9.0}}
    got = scale.extrapolate(row, tokens=scale.FULL // 8, layers=2, whole=32)
    per_layer = (8 * (4.0 + 2.0) + 5.0 + 9.0) / 2
    assert got == {"layer_at_128x2048_s": per_layer, "model_at_128x2048_h": round(per_layer * 32 / 3600, 2)}


def test_tiny_run_splits_the_prune_into_stages(tmp_path):
    out = tmp_path / "scale.json"
    command = [sys.executable, str(BENCHMARKS / "scale.py"), "--shape", "tiny", "--layers", "2", "--threads", "1"]
    command += ["--methods", "uniform SparseGPT", "composite β=0.2", "--nsamples", "2", "--seqlen", "64"]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    for name, row in rows.items():
        assert "error" not in row, f"{name}: {row.get('error')}"
        stages = row["stages_s"]
        assert stages["statistics"] > 0 and stages["solve"] > 0 and stages["hessian"] > 0, stages
        assert sum(stages.values()) == pytest.approx(row["prune_s"], abs=0.05)  # the stages add up to the prune
        assert row["sparsity"] == pytest.approx(0.5, abs=0.01) and row["peak_rss_mib"] > 100
    assert rows["composite β=0.2"]["stages_s"]["structured"] > 0
    assert "structured" not in rows["uniform SparseGPT"]["stages_s"]


def test_wide_projection_compares_the_kernel_with_a_baseline_revision(tmp_path):
    """benchmarks/wide_projection.py on a tiny problem against fb83aef (before the Y-free B-step): both versions
    give the exact zero count; today's makes one ridge inverse fewer (the one for the ρ the last check sets) and
    lands on (nearly) the same support and layer error."""
    known = subprocess.run(["git", "cat-file", "-e", "fb83aef^{commit}"], cwd=BENCHMARKS.parent, capture_output=True)
    if known.returncode:
        pytest.skip("fb83aef is not in this clone's history (a shallow clone)")
    out = tmp_path / "wide.json"
    args = ["--baseline", "fb83aef", "--rows", "96", "--cols", "384", "--tokens", "768", "--threads", "1"]
    subprocess.run([sys.executable, str(BENCHMARKS / "wide_projection.py"), *args, "--out", str(out)], check=True,
                   capture_output=True, cwd=BENCHMARKS.parent)  # fmt: skip
    got = json.loads(out.read_text())
    base, new = got["rows"].values()
    assert base["zeros"] == new["zeros"] == 96 * 384 // 2
    assert (base["inverses"], new["inverses"]) == (3, 2) and base["iterations"] == new["iterations"] == 6
    assert got["support_flips"] < 0.01 and abs(got["layer_error_ratio"] - 1) < 0.01


def test_token_fits_draw_a_line_through_the_runs_of_each_method(scale):
    rows = [
        {"method": "m", "layers": 1, "tokens": 8192, "prune_s": 300.0},
        {"method": "m", "layers": 1, "tokens": 16384, "prune_s": 500.0},
        {"method": "one run", "layers": 1, "tokens": 8192, "prune_s": 100.0},  # one point: no line
        {"method": "m", "layers": 2, "tokens": 4096, "prune_s": 1.0},  # another layer count: not mixed in
    ]
    fits = scale.token_fits(rows, layers=1, whole=32)
    per_layer = 100.0 + 200.0 / 8192 * scale.FULL  # 100 s fixed + 200 s per 8192 tokens
    assert list(fits) == ["m"]
    assert fits["m"]["fixed_s"] == 100.0 and fits["m"]["layer_at_128x2048_s"] == round(per_layer, 1)
    assert fits["m"]["model_at_128x2048_h"] == round(per_layer * 32 / 3600, 2)


def test_wide_projection_final_read_builds_hn_in_h_and_changes_nothing(tmp_path):
    """``--final-read``: today's run lets the kernel build ``Hn`` in ``H``'s memory (as the walk does for a group's
    last reader); the baseline (the same alps.py, HEAD) copies. The result is bit-identical."""
    out = tmp_path / "wide.json"
    args = ["--baseline", "HEAD", "--final-read", "--rows", "96", "--cols", "384", "--tokens", "768", "--threads", "1"]
    subprocess.run([sys.executable, str(BENCHMARKS / "wide_projection.py"), *args, "--out", str(out)], check=True,
                   capture_output=True, cwd=BENCHMARKS.parent)  # fmt: skip
    got = json.loads(out.read_text())
    base, new = got["rows"].values()
    assert got["problem"]["final_read"] and base["zeros"] == new["zeros"] == 96 * 384 // 2
    assert got["support_flips"] == 0.0 and got["layer_error_ratio"] == 1.0


def test_memory_timeline_charges_the_peak_to_package_code(monkeypatch, tmp_path):
    """benchmarks/memory_timeline.py on the tiny shape: the highest samples are charged to the package's code (the
    walk's kernels or the statistics), none above the process's VmHWM, and the file is written where asked."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import memory_timeline

    out = tmp_path / "memory.json"
    argv = ["--shape", "tiny", "--method", "uniform SparseGPT", "--nsamples", "2", "--seqlen", "64", "--threads", "1"]
    payload = memory_timeline.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == payload and payload["prune_s"] > 0
    highest = payload["highest"]
    assert highest and all(row["rss_gib"] <= payload["peak_gib"] + 1e-3 for row in highest)
    assert [row["rss_gib"] for row in highest] == sorted((row["rss_gib"] for row in highest), reverse=True)
    assert any(row["where"].split(" < ")[-1].startswith(("layer_walk.", "layerwise.", "pruner.")) for row in highest)
