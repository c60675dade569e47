"""Zero-shot task accuracy through lm-evaluation-harness (``pip install "optimum-mosaic[eval]"``).

``evaluate_tasks`` runs lm-eval's ``HFLM`` on a model already in memory (so checkpoints go through the checked
loader: composite and compressed ones included, no ``trust_remote_code`` prompt) and returns one row per task
metric. Hub tasks (hellaswag, arc_easy, piqa, …) work where the Hub is reachable; offline, local YAML tasks work
(``include_path``), and the package builds its own from the evaluation domains (``offline_tasks``):

- ``mosaic_lastword_<domain>``: LAMBADA-style, a passage of about 80 words and its last word; accuracy = the
  word is the model's greedy continuation;
- ``mosaic_nextsent_<domain>``: the sentence that follows a passage among four (three drawn from elsewhere in
  the same text); accuracy (``acc``) and length-normalised accuracy (``acc_norm``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

OFFLINE_DOMAINS = ("persuasion", "shakespeare")
TASKS_VERSION = 2  # bump when the builder changes: the cached tasks are rebuilt
EXAMPLES = 500  # per task; a run takes ``limit`` of them (the first ones: the order is seeded)


class MissingLmEvalError(ImportError):
    """lm-evaluation-harness is not installed."""


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float
    stderr: float | None
    examples: int


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise MissingLmEvalError(
            'zero-shot tasks need lm-evaluation-harness: pip install "optimum-mosaic[eval]" (or pip install lm-eval)'
        ) from err


# -- the package's offline tasks ------------------------------------------------------------------------
def _sentences(text: str) -> list[str]:
    """Sentences of prose or verse in order, whitespace collapsed."""
    flat = re.sub(r"\s+", " ", text)
    return [p.strip() for p in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", flat) if p.strip()]


def _candidate(sentence: str) -> bool:
    return 6 <= len(sentence.split()) <= 40  # neither a fragment nor a paragraph-long run


def lastword_examples(text: str, n: int, seed: int = 0) -> list[dict]:
    """Passages of ≈ 80 words ending at a sentence end, split into context and last word (letters only)."""
    words = re.sub(r"\s+", " ", text).split(" ")
    rng = random.Random(seed)
    out, tried = [], 0
    while len(out) < n and tried < 50 * n:
        tried += 1
        end = rng.randrange(80, len(words))
        last = words[end]
        word = last.rstrip(".!?\"';:,")
        if not last.endswith((".", "!", "?")) or not word.isalpha() or len(word) < 3:
            continue
        context = " ".join(words[end - 80 : end])
        out.append({"context": context, "target": word})
    return out


def nextsent_examples(text: str, n: int, seed: int = 0, choices: int = 4) -> list[dict]:
    """The three sentences before a sentence of the text, and four candidate continuations: that sentence at a
    seeded position and three drawn from elsewhere in the text (6 to 40 words each, all different)."""
    sents = _sentences(text)
    usable = [i for i in range(3, len(sents)) if _candidate(sents[i])]
    rng = random.Random(seed)
    out = []
    for i in rng.sample(usable, min(n, len(usable))):
        distractors: list[str] = []
        while len(distractors) < choices - 1:  # from elsewhere: more than 5 sentences away, all different
            j = rng.choice(usable)
            if abs(j - i) > 5 and sents[j] != sents[i] and sents[j] not in distractors:
                distractors.append(sents[j])
        label = rng.randrange(choices)
        options = distractors[:label] + [sents[i]] + distractors[label:]
        out.append({"context": " ".join(sents[i - 3 : i]), "choices": options, "label": label})
    return out


_LASTWORD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""
_NEXTSENT = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def write_task(folder: Path, name: str, kind: str, examples: list[dict], final: Path | None = None) -> None:
    """One lm-eval YAML task ``name`` (``kind``: ``lastword`` or ``nextsent``) over ``examples`` in ``folder``
    (``final``: the folder the files will be in when used, if ``folder`` is renamed later)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    data = json.dumps(str((final or folder).resolve() / f"{name}.jsonl"))
    template = {"lastword": _LASTWORD, "nextsent": _NEXTSENT}[kind]
    (folder / f"{name}.yaml").write_text(template.format(name=name, data=data, version=TASKS_VERSION))


def offline_tasks(domain: str) -> Path:
    """The folder of the package's offline tasks of ``domain`` (built once into the cache from its text)."""
    from .domains import domain_text
    from .packaged_models import cache_dir
    from .serialization import atomic_directory

    target = cache_dir() / f"lm_eval_tasks-v{TASKS_VERSION}" / domain
    if (target / "done").is_file():
        return target
    with atomic_directory(target, overwrite=True) as staging:  # the cache folder is ours
        text, key = domain_text(domain), domain.replace("-", "_")
        write_task(staging, f"mosaic_lastword_{key}", "lastword", lastword_examples(text, EXAMPLES), target)
        write_task(staging, f"mosaic_nextsent_{key}", "nextsent", nextsent_examples(text, EXAMPLES), target)
        (staging / "done").write_text("ok\n")
    return target


def _offline_domains(tasks) -> list[str]:
    """The domains whose offline tasks ``tasks`` name (all of them when ``tasks`` is None)."""
    if tasks is None:
        return list(OFFLINE_DOMAINS)
    return [
        d
        for d in OFFLINE_DOMAINS
        if any(t.endswith("_" + d.replace("-", "_")) and t.startswith("mosaic_") for t in tasks)
    ]


# -- running lm-eval --------------------------------------------------------------------------------------
def task_manager(include_path=None, tasks=None):
    """lm-eval's ``TaskManager`` over ``include_path`` and (when ``tasks`` names one, or is None) the package's
    offline tasks, plus lm-eval's own tasks unless every one of ``tasks`` is found locally (scanning lm-eval's
    thousands of YAML files takes ≈ 20 s)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    paths += [str(offline_tasks(d)) for d in _offline_domains(tasks)]  # built (and fetched) only when named
    if tasks is not None:
        local = TaskManager(include_path=paths or None, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths or None)


def check_tasks(tasks: list[str], manager) -> None:
    """``ValueError`` naming the tasks lm-eval does not know (before any model is loaded)."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        mosaic = [f"mosaic_{k}_{d.replace('-', '_')}" for d in OFFLINE_DOMAINS for k in ("lastword", "nextsent")]
        raise ValueError(
            f"lm-eval does not know the task(s) {unknown}: check the name, or give the folder of your YAML task with "
            f"--include-path; offline tasks of this package: {', '.join(mosaic)}"
        )


def evaluate_tasks(model, tokenizer, tasks, include_path=None, limit=None, batch_size: int = 1, manager=None):
    """Zero-shot ``tasks`` on ``model`` with lm-eval's ``HFLM``; one ``TaskResult`` per task and metric."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    manager = manager or task_manager(include_path, tasks)
    check_tasks(tasks, manager)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    rows = []
    for task in tasks:
        metrics = out["results"][task]
        n = (out.get("n-samples") or {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if (
                name in ("alias", "samples", "sample_len")
                or name.endswith("_stderr")
                or not isinstance(value, (int, float))
            ):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}")
            rows.append(TaskResult(task, name, float(value), None if stderr in (None, "N/A") else float(stderr), n))
    return rows


def format_rows(rows: list[TaskResult], label: str = "value") -> str:
    """A Markdown table: task, metric, value, stderr, examples."""
    lines = [f"| task | metric | {label} | stderr | examples |", "|---|---|---|---|---|"]
    for r in rows:
        stderr = "–" if r.stderr is None else f"{r.stderr:.4f}"
        lines.append(f"| {r.task} | {r.metric} | {r.value:.4f} | {stderr} | {r.examples if r.examples else '?'} |")
    return "\n".join(lines)
