"""Project layout rules: stages never import Prefect, shipped DeepSpeed configs parse, the CLI starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_SOURCES = sorted((ROOT / "pipeline").rglob("*.py"))
DEEPSPEED_CONFIGS = sorted((ROOT / "deepspeed_configs").glob("*.json"))
IMPORTS_PREFECT = re.compile(r"^\s*(import|from)\s+prefect\b", re.MULTILINE)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_pipeline_source_imports_prefect():
    assert len(PIPELINE_SOURCES) >= 10
    offenders = [p.relative_to(ROOT).as_posix() for p in PIPELINE_SOURCES if IMPORTS_PREFECT.search(p.read_text())]
    assert offenders == []


def test_the_prefect_pattern_catches_both_spellings():
    assert IMPORTS_PREFECT.search("x = 1\n    from prefect import flow\n")
    assert IMPORTS_PREFECT.search("import prefect.logging\n")
    assert not IMPORTS_PREFECT.search("import prefectish\n# prefect is for flows/\n")


def test_importing_every_pipeline_module_leaves_prefect_unloaded():
    # A fresh interpreter: in this one, another test may have imported Prefect already.
    names = [module_name(p) for p in PIPELINE_SOURCES if p.name != "__main__.py"]  # __main__ runs, it is not imported
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert "pipeline.cli" in names and "pipeline.stages" in names


def test_there_are_deepspeed_configs():
    assert {p.name for p in DEEPSPEED_CONFIGS} >= {"zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_parses(path):
    config = json.loads(path.read_text())
    stage = config["zero_optimization"]["stage"]
    assert stage in (0, 1, 2, 3)
    if path.stem.startswith("zero") and path.stem[4:5].isdigit():
        assert stage == int(path.stem[4])
    # Batch fields are filled from the train config, never duplicated (see deepspeed_configs/README.md).
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"] == {"enabled": "auto"}
    assert "train_batch_size" not in config and "optimizer" not in config and "scheduler" not in config


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_accepts_the_config_once_filled(path):
    """What the trainer will do: replace every "auto" from the train config, then hand it to DeepSpeed."""
    DeepSpeedConfig = pytest.importorskip("deepspeed.runtime.config").DeepSpeedConfig
    config = json.loads(path.read_text())
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, gradient_clipping=0.5, bf16={"enabled": False})

    parsed = DeepSpeedConfig(config)

    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (4, 2)
    assert parsed.train_batch_size == 8  # derived: micro x accumulation x world size 1
    assert parsed.gradient_clipping == 0.5
    assert parsed.zero_optimization_stage == config["zero_optimization"]["stage"]


def test_offload_config_offloads_optimizer_and_params_to_cpu():
    zero = json.loads((ROOT / "deepspeed_configs" / "zero3_offload.json").read_text())["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        assert zero[key] == {"device": "cpu", "pin_memory": True}, key


def test_cli_help_lists_the_commands():
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tunepipe")
    for command in ("run", "stage", "registry"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.MULTILINE), command


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (anywhere in the file, lazy imports too)."""
    from pipeline.code_version import _scan_file, module_file

    graph = {}
    for path in [*PIPELINE_SOURCES, *sorted((ROOT / "flows").rglob("*.py"))]:
        names, _ = _scan_file(path)
        graph[module_name(path)] = {n for n in names if n.split(".")[0] in ("pipeline", "flows") and module_file(n)} - {module_name(path)}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle found by a depth-first walk, as the path that closes it."""
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_among_project_modules():
    graph = import_graph()
    assert len(graph) >= 40
    assert graph["pipeline.train.parallel.replica"] >= {"pipeline.train.parallel.ddp", "pipeline.train.parallel.zero"}
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in [*PIPELINE_SOURCES, *(ROOT / "flows").rglob("*.py")]}
    assert {path: n for path, n in sizes.items() if n > 450} == {}


def test_each_stage_lives_in_the_package_of_its_concept():
    from pipeline.code_version import module_file
    from pipeline.stages import STAGES

    homes = {name: module_file(stage.module).relative_to(ROOT).as_posix() for name, stage in STAGES.items()}
    assert homes == {
        "ingest": "pipeline/data/ingest.py",
        "sample": "pipeline/data/sample.py",
        "preprocess": "pipeline/data/preprocess.py",
        "tokenize": "pipeline/data/tokenize.py",
        "reference": "pipeline/train/reference.py",
        "train": "pipeline/train/stage.py",
        "evaluate": "pipeline/evaluate/stage.py",
        "publish": "pipeline/registry/publish.py",
    }


def test_every_method_the_config_accepts_has_an_object():
    from typing import get_args

    from pipeline.config import TrainConfig
    from pipeline.train.methods import METHODS

    assert set(get_args(TrainConfig.model_fields["method"].annotation)) == set(METHODS)
    assert all(method.name == name for name, method in METHODS.items())


def test_no_code_outside_a_method_branches_on_its_name():
    """`method == "lora"` and friends belong in the method's own module (train/methods/)."""
    from pipeline.train.methods import METHODS

    pattern = re.compile(r"""(method\s*(==|!=|in)\s*[("'])|(["'](%s)["']\s*(==|!=|in))""" % "|".join(METHODS))
    outside = [p for p in PIPELINE_SOURCES if "methods" not in p.parts and p.name != "pipeline.py"]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in outside for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
