"""The training loop never waits for the device inside a step: the loss, the gradient norm and the
rewards stay device tensors until a log line, a validation or a checkpoint reads them all at once
(pipeline/train/step.py). On a GPU a read inside the step is a host-device synchronisation that
idles the GPU while the host prepares the next batch.

On CPU there is no device to wait for, so these tests catch the reads themselves: every place a
float tensor's value reaches Python (`item`, `float()`, `bool()`, `tolist`, `cpu`, `numpy`) is
recorded with the step it happened in. `tests/test_gpu.py` checks the same loop on CUDA with
torch's sync debug mode set to raise.
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_blocks, train_losses, trainer_args

from pipeline.train import recipe, step
from pipeline.train.checkpoint import complete_checkpoints
from pipeline.train.parallel.dist import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.warmup_steps=2", "train.micro_batch_size=4",
        "train.grad_accum_steps=2", "train.max_steps=12", "train.log_every_steps=5", "train.save_every_steps=100")
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__")


@pytest.fixture
def float_reads(monkeypatch):
    """Where float tensors were read into Python: a list of "inside step N" / "between steps"."""
    reads: list[str] = []
    where = {"now": "between steps"}

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if self.is_floating_point():
                reads.append(where["now"])
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    plain_step = step.train_step

    def watched_step(run, state, checkpoints):
        where["now"] = f"inside step {state.step + 1}"
        try:
            return plain_step(run, state, checkpoints)
        finally:
            where["now"] = "between steps"

    monkeypatch.setattr(recipe, "train_step", watched_step)
    return reads


@pytest.fixture
def transfers(monkeypatch):
    """The steps each `settle` read at once."""
    batches: list[list[int]] = []
    plain_settle = step.settle

    def counted(run, pending, checkpoints):
        if pending:
            batches.append([n for n, _ in pending])
        return plain_settle(run, pending, checkpoints)

    monkeypatch.setattr(recipe, "settle", counted)
    return batches


@pytest.mark.parametrize("task_overrides", [(), ("train.fused_loss=false",)], ids=["fused_loss", "plain_loss"])
def test_a_step_reads_nothing_from_the_device_and_the_log_reads_every_step_at_once(tmp_path, float_reads, transfers, task_overrides):
    make_blocks(tmp_path / "tok")
    assert recipe.main(trainer_args(tmp_path / "tok", tmp_path, *BASE, *task_overrides)) == 0
    assert [r for r in float_reads if r.startswith("inside")] == []
    # One read per log line (steps 5 and 10) and one at the end, each of every step since the last.
    assert transfers == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    losses = train_losses(tmp_path / "out")
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_at_the_next_read(tmp_path, transfers):
    make_blocks(tmp_path / "tok")
    # Step 1's absurd update overflows step 2's forward; the loss is read only at step 5.
    with pytest.raises(recipe.NonFiniteLoss, match=r"^step 2: (loss|gradient norm) is (nan|inf); its update was skipped and the run stopped at step 5"):
        recipe.main(trainer_args(tmp_path / "tok", tmp_path, *BASE, "train.lr=1e30", "train.min_lr_ratio=1", "train.warmup_steps=0"))
    assert transfers == [[1, 2, 3, 4, 5]]
    assert complete_checkpoints(tmp_path / "ckpt") == [], "a checkpoint was written after a non-finite step"
    assert not (tmp_path / "out" / "model").exists()


def test_the_replica_skips_a_non_finite_update_without_reading_it():
    from pipeline.config import TrainConfig
    from pipeline.train.parallel.ddp import DDPReplica

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    replica = DDPReplica(model, [{"params": list(model.parameters())}], TrainConfig(), DistInfo(0, 0, 1, None, torch.device("cpu")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(2, 4)).sum().backward()
    norm = replica.step(1.0, torch.tensor(float("nan")))  # a NaN loss with finite gradients
    assert torch.is_tensor(norm) and torch.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the update of a NaN step was applied"
    assert all(float(s["step"]) == 0 for s in replica.optimizer.state.values())  # Adam's step count did not advance
    model(torch.randn(2, 4)).sum().backward()
    replica.step(1.0, torch.tensor(1.0))
    assert not torch.equal(before["weight"], model.weight)
