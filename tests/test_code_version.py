"""A stage's code version is found from the code itself: edit any module and exactly the stages
that run it get a new fingerprint; a stage run in another process (torchrun's worker) counts too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import QUICKSTART, REPO, tiny_overrides, trainer_args

from pipeline import stages
from pipeline.code_version import closure, code_version, data_files

EVERY_STAGE = sorted(stages.ORDER)

# Runs inside a copy of the project: edits each file in turn and reports which stage fingerprints moved.
EDIT_EACH_FILE = r'''
import json, sys
from pipeline import stages
from pipeline.artifacts import Artifact
from pipeline.code_version import ROOT, closure
from pipeline.config import build_config

assert str(ROOT) == sys.argv[2], (ROOT, sys.argv[2])  # the copy, not the checkout
cfg = build_config({"data": {"source": sys.argv[1]}, "preprocess": {"remove_stopwords": True}})
parents = {name: Artifact(name, "f" * 64, "/nowhere") for name in stages.ORDER}
fingerprints = lambda: {name: stages.compute_fingerprint(name, cfg, parents) for name in stages.ORDER}
before = fingerprints()
changed = {}
for path in sorted(p for p in (ROOT / "pipeline").rglob("*") if p.is_file() and "__pycache__" not in p.parts):
    original = path.read_bytes()
    path.write_bytes(original + b"\n# appended by the test\n")
    try:
        after = fingerprints()
    finally:
        path.write_bytes(original)
    changed[path.relative_to(ROOT).as_posix()] = sorted(n for n in stages.ORDER if after[n] != before[n])
closures = {n: sorted(p.relative_to(ROOT).as_posix() for p in closure(stages.STAGES[n].module).values()) for n in stages.ORDER}
print(json.dumps({"changed": changed, "closures": closures, "restored": fingerprints() == before}))
'''


def copy_project(dest: Path) -> Path:
    shutil.copytree(REPO / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "deepspeed_configs", dest / "deepspeed_configs")
    return dest


def in_copy(root: Path) -> dict:
    """Environment that imports `pipeline` from the copy at `root`, not from the checkout."""
    return {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}


def test_editing_any_file_changes_exactly_the_stages_that_run_it(tmp_path):
    root = copy_project(tmp_path / "copy")
    data = str(REPO / "examples" / "data" / "support.csv")
    done = subprocess.run([sys.executable, "-c", EDIT_EACH_FILE, data, str(root)], cwd=root, env=in_copy(root),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    changed, closures = report["changed"], report["closures"]
    assert report["restored"]
    assert len(changed) >= 40, sorted(changed)

    # What the closures say, file by file: an edit moves exactly the stages whose closure holds it.
    for path, moved in changed.items():
        if path.endswith(".py"):
            assert moved == sorted(n for n in stages.ORDER if path in closures[n]), path
    # And what a reader of the code knows, whatever the closure finder thinks:
    expected = {
        "pipeline/train/cpu_dropout.py": ["train"],  # changes the weights, imported only by the recipe
        "pipeline/train/__main__.py": ["train"],  # what `torchrun -m pipeline.train` runs
        "pipeline/train/recipe.py": ["train"],
        "pipeline/train/parallel/zero.py": ["train"],  # imported lazily, when strategy is deepspeed
        "pipeline/train/modeling.py": ["evaluate", "reference", "train"],
        "pipeline/train/methods/prompt_tuning.py": ["evaluate", "train"],
        "pipeline/config/train.py": EVERY_STAGE,  # config code derives what every stage is handed
        "pipeline/config/pipeline.py": EVERY_STAGE,
        "pipeline/data/normalize.py": ["preprocess"],
        "pipeline/data/stopwords_en.txt": ["preprocess"],  # data a module names, not code
        "pipeline/data/packing.py": ["tokenize"],
        "pipeline/data/csv_reader.py": ["ingest"],
        "pipeline/evaluate/metrics.py": ["evaluate"],
        "pipeline/registry/store.py": ["publish"],
        "pipeline/stages.py": [],  # the runner, not a stage
        "pipeline/cli.py": [],
    }
    assert {path: changed[path] for path in expected} == expected


def test_closure_finds_lazy_imports_launched_modules_and_named_data():
    train = closure("pipeline.train.stage")
    assert {"pipeline.train.__main__", "pipeline.train.recipe", "pipeline.train.parallel.zero", "pipeline.train.parallel.ddp"} <= set(train)
    assert {"pipeline", "pipeline.train", "pipeline.train.parallel"} <= set(train)  # packages' __init__ run first
    assert "pipeline.evaluate.stage" not in train and "pipeline.stages" not in train
    assert list(data_files(closure("pipeline.data.preprocess"))) == ["pipeline/data/stopwords_en.txt"]
    assert data_files(closure("pipeline.data.ingest")) == {}
    assert code_version("pipeline.data.sample") == code_version("pipeline.data.sample")
    assert code_version("pipeline.data.sample") != code_version("pipeline.data.preprocess")


@pytest.mark.integration
def test_every_module_the_worker_imports_is_in_the_train_closure(tmp_path):
    """The closure is static; here the real worker runs (LoRA, DDP code path) and Python lists
    every module it imported, lazy ones included (`-X importtime`)."""
    from pipeline.config import load_config

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "registry"))
    tokenized = stages.run_stages(cfg, str(tmp_path / "runs"), until="tokenize", log=lambda _: None)[-1].output
    args = trainer_args(tokenized, tmp_path, *tiny_overrides(tmp_path / "registry"), "train.max_steps=2", "train.method=lora",
                        "train.tensorboard=false", config=QUICKSTART)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    imported = set(re.findall(r"\|\s+(pipeline(?:\.\w+)*)\s*$", done.stderr, re.MULTILINE))
    assert {"pipeline.train.recipe", "pipeline.train.methods.lora", "pipeline.train.parallel.ddp"} <= imported
    assert imported <= set(closure("pipeline.train.stage")), imported - set(closure("pipeline.train.stage"))


def statuses(stdout: str) -> dict[str, str]:
    summary = json.loads(Path(stdout.strip().splitlines()[-1]).read_text())
    return {s["name"]: s["status"] for s in summary["stages"]}


@pytest.mark.integration
@pytest.mark.slow
def test_editing_a_module_reruns_its_stage_and_an_ignored_key_keeps_the_cache(tmp_path):
    """In a copy of the project, through the CLI: an edited evaluate module reruns evaluate only,
    an edited training module reruns train; a key the method ignores is warned about once and
    changes nothing."""
    root = copy_project(tmp_path / "copy")
    command = [sys.executable, "-m", "pipeline.cli", "stage", "evaluate", str(QUICKSTART), "--workdir", str(tmp_path / "runs")]
    for override in tiny_overrides(tmp_path / "registry", **{"train.max_steps": 6}):
        command += ["--set", override]

    def run(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*command, *extra], cwd=root, env=in_copy(root), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    assert set(statuses(run().stdout).values()) == {"ran"}
    with open(root / "pipeline" / "evaluate" / "metrics.py", "a") as f:
        f.write("# a comment, appended\n")
    assert statuses(run().stdout) == {**dict.fromkeys(["ingest", "sample", "preprocess", "tokenize", "train"], "cached"), "evaluate": "ran"}
    with open(root / "pipeline" / "train" / "cpu_dropout.py", "a") as f:
        f.write("# a comment, appended\n")
    assert statuses(run().stdout) == {**dict.fromkeys(["ingest", "sample", "preprocess", "tokenize"], "cached"), "train": "ran", "evaluate": "ran"}

    done = run("--set", "train.lora_r=64")
    assert set(statuses(done.stdout).values()) == {"cached"}
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "train.lora_r" in warnings[0] and "train.method is full" in warnings[0], warnings
