"""`tunepipe slurm script` and `tunepipe k8s manifest`: a cluster job for a config, by hand.

Both first run the CPU stages (ingest to tokenize; cached) so the job only streams pre-packed
shards, then describe the train stage's job for this exact fingerprint. The job commits its model
under the stage's scratch, and the next `tunepipe run` of the same config adopts it: the
hand-submitted job flows back into the cached DAG (evaluate, publish).
"""

from __future__ import annotations

import contextlib
import sys

from pipeline import artifacts
from pipeline.cluster.kubernetes import CONFIG_MOUNT, render_manifest
from pipeline.cluster.torchrun import rendezvous_id
from pipeline.config import PipelineConfig
from pipeline.stages import compute_fingerprint, parents_of, run_stages, scratch_dir, shared_scratch
from pipeline.train.stage import JobPlan, job_config, plan_job, slurm_script


class ClusterJobError(ValueError):
    """A config or workdir that cannot make this cluster job; the message says what to change."""


def _prepare(cfg: PipelineConfig, workdir: str, config_at: str | None = None) -> tuple[JobPlan, "artifacts.Artifact"]:
    # The stages before train: tokenize, and for preference tuning the reference log-probabilities.
    before_train = parents_of("train", cfg)[-1]
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the script or manifest
        results = {r.name: r.artifact for r in run_stages(cfg, workdir, until=before_train, log=lambda line: print(line, file=sys.stderr))}
    fp = compute_fingerprint("train", cfg, results)
    where = {name: a.url if artifacts.is_remote(workdir) else str(a.local_path()) for name, a in results.items()}
    plan = plan_job(cfg.model, cfg.train, tokenized=where["tokenize"], reference=where.get("reference"),
                    scratch=scratch_dir(workdir, "train", fp), shared=shared_scratch(workdir, "train", fp), config_at=config_at)
    return plan, results["tokenize"]


def slurm_script_for(cfg: PipelineConfig, workdir: str) -> str:
    plan, _ = _prepare(cfg, workdir)
    return slurm_script(cfg.train, cfg.slurm, plan, scratch_dir(workdir, "train", plan.fingerprint))


def k8s_manifest_for(cfg: PipelineConfig, workdir: str) -> str:
    if not artifacts.is_remote(workdir):
        raise ClusterJobError(f"--workdir {workdir} is a local folder: pods read the tokenized shards and write checkpoints "
                         "and the model through an s3:// workdir (e.g. --workdir s3://bucket/runs)")
    plan, _ = _prepare(cfg, workdir, config_at=f"{CONFIG_MOUNT}/train_config.json")
    config_json = job_config(cfg.model, cfg.train)
    env = {"AWS_ENDPOINT_URL": cfg.data.s3_endpoint_url} if cfg.data.s3_endpoint_url else {}
    name = cfg.kubernetes.name or f"tunepipe-train-{plan.fingerprint[:12]}"
    return render_manifest(cfg.train, cfg.kubernetes, name=name, worker_args=plan.worker_args(), config_json=config_json,
                           rdzv_id=rendezvous_id(cfg.train, plan.fingerprint), env=env)
