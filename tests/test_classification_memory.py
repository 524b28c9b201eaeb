"""examples/recipes/classification_memory.py at a tiny size: a 1-layer base published, both
classification recipes (frozen, full) trained 3 steps on it, and the memory arithmetic it prints
held to the parameters the runs counted and to what AdamW really allocates."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from tiny import REPO

from pipeline.config import TrainConfig, load_config
from pipeline.stages import run_stages
from pipeline.train.parallel.optim import build_optimizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPES = REPO / "examples" / "recipes"
N_EMBD, LABELS = 32, 6  # intents.csv: order_status, return, troubleshoot, warranty, shipping, cancel
BASE = ["sample.count=200", "model.n_layer=1", "model.n_head=2", f"model.n_embd={N_EMBD}", "tokenize.vocab_size=400",
        "tokenize.block_size=256", "train.max_steps=3", "train.eval_every_steps=null", "train.warmup_steps=0",
        "evaluate.num_generations=0"]
# 120 rows: the stratified 10% test and validation splits still hold 2 rows of each of the 6 labels.
RECIPE = ["sample.count=120", "train.max_steps=3", "evaluate.min_accuracy=null", "evaluate.num_generations=0"]
ROWS = ("trainable parameters", "total parameters", "gradient bytes", "AdamW state bytes",
        "weights + gradients + AdamW state", "measured peak memory", "held-out accuracy", "held-out macro F1", "train seconds")


def _quiet(line: str) -> None:
    print(line, file=sys.stderr)


def test_adamw_keeps_8_bytes_per_trainable_parameter_and_nothing_for_frozen_ones():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    model[0].requires_grad_(False)  # frozen, as the feature extractor's blocks are
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": trainable}], TrainConfig())  # the pipeline's own: torch.optim.AdamW, fused
    assert isinstance(optimizer, torch.optim.AdamW)
    model(torch.randn(4, 7)).square().sum().backward()
    optimizer.step()

    state = optimizer.state
    assert set(map(id, state)) == set(map(id, trainable))  # no state at all for the frozen layer
    moments = sum(s[k].numel() * s[k].element_size() for s in state.values() for k in ("exp_avg", "exp_avg_sq"))
    n_trainable = sum(p.numel() for p in trainable)
    assert n_trainable == 5 + 5 + 5 * 3 + 3
    assert moments == 8 * n_trainable
    # Besides the two moments, only a scalar step counter per parameter tensor.
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} and s["step"].numel() == 1 for s in state.values())
    assert model[0].weight.grad is None and all(p.grad.dtype == torch.float32 for p in trainable)  # 4 bytes each, trainable only


def test_frozen_and_full_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the recipes' data paths are relative to the repository
    monkeypatch.syspath_prepend(str(RECIPES))
    import classification_memory

    registry, workdir = str(tmp_path / "registry"), str(tmp_path / "runs")
    base = load_config(RECIPES / "base.yaml", [*BASE, f"registry.url={registry}"])
    assert run_stages(base, workdir, log=_quiet)[-1].name == "publish"

    measured = classification_memory.measure(RECIPE, registry, workdir, log=_quiet)
    frozen, full = measured["frozen"], measured["full"]
    assert (frozen["method"], full["method"]) == ("freeze", "full")

    # The head alone: GPT-2's score layer is n_embd x labels, without a bias.
    with safe_open(f"{frozen['train_output']}/model/model.safetensors", "pt") as weights:
        score = [k for k in weights.keys() if k.startswith("score.")]
        assert score == ["score.weight"] and weights.get_slice("score.weight").get_shape() == [LABELS, N_EMBD]
    assert frozen["trainable_params"] == N_EMBD * LABELS
    assert full["trainable_params"] == full["total_params"] == frozen["total_params"]
    for m in (frozen, full):
        assert m["gradient_bytes"] == 4 * m["trainable_params"]
        assert m["optimizer_bytes"] == 8 * m["trainable_params"]
        assert m["static_bytes"] == 4 * m["total_params"] + 12 * m["trainable_params"]
        assert len(m["peak_memory_bytes"]) == 1 and m["peak_memory_bytes"][0] > m["static_bytes"]
        assert isinstance(m["accuracy"], float) and 0.0 <= m["accuracy"] <= 1.0
        assert isinstance(m["macro_f1"], float) and 0.0 <= m["macro_f1"] <= 1.0
        assert m["split"] == "test" and m["train_seconds"] > 0

    # The script itself, on the same workdir: every stage is cached now, the table is printed.
    capsys.readouterr()
    assert classification_memory.main(["--registry", registry, "--workdir", workdir, *(a for o in RECIPE for a in ("--set", o))]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[train] cached") == printed.count("[evaluate] cached") == 2 and " ran -> " not in printed
    lines = printed.splitlines()
    lines = lines[lines.index(next(x for x in lines if set(x) == {"-"})) - 1:]  # the stage log is above the table
    header = [c.strip() for c in lines[0].split("|")]
    assert header == ["", "frozen", "full"], printed
    cells = {}
    for row in ROWS:
        [line] = [x for x in lines if x.startswith(row)]
        cells[row] = [c.strip() for c in line.split("|")[1:]]
        assert len(cells[row]) == 2 and all(cells[row]), line
    assert cells["trainable parameters"] == [f"{frozen['trainable_params']:,}", f"{full['trainable_params']:,}"]
    assert cells["AdamW state bytes"] == [f"{8 * frozen['trainable_params']:,}", f"{8 * full['trainable_params']:,}"]
    assert cells["held-out accuracy"] == [f"{frozen['accuracy']:.4f} (test)", f"{full['accuracy']:.4f} (test)"]
    ratio = full["optimizer_bytes"] / frozen["optimizer_bytes"]
    assert f"AdamW state, full / frozen: {ratio:,.0f}x" in printed
    print(printed, file=sys.stderr)
