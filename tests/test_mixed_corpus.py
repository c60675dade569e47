"""The bundled mixed calibration corpus: fixed shares per part, seeded, disjoint held-out windows, recorded."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from optimum_mosaic import PrunedConfig
from optimum_mosaic.calibration import data as calibration_data
from optimum_mosaic.calibration.data import _shares, load_mixed_part, mixed_windows, sample_windows
from optimum_mosaic.domains import domain_text

SHORT = {}  # the first characters of each part: a character tokenizer on the whole corpus takes a minute


@pytest.fixture
def short_parts(monkeypatch):
    real = calibration_data.load_mixed_part
    for part, size in (("fiction", 200_000), ("code", 60_000), ("prose", 60_000)):
        SHORT.setdefault(part, real(part)[:size])
    monkeypatch.setattr(calibration_data, "load_mixed_part", SHORT.__getitem__)
    return SHORT


def _part_of(tokenizer, windows: torch.Tensor, seqlen: int) -> list[str]:
    """Which part each window comes from, by looking it up among every part's windows."""
    owner = {}
    for part in ("fiction", "code", "prose"):
        ids = tokenizer(
            calibration_data.load_mixed_part(part), add_special_tokens=False, return_tensors="pt"
        ).input_ids[0]
        for w in calibration_data.split_windows(ids, seqlen):
            owner.setdefault(tuple(w.tolist()), part)
    return [owner[tuple(w.tolist())] for w in windows]


def test_largest_remainder_shares_sum_to_the_total():
    assert _shares(32, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 16, "b": 8, "c": 8}
    assert _shares(7, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 3, "b": 2, "c": 2}  # remainders .5 < .75
    assert _shares(1, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 1, "b": 0, "c": 0}
    for total in range(40):
        assert sum(_shares(total, {"a": 0.5, "b": 0.25, "c": 0.25}).values()) == total


def test_mixed_windows_take_each_part_in_its_share_and_hold_out_disjoint_windows(short_parts):
    tok = char_tokenizer()
    calib, held = sample_windows(tok, None, 12, 256, seed=0, holdout=8, corpus="mixed")
    assert calib.shape == (12, 256) and held.shape == (8, 256)
    parts = _part_of(tok, torch.cat([calib, held]), 256)
    assert sorted(parts[:12]) == ["code"] * 3 + ["fiction"] * 6 + ["prose"] * 3
    assert parts[12:] == ["fiction"] * 4 + ["code"] * 2 + ["prose"] * 2
    seen = {tuple(w.tolist()) for w in calib}
    assert not any(tuple(w.tolist()) in seen for w in held)
    again, _ = mixed_windows(tok, 12, 256, 0, 8)
    other, _ = mixed_windows(tok, 12, 256, 1, 8)
    assert torch.equal(again, calib) and not torch.equal(other, calib)


def test_a_part_too_short_for_its_share_leaves_the_rest_to_fiction(short_parts, monkeypatch):
    tok = char_tokenizer()
    parts = dict(short_parts, prose=short_parts["prose"][: 3 * 512 + 10])  # three windows of 512 characters
    monkeypatch.setattr(calibration_data, "load_mixed_part", parts.__getitem__)
    calib, held = mixed_windows(tok, 8, 512, 0, 4)
    parts = _part_of(tok, torch.cat([calib, held]), 512)
    assert parts.count("prose") == 3 and parts.count("code") == 3 and parts.count("fiction") == 6


def test_the_mixed_corpus_is_not_evaluation_text():
    code, prose = load_mixed_part("code"), load_mixed_part("prose")
    assert len(code) > 300_000 and len(prose) > 150_000
    assert "# file: optimum_mosaic/pruner.py" in code
    assert "def _calibrate" in code and "Transformers" in prose
    persuasion = calibration_data.load_default_corpus("evaluation")
    assert persuasion[10_000:10_200] not in load_mixed_part("fiction")
    stdlib = domain_text("python-code")  # the python-code evaluation domain: none of its text is in the code part
    assert not any(stdlib[i : i + 200] in code for i in range(0, len(stdlib) - 200, len(stdlib) // 50))
    folder = resources.files("optimum_mosaic") / "data" / "mixed"
    for part in ("code", "prose"):  # gzip members carry no time stamp: rebuilding gives the same bytes
        assert gzip.decompress((folder / f"{part}.txt.gz").read_bytes()).decode() == load_mixed_part(part)
        assert (folder / f"{part}.txt.gz").read_bytes()[4:8] == b"\0\0\0\0"


def test_config_validates_and_records_the_corpus():
    assert PrunedConfig().calibration_corpus == "mixed"  # issue 19: README "Defaults"
    assert PrunedConfig(calibration_corpus="mixed").to_dict()["calibration_corpus"] == "mixed"
    with pytest.raises(ValueError, match="calibration_corpus"):
        PrunedConfig(calibration_corpus="wikipedia")
    with pytest.raises(ValueError, match="corpus must be one of"):
        sample_windows(char_tokenizer(), None, 2, 16, 0, corpus="wiki")


def test_a_prune_on_the_mixed_corpus_calibrates_on_its_windows_and_says_so(short_parts, tmp_path):
    from optimum_mosaic import Pruner
    from optimum_mosaic.calibration.data import CORPUS_NAMES

    tok = char_tokenizer()
    pruner = Pruner(tiny_llama(), tok)
    config = PrunedConfig(sparsity=0.5, nsamples=8, seqlen=32, pruner="sparsegpt", calibration_corpus="mixed")
    pruner.prune(config, save_directory=tmp_path / "ck")
    assert torch.equal(pruner._windows, mixed_windows(tok, 8, 32, 0, 0)[0])
    assert pruner.report.calibration["source"] == CORPUS_NAMES["mixed"]
    assert PrunedConfig.from_pretrained(tmp_path / "ck").calibration_corpus == "mixed"
    card = (tmp_path / "ck" / "README.md").read_text(encoding="utf-8")
    assert "8 windows × 32 tokens (seed 0) sampled from the mixed corpus bundled with optimum-mosaic" in card


def _counting(tokenizer):
    calls = []
    original = type(tokenizer).__call__

    class Counted(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return original(self, *args, **kwargs)

    tokenizer.__class__ = Counted
    return tokenizer, calls


def test_the_corpus_tokens_are_kept_on_disk_and_read_back(short_parts, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration_data, "token_cache", lambda: tmp_path / "tokens")
    tokenizer, calls = _counting(char_tokenizer())
    first = calibration_data.part_ids(tokenizer, "code")
    files = list((tmp_path / "tokens").glob("code-*.pt"))
    assert len(calls) == 1 and len(files) == 1 and not list((tmp_path / "tokens").glob(".*"))  # no temporary left
    expected = char_tokenizer()(short_parts["code"], add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(first, expected) and first.dtype == torch.long
    again = calibration_data.part_ids(tokenizer, "code")
    assert len(calls) == 1 and torch.equal(again, expected) and again.dtype == torch.long  # read, not tokenised
    files[0].write_bytes(b"not a tensor")  # a damaged file is made again
    assert torch.equal(calibration_data.part_ids(tokenizer, "code"), expected) and len(calls) == 2
    assert torch.equal(torch.load(files[0], weights_only=True).long(), expected)
    other = char_tokenizer()
    other.backend_tokenizer.pre_tokenizer = None  # another tokenizer: its own file
    calibration_data.part_ids(other, "code")
    assert len(list((tmp_path / "tokens").glob("code-*.pt"))) == 2


def test_a_cache_that_cannot_be_written_is_passed_over(short_parts, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(calibration_data, "token_cache", lambda: tmp_path / "file" / "tokens")  # under a file
    ids = calibration_data.part_ids(char_tokenizer(), "prose")
    assert ids.numel() == len(short_parts["prose"])  # one token per character


@pytest.mark.parametrize("left_out", ["fiction", "code", "prose"])
def test_leave_one_out_windows_never_show_the_left_out_part(short_parts, monkeypatch, left_out):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from leave_one_out import left_out_windows

    tok = char_tokenizer()
    calibration, held = left_out_windows(tok, left_out, 12, 64, 5)
    assert calibration.shape == (12, 64) and held.shape == (5, 64)
    parts = _part_of(tok, calibration, 64)
    kept = {"fiction": {"code": 6, "prose": 6}, "code": {"fiction": 8, "prose": 4}, "prose": {"fiction": 8, "code": 4}}
    assert {p: parts.count(p) for p in set(parts)} == kept[left_out]  # the other parts in their relative shares
    assert set(_part_of(tok, held, 64)) == {left_out}
    assert left_out_windows(tok, left_out, 12, 64, 5)[0].equal(calibration)  # seeded
