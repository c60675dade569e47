"""Hub push with a generated model card, against a loopback Hub (tests/hub_server.py) and the real client."""

from __future__ import annotations

import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama, token_windows
from hub_server import HubServer
from huggingface_hub import ModelCard, constants

from optimum_mosaic import PrunedConfig, PrunedModelForCausalLM, Pruner
from optimum_mosaic.commands import main
from optimum_mosaic.hub import MARK_END, MARK_START, TAGS, push_to_hub, render_card
from optimum_mosaic.serialization import linear_summary, save_pruned

TOKEN = "hf_loopbackSecretToken0123456789"
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife. "
CONFIG = PrunedConfig(sparsity=0.5, allocation="layer", pruner="wanda", nsamples=4, seqlen=32)
EVALUATION = {
    "text": "held-out Austen text",
    "windows": 2,
    "seqlen": 32,
    "perplexity_before": 91.2345,
    "perplexity_after": 97.6543,
}
X = token_windows(2, 16, seed=5)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "push_to_hub.py"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model, tokenizer = tiny_llama(), char_tokenizer()
    Pruner(model, tokenizer).prune(CONFIG, calibration_dataset=TEXT * 20)
    model.mosaic_report.evaluation = dict(EVALUATION)
    path = tmp_path_factory.mktemp("pruned") / "tiny-mosaic"
    save_pruned(model, tokenizer, path, model.mosaic_config, model.mosaic_report)
    return model, tokenizer, path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub, with the huggingface_hub client pointed at it and its home and cache in tmp_path."""
    home = tmp_path / "hf_home"
    with HubServer() as server:
        # resolve URLs come from HUGGINGFACE_CO_URL_TEMPLATE, frozen at import: ENDPOINT alone is not enough
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        for name, value in {
            "HF_HOME": home,
            "HF_HUB_CACHE": home / "hub",
            "HF_TOKEN_PATH": home / "token",
            "HF_STORED_TOKENS_PATH": home / "stored_tokens",
            "AGENT_HARNESSES_PATH": home / ".agent_harnesses.json",
        }.items():
            monkeypatch.setattr(constants, name, str(value))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def _readme(hub, repo_id: str, revision: str = "main") -> str:
    return hub.files(repo_id, revision)["README.md"].decode()


def _assert_same_model(model, reloaded) -> None:
    with torch.no_grad():
        assert torch.equal(model(X).logits, reloaded(X).logits)
    assert linear_summary(reloaded) == linear_summary(model)


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def test_model_push_to_hub_round_trip(pruned, hub, tmp_path):
    model, tokenizer, _ = pruned
    url = model.push_to_hub("tester/tiny", token=TOKEN, tokenizer=tokenizer)
    assert url.startswith(f"{hub.url}/tester/tiny/commit/")
    files = hub.files("tester/tiny")
    assert {"model.safetensors", "config.json", "mosaic_config.json", "README.md", "tokenizer.json"} <= set(files)
    assert [c["message"] for c in hub.state.repo("tester/tiny").log][1:] == [
        "Upload Mosaic-pruned model with optimum-mosaic"
    ]  # one commit: weights, sidecar, tokenizer and card together
    reloaded = PrunedModelForCausalLM.from_pretrained("tester/tiny", cache_dir=tmp_path / "cache")
    _assert_same_model(model, reloaded)
    assert reloaded.mosaic_sidecar["zeros"] == linear_summary(model)[1]
    assert reloaded.push_to_hub.func is push_to_hub  # the loader binds our push, too


def test_card_has_the_real_numbers(pruned, hub):
    model, _, path = pruned
    push_to_hub(path, "tester/numbers", token=TOKEN, base_model="HuggingFaceTB/SmolLM2-135M")
    readme = _readme(hub, "tester/numbers")
    card = ModelCard(readme)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert set(TAGS) <= set(card.data.tags)
    report = model.mosaic_report
    assert f"**{_pct(report.achieved_sparsity)}**" in readme
    assert f"| λ (allocation spread) | {report.lamda:g} |" in readme
    cell = report.per_projection["1"]["down"]
    row = next(line for line in readme.splitlines() if line.startswith("| 1 |"))
    assert row.split(" | ")[7] == _pct(cell)  # columns: layer q k v o gate up down
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in readme
    assert "| dense (before pruning) | 91.23 |" in readme and "| pruned | 97.65 |" in readme
    assert "4 windows × 32 tokens (seed 0)" in readme
    assert f"{(path / 'model.safetensors').stat().st_size / 1000:.2f} kB in 1 safetensors file(s)" in readme
    assert "stored in dense matrices" in readme and "only the structured part" in readme
    assert readme.count(MARK_START) == readme.count(MARK_END) == 1


def test_unmeasured_perplexity_and_local_paths(pruned, tmp_path, monkeypatch):
    model, _, _ = pruned
    monkeypatch.setattr(model.mosaic_report, "evaluation", {})
    monkeypatch.setattr(model, "name_or_path", str(tmp_path))  # a local path is never a base_model
    card = render_card(model)
    assert "Perplexity before/after pruning: not measured." in card.text and card.data.base_model is None
    monkeypatch.setattr(model, "name_or_path", "HuggingFaceTB/SmolLM2-135M")
    assert render_card(model).data.base_model == "HuggingFaceTB/SmolLM2-135M"


def test_existing_card_is_extended_and_repush_is_idempotent(pruned, hub):
    _, _, path = pruned
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("tester/carded")
    custom = (
        "---\nlicense: mit\nbase_model: org/original\ntags:\n- my-tag\n---\n# My fine model\n\nHand-written notes.\n\n"
        f"{MARK_START}\nOLD NUMBERS\n{MARK_END}\n\nFooter kept.\n"
    )
    api.upload_file(path_or_fileobj=custom.encode(), path_in_repo="README.md", repo_id="tester/carded")
    push_to_hub(path, "tester/carded", token=TOKEN)
    first = _readme(hub, "tester/carded")
    card = ModelCard(first)
    assert card.data.license == "mit" and card.data.base_model == "org/original"
    assert card.data.tags == ["my-tag", *TAGS]
    assert "Hand-written notes." in first and "Footer kept." in first and "OLD NUMBERS" not in first
    assert first.count(MARK_START) == 1 and "## Pruning (optimum-mosaic)" in first
    push_to_hub(path, "tester/carded", token=TOKEN)
    assert _readme(hub, "tester/carded") == first
    assert str(render_card(path, existing=first, repo_id="tester/carded")) == first


def test_cli_push_to_a_private_branch(pruned, hub, tmp_path, capsys):
    model, _, path = pruned
    argv = ["push", "--model", str(path), "--repo-id", "tester/cli", "--token", TOKEN, "--private"]
    assert main([*argv, "--revision", "v1", "--commit-message", "cli push", "--base-model", "org/base"]) == 0
    assert "tester/cli" in capsys.readouterr().out
    repo = hub.state.repo("tester/cli")
    assert repo.private and repo.log[-1] == {"sha": repo.refs["v1"], "branch": "v1", "message": "cli push"}
    assert "README.md" not in hub.files("tester/cli", "main") and "README.md" in hub.files("tester/cli", "v1")
    assert ModelCard(_readme(hub, "tester/cli", "v1")).data.base_model == "org/base"
    reloaded = PrunedModelForCausalLM.from_pretrained("tester/cli", revision="v1", cache_dir=tmp_path / "cache")
    _assert_same_model(model, reloaded)


def test_token_is_never_written(pruned, hub, tmp_path):
    model, tokenizer, path = pruned
    model.push_to_hub("tester/secret", token=TOKEN, tokenizer=tokenizer)
    push_to_hub(path, "tester/secret", token=TOKEN)
    PrunedModelForCausalLM.from_pretrained("tester/secret", cache_dir=tmp_path / "cache", token=TOKEN)
    assert any(r["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)  # it was used...
    repo = hub.state.repo("tester/secret")
    uploaded = [data for files in repo.commits.values() for data in files.values()]
    local = [f.read_bytes() for root in (tmp_path, path) for f in Path(root).rglob("*") if f.is_file()]
    assert len(local) > 10 and all(TOKEN.encode() not in data for data in uploaded + local)  # ...never stored


def test_rendering_makes_no_network_call(pruned, monkeypatch):
    model, _, path = pruned

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call while rendering: {args}")

    monkeypatch.setattr(constants, "ENDPOINT", "http://10.255.255.1:9")  # unroutable
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    from_dir, from_model = render_card(path, repo_id="tester/offline"), render_card(model)
    assert MARK_START in from_dir.text and "safetensors file(s)" in from_dir.text
    assert "not saved yet" in from_model.text and from_model.data.tags == list(TAGS)


def test_a_model_without_pruning_record_is_refused():
    with pytest.raises(ValueError, match="no Mosaic pruning record"):
        push_to_hub(tiny_llama(), "tester/dense", token=TOKEN)


def test_composite_round_trip_and_push_from_a_reloaded_model(hub, tmp_path):
    model = tiny_llama(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    config = PrunedConfig(sparsity=0.5, structured_sparsity=0.25, allocation="layer", lamda=0.2, nsamples=4, seqlen=32)
    Pruner(model, char_tokenizer()).prune(config, calibration_dataset=TEXT * 20)
    assert model.config.model_type == "mosaic_llama"
    model.push_to_hub("tester/composite", token=TOKEN, tokenizer=char_tokenizer())
    readme = _readme(hub, "tester/composite")
    assert "| removed by structured pruning | ≈ " in readme and "trust_remote_code=True" in readme
    reloaded = PrunedModelForCausalLM.from_pretrained("tester/composite", cache_dir=tmp_path / "cache")
    _assert_same_model(model, reloaded)
    reloaded.push_to_hub("tester/composite-copy", token=TOKEN)  # tokenizer and card come from the snapshot
    assert {"tokenizer.json", "README.md"} <= set(hub.files("tester/composite-copy"))
    assert _readme(hub, "tester/composite-copy") == readme.replace("tester/composite", "tester/composite-copy")
    _assert_same_model(
        model, PrunedModelForCausalLM.from_pretrained("tester/composite-copy", cache_dir=tmp_path / "c2")
    )


def test_example_script(pruned, hub, monkeypatch, capsys):
    _, _, path = pruned
    argv = [str(EXAMPLE), "--model", str(path), "--repo-id", "tester/example", "--endpoint", hub.url, "--token", TOKEN]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "| **all** |" in out and f"{hub.url}/tester/example/commit/" in out
    assert MARK_START in _readme(hub, "tester/example")
