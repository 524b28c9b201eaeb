"""`train.compile`: the model compiled in place by torch.compile (inductor, a C++ compiler on CPU)
trains to the eager losses, and a run stopped after a checkpoint resumes bit-identically.

The first compile of a tiny GPT-2 takes 30-50 s on 2 cores; inductor's on-disk cache makes the
later runs here take seconds (the same graphs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import crash_at_step, make_blocks, train_losses, trainer_args

from pipeline.train import recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

RUN = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.dropout=0.1", "train.max_steps=8",
       "train.warmup_steps=2", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.save_every_steps=4",
       "train.lr=1e-2", "train.log_every_steps=2")


def train(root, *overrides):
    make_blocks(root / "tok")
    assert recipe.main(trainer_args(root / "tok", root, *RUN, *overrides)) == 0
    model = root / "out" / "model"
    return train_losses(root / "out"), load_file(next(model.glob("*.safetensors")))


def test_a_compiled_run_resumes_bit_identically(tmp_path, monkeypatch):
    losses, weights = train(tmp_path / "whole", "train.compile=true")

    # Stopped by an error after the step-4 checkpoint (as a kill there would), then rerun.
    stopped = tmp_path / "stopped"
    with crash_at_step(monkeypatch, 6), pytest.raises(RuntimeError, match="simulated crash"):
        train(stopped, "train.compile=true")
    assert recipe.main(trainer_args(stopped / "tok", stopped, *RUN, "train.compile=true")) == 0
    stats = (stopped / "out" / "train_stats.json").read_text()
    assert '"resumed_from_step": 4' in stats
    # Dropout on (0.1): the compiled graphs' masks, too, are a function of the step's seed.
    assert train_losses(stopped / "out") == losses  # every step's loss, bit for bit
    resumed = load_file(stopped / "out" / "model" / "model.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_compiled_training_matches_eager_with_lora_and_gradient_checkpointing(tmp_path):
    """One cold compile here (about 25 s on 2 cores), one in the resume test: the suite's budget."""
    import torch._dynamo

    # No dropout anywhere: compiled graphs draw their masks with another generator.
    run = ("model.dropout=0", "train.method=lora", "train.lora_dropout=0", "train.gradient_checkpointing=true", "train.lr=3e-2")
    eager_losses, _ = train(tmp_path / "eager", *run)
    torch._dynamo.utils.counters.clear()
    losses, _ = train(tmp_path / "compiled", *run, "train.compile=true")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    # Compiled kernels fuse and reorder float arithmetic: the same curve, not the same bits.
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)
    assert (tmp_path / "compiled" / "out" / "model" / "adapter_model.safetensors").exists()
