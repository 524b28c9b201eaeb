"""The train stage as a Slurm job on a real two-node cluster on loopback (tests/slurm_cluster.py):
2 nodes x 1 process through Slurm trains the weights of a local 2-process run; `scontrol requeue`
mid-training resumes to the same weights; a failing job fails the stage with its log's tail; the
script `tunepipe slurm script` prints is accepted by sbatch, and its model flows back into the DAG."""

from __future__ import annotations

import json
import subprocess

import pytest
from tiny import REPO, cli_args, cli_command, published_weights, run_cli, sha256, stage_status, summary_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ON_SLURM = {"train.launcher": "slurm", "train.nnodes": 2, "train.nproc_per_node": 1, "slurm.poll_s": 0.5}


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The cluster's commands for every CLI this test starts (sbatch reads SLURM_CONF)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    # torchrun sets one intra-op thread per worker when it starts several on a node, not when it
    # starts one: a CPU matmul sums in another order with two threads. Both "nodes" share this
    # machine's two cores, so one thread each is also the fair share.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return slurm_cluster


@pytest.fixture(scope="module")
def local_two_ranks(tmp_path_factory) -> str:
    """sha256 of the weights a local 2-process run publishes: what every Slurm run must equal."""
    root = tmp_path_factory.mktemp("local")
    run_cli(cli_args("stage", root / "w", root / "r", "publish", **{"train.nproc_per_node": 2}))
    return sha256(published_weights(root / "r"))


def test_two_nodes_through_slurm_publish_the_weights_of_a_local_two_process_run(tmp_path, slurm, local_two_ranks):
    proc = run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "publish", **ON_SLURM))
    assert sha256(published_weights(tmp_path / "r")) == local_two_ranks
    assert stage_status(summary_of(proc))["train"] == "ran"
    out = proc.stdout
    assert "submitted slurm job" in out and "RUNNING on n[1-2]" in out
    assert "node n1 (node 0) starts torchrun" in out and "node n2 (node 1) starts torchrun" in out  # the job's log, streamed
    assert "world size 2 (backend gloo" in out


@pytest.fixture(scope="module")
def local_two_ranks_80(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("local80")
    run_cli(cli_args("stage", root / "w", root / "r", "publish", **{"train.nproc_per_node": 2, "train.max_steps": 80}))
    return sha256(published_weights(root / "r"))


def interrupted_run(tmp_path, interrupt) -> str:
    """An 80-step run on Slurm, `interrupt(job_id)` once its first checkpoint is complete; its output."""
    workdir = tmp_path / "w"
    proc = subprocess.Popen(cli_command(*cli_args("stage", workdir, tmp_path / "r", "publish", **ON_SLURM, **{"train.max_steps": 80})),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(workdir.glob("scratch/train/*/checkpoints/step_*/COMPLETE")), 300, "a first checkpoint")
        job_file = wait_for(lambda: list(workdir.glob("scratch/train/*/slurm_job.json")), 30, "the job id")[0]
        interrupt(json.loads(job_file.read_text())["job_id"])
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "start 2" in out, out[-4000:]  # the follower saw the requeued job start again
    summary = summary_of(subprocess.CompletedProcess([], 0, out, ""))
    assert stage_status(summary)["train"] == "resumed"
    return out


def test_scontrol_requeue_after_the_first_checkpoint_resumes_to_identical_weights(tmp_path, slurm, local_two_ranks_80):
    out = interrupted_run(tmp_path, lambda job_id: slurm.run("scontrol", "requeue", job_id))
    # Slurm's SIGTERM reached the ranks, which agreed on a step and checkpointed it before KillWait ran out.
    assert "stop requested (SIGTERM)" in out
    assert sha256(published_weights(tmp_path / "r")) == local_two_ranks_80


def test_the_time_limit_warning_checkpoints_and_the_job_requeues_itself(tmp_path, slurm, local_two_ranks_80):
    # `#SBATCH --signal=USR1@<lead>` signals every process of the job's steps (not the batch
    # shell) <lead> seconds before the limit; `scancel --signal=USR1` delivers exactly that, now.
    out = interrupted_run(tmp_path, lambda job_id: slurm.run("scancel", "--signal=USR1", job_id))
    assert "stop requested (SIGUSR1)" in out and "requeueing job" in out
    assert sha256(published_weights(tmp_path / "r")) == local_two_ranks_80


def test_a_failing_job_fails_the_stage_with_the_job_id_and_the_log_tail(tmp_path, slurm):
    args = cli_args("stage", tmp_path / "w", tmp_path / "r", "train", **ON_SLURM, **{"slurm.setup": '["echo the node has no scratch disk", "exit 3"]'})
    proc = subprocess.run(cli_command(*args), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    reason = proc.stderr.strip().splitlines()[-1]
    assert reason.startswith("tunepipe: train stage failed: slurm job ") and "ended FAILED (exit code 3:0)" in reason, proc.stderr
    assert "the node has no scratch disk" in proc.stdout  # the log, streamed as it came


def test_the_printed_script_is_accepted_by_sbatch_and_its_model_flows_back_into_the_dag(tmp_path, slurm):
    args = cli_args("slurm", tmp_path / "w", tmp_path / "r", "script", **{k: v for k, v in ON_SLURM.items() if k != "train.launcher"})
    script = subprocess.run(cli_command(*args), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr[-3000:]
    assert script.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in script.stdout and "#SBATCH --requeue" in script.stdout
    (tmp_path / "train.sbatch").write_text(script.stdout)
    job_id = slurm.run("sbatch", "--parsable", str(tmp_path / "train.sbatch")).stdout.strip()
    assert slurm.wait_job(job_id, timeout=300) == "COMPLETED"
    proc = run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "publish", **ON_SLURM))
    assert "adopting the model a job already committed" in proc.stdout
    assert "submitted slurm job" not in proc.stdout
    assert stage_status(summary_of(proc))["evaluate"] == "ran"
