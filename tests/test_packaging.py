"""An installed, non-editable copy (what the Docker image has) resolves every DeepSpeed preset by
name: deepspeed_configs/ ships inside the wheel as pipeline/deepspeed_configs."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tiny import REPO

pytestmark = pytest.mark.integration
PRESETS = sorted(p.stem for p in (REPO / "deepspeed_configs").glob("*.json"))

CHECK = """
import json, sys
import pipeline
from pipeline.config import TrainConfig
from pipeline.train.parallel import zero_config
names = json.loads(sys.argv[1])
resolved = {n: str(zero_config.config_path(n)) for n in names}
for n in names:
    zero_config.resolve_config(n, TrainConfig(strategy="deepspeed", deepspeed_config=n), world_size=2, device_type="cpu")
print(json.dumps({"package": pipeline.__file__, "presets": resolved}))
"""


def test_a_fresh_non_editable_install_resolves_every_deepspeed_preset(tmp_path):
    assert {"zero1", "zero2", "zero3", "zero3_offload"} <= set(PRESETS)
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("pipeline", "flows", "deepspeed_configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("tunepipe-*.whl"))
    assert {f"pipeline/deepspeed_configs/{n}.json" for n in PRESETS} <= set(zipfile.ZipFile(wheel).namelist())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    # The dependencies (torch, transformers, ...) come from this venv's site-packages, added after
    # the fresh venv's own: the installed tunepipe wins, and this checkout's editable finder (a
    # .pth file there) is not processed, so nothing can resolve from the repo.
    fresh_site = next((venv / "lib").glob("python3*/site-packages"))
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    done = subprocess.run([str(python), "-c", CHECK, json.dumps(PRESETS)], cwd=outside, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(fresh_site)), found
    for name, path in found["presets"].items():
        assert path == str(fresh_site / "pipeline" / "deepspeed_configs" / f"{name}.json")
