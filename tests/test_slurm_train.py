"""The train stage as a Slurm job on a real two-node cluster on loopback (tests/slurm_cluster.py):
2 nodes x 1 process through Slurm trains the weights of a local 2-process run; `scontrol requeue`
mid-training resumes to the same weights; a failing job fails the stage with its log's tail; the
script `tunepipe slurm script` prints is accepted by sbatch, and its model flows back into the DAG."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from tiny import REPO, cli_args, cli_command, published_weights, run_cli, sha256, stage_status, summary_of, wait_for
from test_train_distributed import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# A free rendezvous port, not torchrun's 29500: another test process (xdist's other worker) may
# run a rendezvous on this machine at the same time.
ON_SLURM = {"train.launcher": "slurm", "train.nnodes": 2, "train.nproc_per_node": 1, "slurm.poll_s": 0.5, "train.rdzv_port": free_port()}


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The cluster's commands for every CLI this test starts (sbatch reads SLURM_CONF)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    # No OMP_NUM_THREADS here: the script gives each rank the CPUs its node's allocation holds
    # (1 on this cluster), as torchrun gives each of a local 2-process run's workers one thread.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return slurm_cluster


def test_two_nodes_through_slurm_publish_the_weights_of_a_local_two_process_run(tmp_path, slurm, local_two_rank_weights):
    proc = run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "publish", **ON_SLURM))
    assert sha256(published_weights(tmp_path / "r")) == local_two_rank_weights
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


def test_requeued_then_warned_of_its_time_limit_the_job_resumes_twice_to_identical_weights(tmp_path, slurm, local_two_ranks_80):
    """`scontrol requeue` once the first checkpoint is complete (Slurm's SIGTERM, then a requeue by
    Slurm); then, once the restarted job has checkpointed, SIGUSR1 to every process of its step,
    which is what `#SBATCH --signal=USR1@<lead>` delivers before the time limit: `scancel
    --signal=USR1` delivers exactly that, now (and not to the batch shell); the job requeues itself."""
    workdir = tmp_path / "w"
    checkpoints = lambda: sorted(workdir.glob("scratch/train/*/checkpoints/step_*/COMPLETE"))  # noqa: E731
    proc = subprocess.Popen(cli_command(*cli_args("stage", workdir, tmp_path / "r", "publish", **ON_SLURM, **{"train.max_steps": 80})),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(checkpoints, 300, "a first checkpoint")
        job_file = wait_for(lambda: list(workdir.glob("scratch/train/*/slurm_job.json")), 30, "the job id")[0]
        job_id = json.loads(job_file.read_text())["job_id"]
        slurm.run("scontrol", "requeue", job_id)
        show = lambda: slurm.run("scontrol", "show", "job", "-o", job_id).stdout  # noqa: E731
        wait_for(lambda: "JobState=RUNNING" in (line := show()) and "Restarts=1" in line, 300, "the requeued job to run again")
        before = checkpoints()[-1]  # the checkpoint the SIGTERM stop wrote
        wait_for(lambda: checkpoints()[-1] > before, 300, "a checkpoint of the restarted job's own")
        slurm.run("scancel", "--signal=USR1", job_id)
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    # Slurm's SIGTERM reached the ranks, which agreed on a step and checkpointed it before KillWait ran out.
    assert "stop requested (SIGTERM)" in out, out[-4000:]
    assert "stop requested (SIGUSR1)" in out and "requeueing job" in out, out[-4000:]
    assert "start 3" in out, out[-4000:]  # the follower saw the job start a second and a third time
    summary = summary_of(subprocess.CompletedProcess([], 0, out, ""))
    assert stage_status(summary)["train"] == "resumed"
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


def start_following(tmp_path, **extra) -> tuple[subprocess.Popen, str]:
    """The CLI started in a session of its own, once its job is RUNNING: (process, job id). Its
    Ctrl-C is a terminal's (SIGINT's default action), even when the suite itself was started in
    the background, whose commands inherit SIGINT ignored (bash's `&`, nohup)."""
    workdir = tmp_path / "w"
    proc = subprocess.Popen(cli_command(*cli_args("stage", workdir, tmp_path / "r", "publish", **ON_SLURM, **extra)),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    job_file = wait_for(lambda: list(workdir.glob("scratch/train/*/slurm_job.json")), 300, "the job id")[0]
    return proc, json.loads(job_file.read_text())["job_id"]


def test_ctrl_c_on_the_run_cancels_its_job(tmp_path, slurm):
    proc, job_id = start_following(tmp_path, **{"train.max_steps": 400})
    try:
        wait_for(lambda: slurm.job_state(job_id) == "RUNNING", 120, "the job to run")
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert f"cancelled slurm job {job_id}" in out, out[-3000:]
    assert slurm.wait_job(job_id, timeout=120) == "CANCELLED"


# The job sleeps before it trains (slurm.setup is never fingerprinted), so it is still running when
# the rerun reaches train: without it, on a busy machine the job could finish first and the rerun
# would adopt its model instead of following it.
SLOW_START = {"slurm.setup": '["sleep 15"]'}


def test_a_killed_run_leaves_its_job_training_and_the_rerun_follows_it_instead_of_submitting(tmp_path, slurm, local_two_rank_weights):
    proc, job_id = start_following(tmp_path, **SLOW_START)
    try:
        wait_for(lambda: slurm.job_state(job_id) == "RUNNING", 120, "the job to run")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its follower, not the job: slurmd runs that
        proc.wait()
    rerun = run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "publish", **ON_SLURM, **SLOW_START))
    assert f"following slurm job {job_id}, submitted by an earlier run of this stage" in rerun.stdout
    assert "submitted slurm job" not in rerun.stdout
    assert sha256(published_weights(tmp_path / "r")) == local_two_rank_weights
