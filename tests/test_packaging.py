"""The built wheel holds everything the library imports and reads: every package, the kernels
under ``fastclip.kernels``, and ``fastclip/tuning.json`` (what ``backend="auto"`` runs on a GPU)
once a GPU run has written it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_packages_and_the_tuning_table(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("fastclip", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    tuning = {"contrastive": {"bfloat16": {"512": {"65536": "blocks"}}}}
    (source / "fastclip" / "tuning.json").write_text(json.dumps(tuning))
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "--quiet", "--wheel-dir", str(dist), str(source)]  # fmt: skip
    run = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    assert json.loads(zipfile.ZipFile(wheel).read("fastclip/tuning.json")) == tuning
    modules = [
        f"fastclip/{p.relative_to(ROOT / 'fastclip')}" for p in ROOT.glob("fastclip/**/*.py")
    ]
    modules += [f"fastclip/kernels/{p.name}" for p in ROOT.glob("kernels/*.py")]
    missing = sorted(set(modules) - names)
    assert not missing, f"modules left out of the wheel: {missing}"
