"""The train stage: launch `pipeline.train.recipe` under torchrun (alone for one process) and stream its log.

Training runs in its own processes so the orchestrator (Prefect or the CLI) never imports
torch.distributed and a crashed rank cannot take the orchestrator down with it. Where it runs:
torchrun on this machine (`train.launcher: local`, one node or this node's share of several),
or a Slurm job the stage submits and follows (cluster/slurm.py). Checkpoints go to the stage's
scratch (or train.checkpoint_dir), which outlives a crash, a requeue or a move to another node,
so rerunning resumes. A job run elsewhere commits its model under the scratch; the stage adopts
it (train/job_output.py), also when a later run finds a job's model that an earlier one missed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline import artifacts
from pipeline.cluster import slurm
from pipeline.cluster.torchrun import local_command, rendezvous_id, torchrun_command
from pipeline.config import ModelConfig, SlurmConfig, TrainConfig
from pipeline.train import job_output
from pipeline.train.fingerprint import content_fingerprint  # noqa: F401 (the stage's; light for cache checks)
from pipeline.train.preemption import STOPPED_EXIT_CODE


class TrainingFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class JobPlan:
    """What a training job of one train fingerprint reads and writes, wherever it runs."""

    fingerprint: str
    config_file: str
    tokenized: str
    checkpoints: str
    job_output: str
    """Where a job that the stage does not run in its own process tree commits its model (job_output.py)."""
    reference: str | None = None
    """Task preference: the reference stage's output."""

    def worker_args(self, output: str | None = None) -> list[str]:
        """The recipe's arguments: into `output` (the stage's own folder), else committed at job_output."""
        where = ["--output", output] if output else ["--output", self.job_output, "--commit-output"]
        reference = ["--reference", self.reference] if self.reference else []
        return ["--tokenized", self.tokenized, *reference, "--config", self.config_file, *where, "--checkpoints", self.checkpoints]


def job_config(model: ModelConfig, train: TrainConfig) -> str:
    """The sections a training job reads (`--config`), as JSON."""
    return json.dumps({"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json")}, indent=2)


def plan_job(model: ModelConfig, train: TrainConfig, *, tokenized: str, scratch: Path, shared: str,
             config_at: str | None = None, reference: str | None = None) -> JobPlan:
    """Write the job's config (model and train sections) into the scratch folder and say where
    everything goes. Checkpoints: `train.checkpoint_dir/train/<fp>`, else beside the job output
    in the stage's shared scratch (on S3 for an s3:// workdir), so a job on any node resumes."""
    fp = scratch.name
    # Absolute: a job starts wherever sbatch (or a user's shell) was.
    scratch, tokenized, shared = scratch.resolve(), _absolute(tokenized), _absolute(shared)
    scratch.mkdir(parents=True, exist_ok=True)
    config_file = scratch / "train_config.json"
    config_file.write_text(job_config(model, train))
    checkpoints = artifacts.join(train.checkpoint_dir, "train", fp) if train.checkpoint_dir else artifacts.join(shared, "checkpoints")
    reference = _absolute(reference) if reference else None
    return JobPlan(fp, config_at or str(config_file), tokenized, checkpoints, artifacts.join(shared, "output"), reference)


# Runs `python -m ...` once it has asked for SIGTERM when this orchestrator dies (even by SIGKILL):
# torchrun then stops its workers, which die with torchrun themselves (parallel/dist.py), so an
# orphaned job never keeps writing checkpoints beside the rerun. Armed in the child, not through
# Popen's preexec_fn, which is unsafe in a process with threads (Prefect runs some); the parent's
# pid is checked after arming, in case it died first.
_BOUND_TO_PARENT = (
    "import ctypes, os, runpy, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "module, sys.argv = sys.argv[3], [sys.argv[3], *sys.argv[4:]]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def bound_to_this_process(command: list[str]) -> list[str]:
    """`command` (python -m MODULE ...) made to end with this process, on Linux."""
    if not sys.platform.startswith("linux") or command[1:2] != ["-m"]:
        return command
    return [command[0], "-c", _BOUND_TO_PARENT, str(os.getpid()), *command[1:]]


def preflight(model: ModelConfig, train: TrainConfig) -> list[str]:
    """Errors a run would otherwise hit only after the data stages, raised before any work; and
    warnings about settings that run but will disappoint (adapters on a random base)."""
    cuda = _cuda_available()
    if train.precision == "fp16" and not cuda:
        raise ValueError("train.precision fp16 needs a CUDA device (no fp16 kernels for training on CPU); use bf16 or fp32")
    from pipeline.train.methods import method_for

    warnings = method_for(train).check(train, model, "cuda" if cuda else "cpu")  # qlora: CUDA and bitsandbytes
    if train.strategy == "deepspeed":
        from pipeline.train.parallel.zero_config import resolve_config

        resolve_config(train.deepspeed_config, train, world_size=train.world_size, device_type="cuda" if cuda else "cpu")
    return warnings


def _cuda_available() -> bool:
    import torch  # the orchestrator imports torch but never torch.distributed

    return torch.cuda.is_available()


def _relay(proc: subprocess.Popen) -> list[str]:
    """Copy the job's output through as it comes, \r included (a progress bar redraws in place);
    keep the last 40 lines for the error message."""
    tail, pending = [], b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
        slurm.pass_through(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        tail = (tail + [line.decode("utf-8", "replace") + "\n" for line in lines])[-40:]
    return tail + ([pending.decode("utf-8", "replace")] if pending else [])


def run(model: ModelConfig, train: TrainConfig, slurm: SlurmConfig, *, inputs: dict[str, Path], out: Path,
        scratch: Path, shared: str) -> dict:
    preflight(model, train)
    reference = str(inputs["reference"]) if "reference" in inputs else None
    plan = plan_job(model, train, tokenized=str(inputs["tokenize"]), reference=reference, scratch=scratch, shared=shared)
    if job_output.committed(plan.job_output) is not None:
        print(f"[train] adopting the model a job already committed at {plan.job_output}", flush=True)
    elif train.launcher == "slurm":
        run_on_slurm(train, slurm, plan, scratch)
    elif train.launcher == "kubernetes":
        raise TrainingFailed(
            f"no model committed at {plan.job_output} yet: with train.launcher kubernetes the Job trains; start it with "
            "`tunepipe k8s manifest CONFIG --workdir ... | kubectl apply -f -` and rerun this when it completes")
    elif train.nnodes > 1:  # this node's share of a run started by hand on every node
        launch(torchrun_command(train, plan.worker_args(), rdzv_endpoint=train.rdzv_endpoint, rdzv_id=rendezvous_id(train, plan.fingerprint)))
    else:
        launch(local_command(train, plan.worker_args(output=str(out))))
        return json.loads((out / "train_stats.json").read_text())
    return job_output.adopt(plan.job_output, out)


def _absolute(where: str) -> str:
    return where if artifacts.is_remote(where) else str(Path(where).resolve())


def launch(cmd: list[str]) -> None:
    """torchrun (or one process) on this machine, its output relayed, bound to this process's life."""
    print("[train] " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if sys.stdout.isatty():
        env["TUNEPIPE_PROGRESS"] = "1"  # the job's stderr is a pipe; tell it a person is watching
    with subprocess.Popen(bound_to_this_process(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            tail = _relay(proc)
            code = proc.wait()
        except BaseException:  # a stage timeout, a cancelled flow run, Ctrl-C
            _stop(proc)
            raise
    if code == STOPPED_EXIT_CODE:
        raise TrainingFailed("training was stopped by a signal after writing a checkpoint; rerun to resume")
    if code != 0:
        raise TrainingFailed(f"training exited with code {code}; last lines:\n" + "".join(tail))


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM torchrun, which passes it to the ranks (or the lone process): they finish the step,
    checkpoint together and exit (preemption.py), so the next run resumes. Keep relaying their output meanwhile (a
    full pipe would block them); SIGKILL after `grace_s`."""
    proc.terminate()
    killer = threading.Timer(grace_s, proc.kill)
    killer.start()
    try:
        _relay(proc)
        proc.wait()
    finally:
        killer.cancel()
    print(f"[train] stopped the training job (exit code {proc.returncode}); a rerun resumes from its last checkpoint", flush=True)


def run_on_slurm(train: TrainConfig, slurm_cfg: SlurmConfig, plan: JobPlan, scratch: Path) -> None:
    """Submit the job (or follow the one an earlier, interrupted stage submitted) until it ends."""
    problem = slurm.environment_ok()
    if problem:
        raise TrainingFailed(problem)
    job_file = scratch / "slurm_job.json"
    job_id = _still_queued(job_file)
    if job_id:
        print(f"[train] following slurm job {job_id}, submitted by an earlier run of this stage", flush=True)
    else:
        script = scratch / "train.sbatch"
        script.write_text(slurm_script(train, slurm_cfg, plan, scratch))
        job_id = slurm.submit(script)
        job_file.write_text(json.dumps({"job_id": job_id, "script": str(script)}))
        print(f"[train] submitted slurm job {job_id} ({train.nnodes} node(s) x {train.nproc_per_node}): {script}", flush=True)
    log = scratch / f"slurm-{job_id}.log"
    try:
        final = slurm.follow(job_id, log, slurm_cfg.poll_s)
    except BaseException:  # Ctrl-C, a Prefect cancellation: the job must not train on unwatched
        slurm.cancel(job_id)
        print(f"[train] cancelled slurm job {job_id}", flush=True)
        raise
    if final.state != "COMPLETED" and job_output.committed(plan.job_output) is None:
        raise TrainingFailed(f"slurm job {job_id} ended {final.state} (exit code {final.exit_code or '?'}); "
                             f"last lines of {log}:\n{slurm.log_tail(log)}")


def slurm_script(train: TrainConfig, slurm_cfg: SlurmConfig, plan: JobPlan, scratch: Path) -> str:
    return slurm.render_script(train, slurm_cfg, worker_args=plan.worker_args(), job_name=f"tunepipe-train-{plan.fingerprint[:12]}",
                               log=str(scratch.resolve() / "slurm-%j.log"), rdzv_id=rendezvous_id(train, plan.fingerprint))


def _still_queued(job_file: Path) -> str | None:
    try:
        job_id = json.loads(job_file.read_text())["job_id"]
        state = slurm.job_state(job_id)
    except (OSError, ValueError, KeyError, slurm.SlurmError):
        return None
    return job_id if state is not None and state.state not in slurm.FINAL_OK | slurm.FINAL_FAILED else None
