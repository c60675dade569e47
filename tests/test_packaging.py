"""The wheel ships every sub-package, the bundled corpus, the per-layer-shape model code, the card template and
the optimum-cli plug-in as one PEP 420 namespace file."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    # built from a copy: setuptools writes its ``build/`` beside the sources, which would leave one in the checkout
    source = tmp_path / "source"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(ROOT, source, ignore=junk)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("optimum_mosaic-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "optimum_mosaic").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, package
    for novel in ("emma", "persuasion", "sensesensibility"):
        assert f"optimum_mosaic/data/austen/{novel}.txt.gz" in names
    assert {"optimum_mosaic/data/mixed/code.txt.gz", "optimum_mosaic/data/mixed/prose.txt.gz"} <= names
    assert "optimum_mosaic/models/modeling_mosaic.py" in names
    kernel = {f"optimum_mosaic/sparse/csrc/{f}" for f in ("bitmap_kernel.cpp", "bitmap_common.h", "bitmap_simd.h")}
    assert kernel <= names  # the kernel's source, built on first use
    assert {"optimum_mosaic/model_cards/__init__.py", "optimum_mosaic/model_cards/template.md"} <= names
    assert "optimum/commands/register/register_mosaic.py" in names
    namespace_inits = {"optimum/__init__.py", "optimum/commands/__init__.py", "optimum/commands/register/__init__.py"}
    assert not names & namespace_inits  # PEP 420: optimum's namespaces must stay without __init__.py
    assert [n for n in names if n.startswith("optimum/")] == ["optimum/commands/register/register_mosaic.py"]
    assert not any(n.startswith(("tests/", "benchmarks/", "integrations/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "optimum-mosaic = optimum_mosaic.commands:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
