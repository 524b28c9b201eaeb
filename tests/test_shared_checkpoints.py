"""Checkpoints on S3 (a real moto_server): written with the completion-marker protocol and resumed
from on a machine that never saw them (another cache, another HOME), so a requeued job or a
rescheduled pod on any node resumes. A corrupt newest checkpoint falls back; a save killed
part-way is never loaded and is cleaned up by the next save."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import s3fs
from tiny import (
    REPO, cli_args, cli_command, make_blocks, published_weights, sha256, stage_status, summary_of, wait_for,
)

from pipeline.train import preemption, recipe

RUN = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.warmup_steps=2", "train.micro_batch_size=4",
       "train.lr=1e-2", "train.save_every_steps=2", "train.keep_last_checkpoints=2", "train.tensorboard=false")


def train(tokenized, out, checkpoints, stop_after: int | None = None) -> int:
    """10 steps; with `stop_after`, a stop request (SIGTERM, a preemption) arrives during that step."""
    args = ["--tokenized", str(tokenized), "--output", str(out), "--checkpoints", str(checkpoints)]
    for override in (*RUN, "train.max_steps=10"):
        args += ["--set", override]
    if stop_after is None:
        return recipe.main(args)

    class StoppedAt(preemption.StopRequests):
        calls = 0

        def agreed(self, info):
            StoppedAt.calls += 1
            return StoppedAt.calls >= stop_after

    original, recipe.StopRequests = recipe.StopRequests, StoppedAt
    try:
        return recipe.main(args)
    finally:
        recipe.StopRequests = original


def weights(out) -> str:
    return sha256(out / "model" / "model.safetensors")


@pytest.fixture
def blocks(tmp_path):
    return make_blocks(tmp_path / "tok")


@pytest.fixture
def uninterrupted(tmp_path, blocks) -> str:
    assert train(blocks, tmp_path / "ref", tmp_path / "ref-ckpt") == 0
    return weights(tmp_path / "ref")


def another_machine(monkeypatch, tmp_path, name: str) -> None:
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / name))


def steps_on(fs, url: str) -> dict[str, bool]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.exists(p + "/COMPLETE") for p in fs.ls(url.removeprefix("s3://")) if "step_" in p}


@pytest.fixture
def stopped_on_node_a(tmp_path, blocks, s3_bucket, monkeypatch) -> str:
    """The URL of the checkpoints a run left on S3 when a stop request ended it during step 6."""
    url = f"s3://{s3_bucket}/ckpt"
    another_machine(monkeypatch, tmp_path, "node-a")
    assert train(blocks, tmp_path / "a", url, stop_after=6) == preemption.STOPPED_EXIT_CODE
    return url


@pytest.mark.integration
def test_a_run_resumes_from_s3_on_a_machine_that_never_saw_its_checkpoints(tmp_path, blocks, uninterrupted, stopped_on_node_a, monkeypatch, capsys):
    url, fs = stopped_on_node_a, s3fs.S3FileSystem()
    assert steps_on(fs, url) == {"step_00000004": True, "step_00000006": True}  # keep_last 2, all complete
    another_machine(monkeypatch, tmp_path, "node-b")
    capsys.readouterr()
    assert train(blocks, tmp_path / "b", url) == 0
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'node-b'}" in out and "(step 6, sample 24)" in out
    assert weights(tmp_path / "b") == uninterrupted


@pytest.mark.integration
def test_a_corrupt_newest_s3_checkpoint_falls_back_and_a_partial_save_is_never_loaded(tmp_path, blocks, uninterrupted, stopped_on_node_a, monkeypatch, capsys):
    url, fs = stopped_on_node_a, s3fs.S3FileSystem()
    bucket_path = url.removeprefix("s3://")
    fs.pipe_file(f"{bucket_path}/step_00000006/trainer.pt", b"not what was saved")
    # A save killed part-way through step 8: its files, no COMPLETE.
    fs.pipe_file(f"{bucket_path}/step_00000008/rng_rank0.pt", b"half a save")
    another_machine(monkeypatch, tmp_path, "node-b")
    capsys.readouterr()
    assert train(blocks, tmp_path / "b", url) == 0
    out = capsys.readouterr().out
    assert "step_00000006 is corrupt" in out and "trainer.pt: sha256 does not match" in out
    assert "resuming from" in out and "step_00000004" in out
    assert weights(tmp_path / "b") == uninterrupted
    assert steps_on(fs, url) == {"step_00000008": True, "step_00000010": True}  # the partial 8 was replaced by a real save


@pytest.mark.integration
@pytest.mark.slow
def test_an_s3_workdir_killed_mid_training_resumes_elsewhere_to_identical_weights(tmp_path, s3_bucket, local_two_rank_weights):
    """Two ranks, each uploading its part; SIGKILL to the whole run once a checkpoint is complete on
    S3; the rerun, as another machine (another HOME and cache: no local copy of anything), resumes
    from S3 and publishes the weights of an uninterrupted local run."""
    two_ranks = {"train.nproc_per_node": 2}
    workdir = f"s3://{s3_bucket}/runs"
    machine = lambda name: dict(os.environ, HOME=str(tmp_path / name), TUNEPIPE_CACHE=str(tmp_path / name / "cache"))  # noqa: E731
    args = cli_args("stage", tmp_path / "unused", tmp_path / "reg", "publish", **two_ranks)
    args[args.index("--workdir") + 1] = workdir
    proc = subprocess.Popen(cli_command(*args), cwd=REPO, env=machine("node-a"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    fs = s3fs.S3FileSystem()
    try:
        wait_for(lambda: fs.invalidate_cache() or fs.glob(f"{s3_bucket}/runs/scratch/train/*/checkpoints/step_*/COMPLETE"), 300, "a checkpoint on S3")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not fs.glob(f"{s3_bucket}/runs/train/*/manifest.json"), "training finished before the kill: nothing was tested"
    step = fs.glob(f"{s3_bucket}/runs/scratch/train/*/checkpoints/step_*/COMPLETE")[0].rsplit("/", 2)[-2]
    assert {p.rsplit("/", 1)[-1] for p in fs.glob(f"{s3_bucket}/runs/scratch/train/*/checkpoints/{step}/.parts/*")} == {"rank0.json", "rank1.json"}

    rerun = subprocess.run(cli_command(*args), cwd=REPO, env=machine("node-b"), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = summary_of(rerun)
    assert stage_status(summary)["train"] == "resumed"
    assert next(s for s in summary["stages"] if s["name"] == "train")["stats"]["resumed_from_step"] > 0
    assert sha256(published_weights(tmp_path / "reg")) == local_two_rank_weights
