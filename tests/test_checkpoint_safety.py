"""Checkpoints are data: planted pickles run nothing, a corrupt newest checkpoint falls back to the
one before it (and the run still ends bit-identical), and a full disk says so, with the path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tiny import make_blocks, sha256, trainer_args

from pipeline.train import recipe
from pipeline.train.checkpoint import MARKER, complete_checkpoints

RUN = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.warmup_steps=2", "train.micro_batch_size=4",
       "train.lr=1e-2", "train.save_every_steps=2", "train.keep_last_checkpoints=3", "train.tensorboard=false")


class Payload:
    """Unpickling this runs a shell command that leaves a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def train(root: Path, tokenized: Path, steps: int) -> int:
    return recipe.main(trainer_args(tokenized, root, *RUN, f"train.max_steps={steps}"))


def reseal(folder: Path) -> None:
    """Record the current sha256s in the marker, as an attacker with write access would."""
    marker = json.loads((folder / MARKER).read_text())
    marker["files"] = {rel: sha256(folder / rel) for rel in marker["files"]}
    (folder / MARKER).write_text(json.dumps(marker))


@pytest.fixture
def trained(tmp_path):
    tokenized = make_blocks(tmp_path / "tok")
    assert train(tmp_path, tokenized, 4) == 0
    return tmp_path, tokenized


@pytest.mark.parametrize("name", ["replica.pt", "trainer.pt", "rng_rank0.pt"])
def test_a_planted_pickle_in_a_checkpoint_runs_nothing(trained, name):
    root, tokenized = trained
    newest = complete_checkpoints(root / "ckpt")[-1]
    marker = root / "code-ran"
    torch.save({"model": Payload(marker)}, newest / name)
    reseal(newest)  # the sha256 check passes: only the loader stands between the file and the code

    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        train(root, tokenized, 6)
    assert not marker.exists()


def test_a_corrupt_newest_checkpoint_falls_back_and_ends_bit_identical(tmp_path, trained, capsys):
    root, tokenized = trained
    uninterrupted = tmp_path / "straight"
    assert train(uninterrupted, tokenized, 6) == 0
    steps = complete_checkpoints(root / "ckpt")
    assert [p.name for p in steps] == ["step_00000002", "step_00000004"]
    (steps[-1] / "replica.pt").write_bytes((steps[-1] / "replica.pt").read_bytes()[:1000])  # a torn write

    assert train(root, tokenized, 6) == 0

    out = capsys.readouterr().out
    assert f"checkpoint {steps[-1]} is corrupt" in out and "replica.pt: sha256 does not match" in out
    assert f"resuming from {steps[0]} (step 2" in out
    assert json.loads((root / "out" / "train_stats.json").read_text())["resumed_from_step"] == 2
    assert sha256(root / "out" / "model" / "model.safetensors") == sha256(uninterrupted / "out" / "model" / "model.safetensors")


def test_a_missing_file_counts_as_corrupt(trained, capsys):
    root, tokenized = trained
    steps = complete_checkpoints(root / "ckpt")
    (steps[-1] / "trainer.pt").unlink()
    assert train(root, tokenized, 6) == 0
    assert "trainer.pt: missing" in capsys.readouterr().out


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root can mount one, as CI runs): a real ENOSPC, not a mock."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_reported_as_one_with_the_path(tmp_path, small_disk):
    tokenized = make_blocks(tmp_path / "tok")
    # The checkpoints go to the small disk; the model output stays on the big one.
    args = trainer_args(tokenized, tmp_path, *RUN, "train.max_steps=4", "model.n_embd=256")
    args[args.index("--checkpoints") + 1] = str(small_disk / "ckpt")

    with pytest.raises(OSError, match=r"no space left on the device while writing checkpoint file .*small/ckpt/\.tmp_step_00000002"):
        recipe.main(args)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_planted_pickle_in_a_deepspeed_checkpoint_runs_nothing(tmp_path, stage, monkeypatch):
    """DeepSpeed's own loader unpickles with weights_only=False; ours routes it through weights_only=True."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.config import build_config
    from pipeline.train.methods import parameter_groups
    from pipeline.train.parallel.dist import DistInfo
    from pipeline.train.parallel.zero import deepspeed_replica

    cfg = build_config({"train": {"strategy": "deepspeed", "deepspeed_config": stage, "precision": "fp32"}}).train
    info = DistInfo(0, 0, 1, None, torch.device("cpu"))

    def replica():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        return deepspeed_replica(model, parameter_groups(model, cfg), cfg, info)

    replica().save(tmp_path / "ckpt")
    replica().load(tmp_path / "ckpt")  # DeepSpeed's own state classes load under weights_only
    marker = tmp_path / "code-ran"
    for shard in sorted((tmp_path / "ckpt").rglob("*.pt")):
        planted = tmp_path / "planted" / shard.name
        planted.parent.mkdir(exist_ok=True)
        shutil.copytree(tmp_path / "ckpt", planted, dirs_exist_ok=True)
        evil = planted / shard.relative_to(tmp_path / "ckpt")
        torch.save({"optimizer_state_dict": Payload(marker), "module": Payload(marker)}, evil)
        with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
            replica().load(planted)
        assert not marker.exists(), shard.name
