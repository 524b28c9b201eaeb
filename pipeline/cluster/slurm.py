"""The train stage as a Slurm batch job: the sbatch script, its submission, and following it.

The script asks for `train.nnodes` nodes with one task each; `srun` starts one torchrun per node,
all meeting at a c10d rendezvous on the first node of the allocation (`scontrol show hostnames`,
then that node's NodeAddr). It asks for `--requeue` and `--signal=USR1@<lead>`: before the time
limit every rank checkpoints (train/preemption.py) and the script requeues the job; after a
preemption or `scontrol requeue` Slurm requeues it itself. Each start resumes from the newest
checkpoint, so the weights end as an uninterrupted run's. The job commits its model under the
stage's scratch (`--commit-output`); the train stage adopts it when the job completes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.cluster.torchrun import torchrun_command
from pipeline.config import SlurmConfig, TrainConfig

STOP_FILE_ENV = "TUNEPIPE_STOP_FILE"  # train/preemption.py writes it; the script requeues on it
FINAL_OK = {"COMPLETED"}
FINAL_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REQUEUE_HOLD", "SPECIAL_EXIT"}


class SlurmError(RuntimeError):
    pass


def _command(args: list[str], timeout: float = 60) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: train.launcher slurm needs the Slurm client commands on PATH") from None
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def partition_has_gpus(partition: str | None) -> bool:
    """Whether the partition's nodes advertise a `gpu` GRES (what `slurm.gpus: auto` asks)."""
    args = ["sinfo", "--noheader", "--format=%G"] + ([f"--partition={partition}"] if partition else [])
    try:
        return any("gpu" in line for line in _command(args).splitlines())
    except SlurmError:
        return False


def render_script(train: TrainConfig, slurm: SlurmConfig, *, worker_args: list[str], job_name: str, log: str,
                  rdzv_id: str, python: str = sys.executable, gpus: bool | None = None) -> str:
    """The sbatch script. `gpus` None: decided by `slurm.gpus` (auto asks sinfo)."""
    if gpus is None:
        gpus = slurm.gpus == "yes" or (slurm.gpus == "auto" and partition_has_gpus(slurm.partition))
    options = [
        f"--job-name={job_name}", f"--nodes={train.nnodes}", "--ntasks-per-node=1",
        f"--output={log}", "--open-mode=append", "--requeue", f"--signal=USR1@{slurm.signal_lead_s}", "--export=ALL",
    ]
    options += [f"--gpus-per-node={train.nproc_per_node}"] if gpus else []
    options += [f"--{key.replace('_', '-')}={value}" for key, value in
                (("partition", slurm.partition), ("account", slurm.account), ("time", slurm.time),
                 ("cpus_per_task", slurm.cpus_per_task)) if value is not None]
    options += [line.removeprefix("#SBATCH").strip() for line in slurm.sbatch_lines]
    stop_file = str(Path(log).parent / "stop-request-$SLURM_JOB_ID")
    torchrun = torchrun_command(train, worker_args, python=python, rdzv_endpoint="$RDZV_ENDPOINT", rdzv_id=rdzv_id)
    # torchrun's agent dies of SIGUSR1 (it handles only TERM, INT, HUP, QUIT): it ignores it, and
    # its workers, which set their own handler, take it (Slurm signals every process of the step).
    node = 'trap "" USR1; echo "[slurm] node $SLURMD_NODENAME (node $SLURM_NODEID) starts torchrun"; exec "$@"'
    lines = [
        "#!/bin/bash",
        "# The tunepipe train stage, one torchrun per node. By hand: sbatch THIS_FILE; the next",
        "# `tunepipe run` of the same config adopts the model the job commits (docs/clusters.md).",
        *(f"#SBATCH {opt}" for opt in options),
        "set -uo pipefail",
        *slurm.setup,
        "export PYTHONUNBUFFERED=1",
        f"export {STOP_FILE_ENV}=\"{stop_file}\"",
        f'rm -f "${STOP_FILE_ENV}"',
        'echo "[slurm] job $SLURM_JOB_ID (start ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        "# The rendezvous: the first node of the allocation, at its address as slurmctld knows it.",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'addr=$(scontrol show node "$first" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)',
        f'export RDZV_ENDPOINT="${{addr:-$first}}:{train.rdzv_port}"',
        "# Intra-op threads: the CPUs the allocation gives each rank (torchrun would leave one process",
        "# per node on every core of the machine, beyond what Slurm allotted); yours if you set it.",
        f"threads=$(( ${{SLURM_CPUS_ON_NODE:-{train.nproc_per_node}}} / {train.nproc_per_node} ))",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"',
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(node)} tunepipe-node \\",
        "    " + " ".join(_quote(a) for a in torchrun),
        "rc=$?",
        f'if [ -e "${STOP_FILE_ENV}" ]; then',
        '    echo "[slurm] checkpointed before the time limit: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    # $RDZV_ENDPOINT is the one value the node's shell expands; everything else is literal.
    return f'"{arg}"' if "$RDZV_ENDPOINT" in arg else shlex.quote(arg)


def submit(script: Path) -> str:
    out = _command(["sbatch", "--parsable", str(script)]).strip()
    return out.split(";", 1)[0]  # "<id>[;<cluster>]"


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@dataclass
class JobState:
    state: str
    restarts: int
    reason: str
    nodes: str
    exit_code: str


def job_state(job_id: str) -> JobState | None:
    """What slurmctld says of the job, or None when it no longer knows it."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {done.stderr.strip()}")
    fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
    return JobState(fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", "0") or 0), fields.get("Reason", ""),
                    fields.get("NodeList", ""), fields.get("ExitCode", ""))


def pass_through(chunk: bytes) -> None:
    """A job's output, onto this process's stdout as it comes (\r included: a progress bar redraws in place)."""
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        out.write(chunk)
        out.flush()
    else:
        sys.stdout.write(chunk.decode("utf-8", "replace"))


class LogTail:
    """Copies what the job appends to its log through to this process's output."""

    def __init__(self, path: Path):
        self.path, self.offset, self.tail = path, 0, []

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        if not chunk:
            return
        self.offset += len(chunk)
        pass_through(chunk)
        self.tail = (self.tail + chunk.decode("utf-8", "replace").splitlines(keepends=True))[-40:]


def follow(job_id: str, log: Path, poll_s: float, say: Callable[[str], None] = print, patience_s: float = 600) -> JobState:
    """Stream the job's log and report its states until it ends; returns the final state.
    A requeued or preempted job is waited for: it starts again and resumes. slurmctld not
    answering (a restart, a failover) is waited out for `patience_s`: the job may be fine."""
    tail, seen, unanswered_since = LogTail(log), None, None
    while True:
        try:
            state = job_state(job_id)
            unanswered_since = None
        except (SlurmError, subprocess.TimeoutExpired) as e:
            unanswered_since = unanswered_since or time.monotonic()
            if time.monotonic() - unanswered_since > patience_s:
                raise SlurmError(f"slurmctld has not answered about job {job_id} for {patience_s:.0f}s: {e}") from None
            say(f"[train] slurm job {job_id}: no answer from slurmctld ({e}); asking again")
            time.sleep(max(poll_s, 10.0))
            continue
        tail.pump()
        if state is None:
            say(f"[train] slurm job {job_id} is no longer known to slurmctld (purged after MinJobAge)")
            return JobState("UNKNOWN", 0, "", "", "")
        if seen is not None and state.restarts > seen[1]:
            say(f"[train] slurm job {job_id}: requeued; it resumes from its newest checkpoint when it starts again")
        shown = (state.state, state.restarts)
        if shown != seen:
            where = f" on {state.nodes}" if state.state == "RUNNING" else (f" ({state.reason})" if state.reason not in ("", "None") else "")
            again = f", start {state.restarts + 1}" if state.restarts and state.state == "RUNNING" else ""
            say(f"[train] slurm job {job_id}: {state.state}{where}{again}")
            seen = shown
        if state.state in FINAL_OK | FINAL_FAILED:
            time.sleep(min(poll_s, 1.0))
            tail.pump()  # the last lines land after the state changes
            return state
        time.sleep(poll_s)


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return "(no log was written)\n"


def environment_ok() -> str | None:
    """Why this machine cannot submit (no sbatch), or None."""
    for tool in ("sbatch", "scontrol"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)):
            return f"{tool} is not on PATH: train.launcher slurm submits from a machine with the Slurm client"
    return None
