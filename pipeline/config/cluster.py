"""Where a cluster job runs: the `slurm:` and `kubernetes:` sections.

Neither changes what a run trains, only where, so neither is part of any fingerprint: a model
trained through Slurm is the cached output of the same config trained on this machine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config.base import Section


class LaunchOnly(Section):
    def fingerprint_dict(self) -> dict[str, Any]:
        return {}


class SlurmConfig(LaunchOnly):
    partition: str | None = None
    """`#SBATCH --partition`; default: the cluster's default partition."""
    account: str | None = None
    """`#SBATCH --account`."""
    time: str | None = None
    """`#SBATCH --time` (e.g. 04:00:00). A job near its limit is signalled `signal_lead_s` early,
    checkpoints and requeues itself, so a long run can span many short allocations."""
    gpus: Literal["auto", "yes", "no"] = "auto"
    """Ask for `--gpus-per-node=<train.nproc_per_node>`: `auto` when the partition's nodes list a
    `gpu` GRES (sinfo), `yes` always, `no` never (CPU clusters)."""
    cpus_per_task: int | None = Field(None, gt=0)
    """`#SBATCH --cpus-per-task` (the one task per node runs torchrun and its workers)."""
    signal_lead_s: int = Field(120, gt=0)
    """Seconds before the time limit at which Slurm sends SIGUSR1: the ranks finish their step,
    checkpoint together and the job requeues itself."""
    sbatch_lines: list[str] = []
    """Extra `#SBATCH` options, one per item, e.g. ["--qos=high", "--exclusive"] (the `#SBATCH` prefix is added)."""
    setup: list[str] = []
    """Shell lines run in the job before training, e.g. ["module load cuda", "source /shared/venv/bin/activate"].
    Default: the job runs this Python (the one that submits), which must be visible on the nodes."""
    poll_s: float = Field(3.0, gt=0)
    """How often the train stage polls the job's state (scontrol) while it follows it."""


class KubernetesConfig(LaunchOnly):
    image: str = "tunepipe:latest"
    """Container image with tunepipe installed (the repo's Dockerfile builds one)."""
    namespace: str = "default"
    """Namespace of the Job, Service and ConfigMap."""
    name: str | None = None
    """Name of the Job (and its Service); default `tunepipe-train-<fingerprint prefix>`."""
    gpus: int | None = Field(None, ge=0)
    """`nvidia.com/gpu` per pod; default train.nproc_per_node (0: a CPU job)."""
    cpu: str | None = None
    """CPU request and limit per pod, e.g. "8"."""
    memory: str | None = None
    """Memory request and limit per pod, e.g. "64Gi"."""
    shm_size: str = "16Gi"
    """Size of the in-memory /dev/shm each pod mounts (NCCL and data loading share tensors through it)."""
    s3_secret: str | None = None
    """Secret whose keys become the pods' environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)."""
    service_account: str | None = None
    """Service account of the pods (e.g. one bound to an IAM role for S3)."""
    node_selector: dict[str, str] = {}
    """Node labels the pods must match, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}."""
    backoff_limit: int = Field(3, ge=0)
    """Pod failures the Job retries; each retry resumes from the newest checkpoint on S3."""
