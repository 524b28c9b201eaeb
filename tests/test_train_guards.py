"""Guards and observability of the trainer, in process on synthetic blocks: a non-finite loss
stops the run within a step and leaves the last good checkpoint alone; early stopping; the
TensorBoard events and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import make_blocks, train_losses, trainer_args

from pipeline.train import recipe
from pipeline.train.checkpoint import complete_checkpoints


def add_validation(folder, vocab=97, blocks=16, length=16):
    rng = np.random.default_rng(99)
    (folder / "validation").mkdir()
    ids = ((rng.integers(0, vocab, size=(blocks, 1)) + np.arange(length)) % vocab).astype(np.int32)
    np.save(folder / "validation" / "input_ids.npy", ids)
    np.save(folder / "validation" / "labels.npy", ids)


BASE = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.warmup_steps=0", "train.micro_batch_size=4")


def run(tmp_path, *overrides):
    return recipe.main(trainer_args(tmp_path / "tok", tmp_path, *BASE, *overrides))


def test_non_finite_loss_stops_within_one_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    make_blocks(tmp_path / "tok")
    # An absurd learning rate: step 1 is finite, its update throws the weights to ~1e30, and
    # step 2's forward overflows.
    with pytest.raises(recipe.NonFiniteLoss, match=r"step 2: (loss|gradient norm) is (nan|inf)") as error:
        run(tmp_path, "train.lr=1e30", "train.max_steps=20", "train.save_every_steps=1", "train.min_lr_ratio=1")
    assert "step_00000001" in str(error.value)
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step_00000001"]
    assert not list((tmp_path / "ckpt").glob("*00000002*")), "a checkpoint was written after the non-finite step"
    assert not (tmp_path / "out" / "model").exists()


def test_early_stopping_on_a_metric_that_stops_improving(tmp_path):
    make_blocks(tmp_path / "tok")
    add_validation(tmp_path / "tok")
    # lr so small the weights do not move in fp32: the validation loss never improves after its first value.
    settings = ("train.lr=1e-30", "train.max_steps=50", "train.eval_every_steps=2", "train.early_stopping_patience=2",
                "train.save_every_steps=100", "model.dropout=0")
    assert run(tmp_path, *settings) == 0
    stats = json.loads((tmp_path / "out" / "train_stats.json").read_text())
    # validations at 2 (best), 4 (no better), 6 (no better: patience 2 reached) -> stop at 6
    assert stats["steps"] == 6
    assert stats["early_stopping"]["stopped_at"] == 6 and stats["early_stopping"]["best_step"] == 2
    assert [v["step"] for v in stats["validations"]] == [2, 4, 6]
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step_00000006"]
    # A rerun of the same command finds the stopped run and does not train on.
    assert run(tmp_path, *settings) == 0
    assert json.loads((tmp_path / "out" / "train_stats.json").read_text())["steps"] == 6


def test_tensorboard_events_and_summary(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_blocks(tmp_path / "tok")
    add_validation(tmp_path / "tok")
    assert run(tmp_path, "train.max_steps=4", "train.eval_every_steps=2", "train.save_every_steps=100") == 0
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "peak memory per rank" in printed and "tokens/s" in printed
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "validation/eval_loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_losses(tmp_path / "out"), rel=1e-6)


def test_gradient_checkpointing_and_bf16_on_cpu(tmp_path):
    """Checkpointing recomputes the same activations: the loss curve is unchanged. bf16 autocast
    runs on CPU too, close to fp32 but not equal (so the precision setting really took effect)."""
    common = ["train.max_steps=6", "train.save_every_steps=100", "model.dropout=0", "train.lr=1e-2", "train.tensorboard=false"]
    for name, extra in {"plain": [], "ckpt": ["train.gradient_checkpointing=true"], "bf16": ["train.precision=bf16"]}.items():
        make_blocks(tmp_path / name / "tok")
        assert run(tmp_path / name, *common, *extra) == 0
    plain, ckpt, bf16 = (train_losses(tmp_path / n / "out") for n in ("plain", "ckpt", "bf16"))
    np.testing.assert_allclose(ckpt, plain, rtol=1e-6)
    assert bf16 != plain
    np.testing.assert_allclose(bf16, plain, rtol=0.05)
