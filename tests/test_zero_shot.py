"""Zero-shot accuracy through lm-evaluation-harness (``optimum-mosaic eval --tasks``) and the evaluation domains."""

import json
import re
import sys

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, Pruner
from optimum_mosaic.calibration.data import load_default_corpus
from optimum_mosaic.commands import main
from optimum_mosaic.serialization import save_pruned
from optimum_mosaic.zero_shot import lastword_examples, nextsent_examples, write_task

lm_eval = pytest.importorskip("lm_eval")
TEXT = load_default_corpus("evaluation")[:60_000]  # Persuasion: public domain


def tokenizer():
    tok = char_tokenizer()
    tok.eos_token = "<unk>"  # lm-eval's HFLM needs an end-of-text token as the prefix of a continuation
    return tok


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "local_lastword", "lastword", lastword_examples(TEXT, 6, seed=1))
    write_task(folder, "local_nextsent", "nextsent", nextsent_examples(TEXT, 6, seed=1))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    X = token_windows(4, 32)
    unstructured = tiny_llama()
    Pruner(unstructured, tokenizer()).prune(PrunedConfig(sparsity=0.5, pruner="wanda", nsamples=4, seqlen=32), X)
    save_pruned(unstructured, tokenizer(), root / "plain")
    save_pruned(unstructured, tokenizer(), root / "compressed", compressed=True)
    composite = tiny_llama(1)
    config = PrunedConfig(sparsity=0.5, pruner="wanda", nsamples=4, seqlen=32, structured_sparsity=0.2)
    Pruner(composite, tokenizer()).prune(config, X, save_directory=root / "composite")
    return root, unstructured


def table(out: str) -> dict:
    """``{(task, metric): value}`` of the printed table."""
    rows = re.findall(r"^\| (\S+) \| (\w+) \| ([\d.]+) \|", out, re.M)
    return {(t, m): float(v) for t, m, v in rows}


def direct(model, tasks_dir, names) -> dict:
    """The same tasks through lm-eval's own API, without optimum-mosaic's wrapper."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer(), batch_size=1, device="cpu")
    out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)), num_fewshot=0)
    return {
        (t, k.split(",")[0]): v
        for t in names
        for k, v in out["results"][t].items()
        if k in ("acc,none", "acc_norm,none")
    }


def test_a_local_task_gives_what_lm_eval_gives_directly(tasks, checkpoints, capsys):
    root, model = checkpoints
    names = ["local_lastword", "local_nextsent"]
    assert main(["eval", "--model", str(root / "plain"), "--tasks", ",".join(names), "--include-path", str(tasks)]) == 0
    out = capsys.readouterr().out
    ours = table(out)
    assert set(ours) == {("local_lastword", "acc"), ("local_nextsent", "acc"), ("local_nextsent", "acc_norm")}
    assert "| task | metric | pruned | stderr | examples |" in out and "perplexity" not in out
    assert ours == pytest.approx(direct(model, tasks, names), abs=5e-5)  # the table prints 4 decimals


@pytest.mark.parametrize("kind", ["composite", "compressed"])
def test_composite_and_compressed_checkpoints_evaluate(tasks, checkpoints, capsys, kind):
    root, _ = checkpoints
    argv = ["eval", "--model", str(root / kind), "--tasks", "local_nextsent", "--include-path", str(tasks)]
    assert main([*argv, "--limit", "4", "--max-windows", "1", "--seqlen", "64"]) == 0  # tasks and perplexity
    out = capsys.readouterr().out
    assert set(table(out)) == {("local_nextsent", "acc"), ("local_nextsent", "acc_norm")}
    assert json.loads(out.splitlines()[0])["perplexity"] > 1 and "| 4 |" in out


def test_missing_lm_eval_is_one_line_naming_the_extra(checkpoints, capsys, monkeypatch):
    root, _ = checkpoints
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ImportError
    assert main(["eval", "--model", str(root / "plain"), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "optimum-mosaic[eval]"' in err


def test_an_unknown_task_is_one_line(tasks, checkpoints, capsys):
    root, _ = checkpoints
    argv = ["eval", "--model", str(root / "plain"), "--tasks", "local_nextsent,no_such_task", "--include-path"]
    assert main([*argv, str(tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not know the task(s) ['no_such_task']" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--limit", "3"], "--include-path and --limit go with --tasks"),
        (["--domains", "poetry"], "unknown domain"),
        (["--tasks", ","], "at least one task"),
        (["--text", "x.txt", "--domains", "all"], "give one"),
    ],
)
def test_eval_option_errors(checkpoints, capsys, argv, message):
    root, _ = checkpoints
    assert main(["eval", "--model", str(root / "plain"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_lastword_examples_end_a_sentence_of_the_text():
    text = " ".join(TEXT.split())
    for ex in lastword_examples(TEXT, 20, seed=0):
        assert ex["target"].isalpha() and len(ex["context"].split()) == 80
        assert re.search(re.escape(ex["context"]) + r" " + re.escape(ex["target"]) + r"[.!?]", text)


def test_nextsent_examples_hold_the_true_continuation_once():
    text = " ".join(TEXT.split())
    examples = nextsent_examples(TEXT, 20, seed=0)
    assert len(examples) == 20 and {e["label"] for e in examples} <= {0, 1, 2, 3}
    for ex in examples:
        true = ex["choices"][ex["label"]]
        assert len(set(ex["choices"])) == 4 and f"{ex['context']} {true}" in text
        assert all(f"{ex['context']} {c}" not in text for i, c in enumerate(ex["choices"]) if i != ex["label"])


def test_the_evaluation_domains_differ_from_the_calibration_text():
    from optimum_mosaic.domains import domain_text

    code, docs = domain_text("python-code"), domain_text("python-docs")
    assert "def " in code and "class ArgumentParser" in code and len(code) > 100_000
    assert "statement" in docs and len(docs) > 100_000
    assert domain_text("persuasion").startswith("Persuasion")
    with pytest.raises(ValueError, match="unknown evaluation domain 'poetry'"):
        domain_text("poetry")


def test_eval_on_domains_prints_one_line_per_domain(checkpoints, capsys):
    root, _ = checkpoints
    argv = ["eval", "--model", str(root / "plain"), "--domains", "persuasion,python-code", "--seqlen", "64"]
    assert main([*argv, "--max-windows", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["domain"] for line in lines] == ["persuasion", "python-code"]
    assert all(torch.isfinite(torch.tensor(line["perplexity"])) for line in lines)


def test_prune_records_measured_task_accuracy_in_the_card(tmp_path, capsys, monkeypatch):
    """``prune --eval-tasks``: dense and pruned accuracy of the package's offline task, in sidecar and card."""
    monkeypatch.setenv("OPTIMUM_MOSAIC_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny"
    tiny_llama().save_pretrained(src)
    tokenizer().save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT[:20_000])
    argv = ["prune", "--model", str(src), "--calibration-text", str(text), "--nsamples", "4", "--seqlen", "32",
            "--pruner", "wanda", "--output", str(tmp_path / "out"), "--eval-tasks", "mosaic_nextsent_persuasion",
            "--task-limit", "5"]  # fmt: skip
    assert main(argv) == 0
    sidecar = json.loads((tmp_path / "out" / "mosaic_config.json").read_text())
    rows = sidecar["report"]["evaluation"]["tasks"]
    assert [(r["task"], r["metric"], r["examples"]) for r in rows] == [
        ("mosaic_nextsent_persuasion", "acc", 5), ("mosaic_nextsent_persuasion", "acc_norm", 5)]  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    r = rows[0]
    assert f"| mosaic_nextsent_persuasion | acc | {r['dense']} | {r['pruned']} |" in card
    assert not (tmp_path / "cache" / "lm_eval_tasks-v2" / "shakespeare").exists()  # built only when named


def test_no_zero_shot_table_in_a_card_without_measurements(checkpoints):
    root, _ = checkpoints
    assert "Zero-shot accuracy" not in (root / "plain" / "README.md").read_text()
