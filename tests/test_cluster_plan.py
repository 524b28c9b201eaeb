"""What a cluster job is told, without a cluster: where checkpoints and the model go, the torchrun
line on one node and on many, the sbatch options a config asks for, and the warning for a
`slurm:` setting a local run ignores."""

from __future__ import annotations

from pathlib import Path

from pipeline.cluster.slurm import render_script
from pipeline.cluster.torchrun import rendezvous_id, torchrun_args
from pipeline.config import SlurmConfig, TrainConfig, load_config
from pipeline.train.stage import plan_job

FP = "ab" * 32


def plan(tmp_path: Path, **train):
    cfg = load_config(None, [f"train.{k}={v}" for k, v in train.items()])
    return plan_job(cfg.model, cfg.train, tokenized="runs/tokenize/x", scratch=tmp_path / "scratch" / FP, shared=str(tmp_path / "shared" / FP))


def test_checkpoints_go_to_the_shared_scratch_or_under_checkpoint_dir_by_fingerprint(tmp_path):
    default = plan(tmp_path)
    assert default.checkpoints == str(tmp_path / "shared" / FP / "checkpoints")
    assert default.job_output == str(tmp_path / "shared" / FP / "output")
    assert default.tokenized == str(Path("runs/tokenize/x").resolve())  # absolute: a job starts elsewhere
    assert plan(tmp_path, checkpoint_dir="s3://bucket/ckpt").checkpoints == f"s3://bucket/ckpt/train/{FP}"
    assert plan(tmp_path, checkpoint_dir="/shared/ckpt").checkpoints == f"/shared/ckpt/train/{FP}"
    args = default.worker_args()
    assert args[args.index("--output") + 1] == default.job_output and "--commit-output" in args
    assert "--commit-output" not in default.worker_args(output="/tmp/out")


def test_one_node_is_standalone_several_meet_at_one_rendezvous():
    assert torchrun_args(TrainConfig(nproc_per_node=4)) == ["--standalone", "--nproc-per-node=4"]
    many = torchrun_args(TrainConfig(nnodes=3, nproc_per_node=8), rdzv_endpoint="node0:29500", rdzv_id="run-1")
    assert many == ["--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=run-1"]
    assert rendezvous_id(TrainConfig(), FP) == f"tunepipe-{FP[:16]}"
    assert rendezvous_id(TrainConfig(rdzv_id="mine"), FP) == "mine"


def script(train: TrainConfig, slurm: SlurmConfig, gpus: bool) -> str:
    return render_script(train, slurm, worker_args=["--tokenized", "t"], job_name="tunepipe-train-x", log="/s/slurm-%j.log",
                         rdzv_id="r", python="/venv/bin/python", gpus=gpus)


def test_the_sbatch_options_come_from_the_config():
    train = TrainConfig(nnodes=4, nproc_per_node=8, rdzv_port=29777)
    slurm = SlurmConfig(partition="gpu", account="ml", time="04:00:00", cpus_per_task=32, signal_lead_s=300,
                        sbatch_lines=["#SBATCH --qos=high", "--exclusive"], setup=["module load cuda/12.4"])
    text = script(train, slurm, gpus=True)
    options = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    for wanted in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--account=ml", "--time=04:00:00",
                   "--cpus-per-task=32", "--requeue", "--signal=USR1@300", "--qos=high", "--exclusive", "--output=/s/slurm-%j.log",
                   "--open-mode=append"):
        assert wanted in options, wanted
    body = text.split("set -uo pipefail", 1)[1]
    assert body.index("module load cuda/12.4") < body.index("srun ")
    assert '"--rdzv-endpoint=$RDZV_ENDPOINT"' in text and ":29777" in text and "--nnodes=4" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "--gpus-per-node" not in script(train, SlurmConfig(), gpus=False)


def test_a_slurm_setting_on_a_local_run_is_named_as_ignored():
    lines = load_config(None, ["slurm.partition=gpu"]).ignored_settings()
    assert lines == ["slurm.partition is set but ignored: train.launcher is local; it is not part of the cache key"]
    assert load_config(None, ["slurm.partition=gpu", "train.launcher=slurm"]).ignored_settings() == []


def test_following_a_job_waits_out_a_silent_slurmctld_and_reports_a_requeue(tmp_path, monkeypatch):
    from pipeline.cluster import slurm

    answers = iter([
        slurm.JobState("RUNNING", 0, "None", "n[1-2]", "0:0"),
        slurm.SlurmError("Unable to contact slurm controller (connect failure)"),  # a slurmctld restart
        slurm.SlurmError("Unable to contact slurm controller (connect failure)"),
        slurm.JobState("PENDING", 1, "BeginTime", "", "0:0"),
        slurm.JobState("RUNNING", 1, "None", "n[1-2]", "0:0"),
        slurm.JobState("COMPLETED", 1, "None", "n[1-2]", "0:0"),
    ])

    def job_state(job_id):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(slurm, "job_state", job_state)
    monkeypatch.setattr(slurm.time, "sleep", lambda s: None)
    said = []
    final = slurm.follow("7", tmp_path / "slurm-7.log", poll_s=0.01, say=said.append)
    assert final.state == "COMPLETED"
    assert sum("no answer from slurmctld" in line for line in said) == 2
    assert "[train] slurm job 7: requeued; it resumes from its newest checkpoint when it starts again" in said
    assert said[-1] == "[train] slurm job 7: COMPLETED"
    assert "[train] slurm job 7: RUNNING on n[1-2], start 2" in said
