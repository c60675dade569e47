"""benchmarks/domains_table.py's table printers: their arithmetic on hand-made rows, and the perplexity, zero-shot and
headline tables of benchmarks/RESULTS.md being exactly what they print from the committed JSON (an edited figure fails
here). No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")


@pytest.fixture
def table(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import domains_table

    return domains_table


def _row(run: str, sparsity: float, ppl: float, acc: float, se: float) -> dict:
    keys = ("persuasion", "python-code", "python-docs", "shakespeare")
    tasks = {
        "mosaic_lastword_persuasion/acc": [acc, se],
        "mosaic_nextsent_persuasion/acc": [acc, se],
        "mosaic_nextsent_persuasion/acc_norm": [0.5, se],
        "mosaic_lastword_shakespeare/acc": [acc, se],
        "mosaic_nextsent_shakespeare/acc": [acc, se],
        "mosaic_nextsent_shakespeare/acc_norm": [0.5, se],
    }
    return {"run": run, "sparsity": sparsity, "ppl": dict.fromkeys(keys, ppl), "tasks": tasks}


def test_headline_arithmetic(table):
    rows = [
        _row("composite β=0.2 (default pruner)", 0.5, 60.0, 0.25, 0.03),
        _row("structured only (MLP channels)", 0.5, 80.0, 0.20, 0.04),
        _row("uniform SparseGPT", 0.5, 70.0, 0.2, 0.01),  # not a headline row
        _row("composite β=0.2 (default pruner)", 0.3, 50.0, 0.3, 0.03),  # no structured-only partner: left out
    ]
    text = table.headline_markdown(rows)
    assert (
        "| 50 % | 60.00 / 60.00 / 60.00 / 60.00 | 80.00 / 80.00 / 80.00 / 80.00 | 25.0 / 25.0 / 25.0 / 25.0 % |" in text
    )
    assert "30 %" not in text and "70.00" not in text
    # 0.25 − 0.20 = 0.05 over σ = √(0.03² + 0.04²) = 0.05: 1.0 σ
    assert "| last-word *Persuasion* / acc | 0.250 ± 0.030 | 0.200 ± 0.040 | +0.050 (1.0 σ) |" in text
    # means 0.25 / 0.20 (+25 %); each mean's stderr √(4·se²)/4 = se/2: σ = √(0.015² + 0.02²) = 0.025, 0.05 / 0.025 = 2
    assert "| mean of the four tasks' acc | 0.250 | 0.200 | +25 % relative (2.0 σ) |" in text


def test_tasks_table_orders_and_averages(table):
    rows = [_row("default", 0.5, 1.0, 0.3, 0.02), _row("uniform SparseGPT", 0.5, 1.0, 0.1, 0.02)]
    rows.append(dict(_row("structured only (MLP channels)", 0.5, 1.0, 0.1, 0.02)))  # headline rows are not listed
    lines = table.tasks_markdown(rows).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["uniform SparseGPT", "default"]
    assert lines[1].endswith("| 0.300 ± 0.010 |")  # mean of four 0.3; √(4 · 0.02²) / 4 = 0.01


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_results_tables_are_the_scripts_output(table, model):
    rows = json.loads((ROOT / "benchmarks" / "results" / f"domains_{model}.json").read_text(encoding="utf-8"))["rows"]
    assert table.markdown(rows) in RESULTS_MD, f"the perplexity table of {model} is not the script's output"
    assert table.tasks_markdown(rows) in RESULTS_MD, f"the zero-shot table of {model} is not the script's output"
    for part in table.headline_markdown(rows).split("\n\n"):  # two tables, which the text may separate
        assert part in RESULTS_MD, f"a headline table of {model} is not the script's output:\n{part}"


def test_sigmas_of_zero_stderr(table):
    assert table.sigmas(0.05, 0.03, 0.04) == "1.0"
    assert table.sigmas(0.0, 0.0, 0.0) == "0.0"  # both tasks at accuracy 0: no stderr, no difference
    assert table.sigmas(0.1, 0.0, 0.0) == "∞"


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_dense_target_tables_are_the_scripts_output(table, model):
    rows = json.loads((ROOT / "benchmarks" / "results" / f"dense_target_{model}.json").read_text(encoding="utf-8"))
    text = table.markdown(rows["rows"], baseline="default")
    assert text in RESULTS_MD, f"the dense-target table of {model} is not the script's output"
    assert "| ALPS-warm, mixed corpus, dense target | 0.7 |" in text and "(1.0" in text  # ratios against the default


@pytest.fixture
def left_out(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import leave_one_out

    return leave_one_out


def test_leave_one_out_arithmetic(left_out):
    rows = [
        dict(run="dense", sparsity=0.0, left_out=p, nll=v) for p, v in (("fiction", 3.6), ("code", 2.9), ("prose", 3.3))
    ]
    rows += [
        dict(run="default", sparsity=0.7, left_out=p, nll=v)
        for p, v in (("fiction", 4.6), ("code", 4.0), ("prose", 4.5))
    ]
    target = "ALPS-warm, mixed corpus, dense target"
    rows += [
        dict(run=target, sparsity=0.7, left_out=p, nll=v) for p, v in (("fiction", 4.7), ("code", 3.7), ("prose", 4.9))
    ]
    lines = left_out.markdown(rows).splitlines()
    assert lines[2] == "| dense | – | 3.600 | 2.900 | 3.300 | 3.267 |"
    assert lines[3] == "| default | 70 % | 4.600 | 4.000 | 4.500 | 4.367 |"
    assert lines[4] == f"| {target} | 70 % | 4.700 (+0.100) | 3.700 (-0.300) | 4.900 (+0.400) | 4.433 (+0.067) |"


def test_leave_one_out_table_is_the_scripts_output(left_out):
    rows = json.loads((ROOT / "benchmarks" / "results" / "leave_one_out_smollm2-135m.json").read_text(encoding="utf-8"))
    assert left_out.markdown(rows["rows"]) in RESULTS_MD, "the leave-one-out table is not the script's output"
