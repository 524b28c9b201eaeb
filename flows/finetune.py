"""The fine-tuning DAG as a Prefect flow: one task per stage.

    tunepipe run examples/quickstart.yaml --set train.max_steps=100     # once, now
    tunepipe deploy examples/quickstart.yaml --name nightly --cron "0 3 * * *"   # the same flow, scheduled

The flow only sequences `pipeline.stages`; all work, and the cache, live there. Its parameters
are the resolved config as a mapping plus dotted overrides, validated here exactly as the CLI
validates them, so a deployment's run-time parameters (another source, `train.max_steps=50`)
meet the same checks and a bad key fails the run naming it.

Task results are not persisted: the committed stage output (its manifest) is the cache, and
`materialize` answers "cached" from it in milliseconds. A persisted Prefect result would be a
pickle read back on the next run, which a planted file could use to run code, and a second cache
that can disagree with the first (a deleted output, a cache hit from another workdir).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run as this_flow_run
from prefect.settings import get_current_settings

from pipeline import artifacts, stages
from pipeline.config import PipelineConfig, build_config
from pipeline.machine_slots import take_slot
from pipeline.run_report import markdown_report, run_name
from pipeline.stages import StageResult

DEFAULT_POOL = "tunepipe"


def train_limit_name(pool: str | None) -> str:
    """The global concurrency limit that train stages of one work pool share."""
    return f"tunepipe-train-{pool or DEFAULT_POOL}"


def _run_stage(name: str, fingerprint: str | None, cfg: PipelineConfig, parents: dict, workdir: str, limit: str | None) -> StageResult:
    # No fingerprint: the plan could not take this stage's key (a source that is missing or
    # unreachable). Taken here, it fails (and is retried) as this stage, not as the flow.
    fingerprint = fingerprint or stages.compute_fingerprint(name, cfg, parents)
    if limit is None or stages.committed(name, workdir, fingerprint) is not None:
        return stages.materialize(name, cfg, parents, workdir, fp=fingerprint)
    # Queue behind the pool's other train stages. A cached train (above) never waits for a slot.
    with _train_slot(limit, cfg, workdir):
        return stages.materialize(name, cfg, parents, workdir, fp=fingerprint)


def _on_temporary_server() -> bool:
    """No API URL: Prefect's client runs this flow on a temporary server of this process's own."""
    return not get_current_settings().api.url


def _train_slot(limit: str, cfg: PipelineConfig, workdir: str) -> AbstractContextManager:
    if _on_temporary_server():
        # A temporary server keeps leases in memory and never expires them, so a slot of a run
        # killed mid-train stayed taken in the database for every later run. On one machine, slots
        # that the kernel frees with their holder do the same job (pipeline/machine_slots.py).
        folder = Path(get_current_settings().home) / "tunepipe" / "train-slots" / limit
        return take_slot(folder, cfg.train.max_concurrent, f"flow run {this_flow_run.name!r} into {workdir}",
                         log=lambda line: print(f"[train] {line}", flush=True))
    print(f"[train] taking a slot of concurrency limit {limit!r} (queued while it is full)")
    return concurrency(limit, occupy=1)


def stage_task(name: str):
    return task(
        _run_stage,
        name=name,
        task_run_name=lambda parameters: f"{name}-{(parameters['fingerprint'] or 'unplanned')[:12]}",
        cache_policy=NO_CACHE,
        persist_result=False,
        log_prints=True,
    )


STAGE_TASKS = {name: stage_task(name) for name in stages.ORDER}


def task_for(name: str, cfg: PipelineConfig, workdir: str):
    """The stage's task with the config's timeout, and retries with doubling back-off where the
    stage reads or writes remote storage (a flaky network); never for train (stages.retryable)."""
    options: dict[str, Any] = {"timeout_seconds": cfg.prefect.timeout_s.get(name)}
    if stages.retryable(name, cfg, workdir) and cfg.prefect.retries:
        options["retries"] = cfg.prefect.retries
        options["retry_delay_seconds"] = [cfg.prefect.retry_delay_s * 2**i for i in range(cfg.prefect.retries)]
    return STAGE_TASKS[name].with_options(**options)


def _flow_run_name() -> str:
    parameters = this_flow_run.parameters
    try:
        return run_name(build_config(parameters["config"], parameters.get("overrides") or []))
    except Exception:  # the run itself fails on the bad config, naming the key
        return "tunepipe-invalid-config"


def _work_pool() -> str | None:
    """The pool of the deployment this run belongs to; None for an ad-hoc run."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(this_flow_run.id).work_pool_name


@flow(name="tunepipe-finetune", flow_run_name=_flow_run_name, log_prints=True, persist_result=False)
def finetune(
    config: dict[str, Any],
    workdir: str = "runs",
    overrides: list[str] | None = None,
    until: str | None = None,
    train_limit: bool = True,
) -> list[StageResult]:
    """Run (or load from the cache) every stage of `config` with `overrides` applied, in `workdir`."""
    cfg = build_config(config, overrides or [])
    artifacts.use_s3_endpoint(cfg.data.s3_endpoint_url)
    fingerprints, _ = stages.plan_partial(cfg, until)
    stages.preflight(cfg, fingerprints, workdir)
    # Every node of a run started by hand runs this flow for its share: they must start together.
    limit = _train_limit(cfg) if train_limit and not cfg.train.started_on_every_node else None
    results: dict[str, StageResult] = {}
    for name in stages.stage_names(until, cfg):
        parents = {p: results[p].artifact for p in stages.parents_of(name, cfg)}
        start = time.perf_counter()
        fp = fingerprints.get(name)  # None past a stage whose key the plan could not take: the task takes it
        try:
            result: StageResult = task_for(name, cfg, workdir)(name, fp, cfg, parents, workdir, limit if name == "train" else None)
        except Exception as e:
            failed = stages.StageFailed(stages.failed_result(name, fp or "", start, e), list(results.values()), e)
            _publish_report(cfg, failed.results, workdir)
            raise failed from e
        results[name] = result
        print(f"[{name}] {result.status} in {time.perf_counter() - start:.1f}s -> {result.output}")
    _publish_report(cfg, list(results.values()), workdir)
    return list(results.values())


def _train_limit(cfg: PipelineConfig) -> str:
    """Create the pool's train limit if missing (a deployment made by `prefect deploy` has none
    yet); an existing one keeps its size, which `tunepipe deploy` sets."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = train_limit_name(_work_pool())
    if _on_temporary_server():
        return name  # slots on this machine (_train_slot), not a limit in Prefect's database
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except Exception:  # ObjectNotFound; a concurrent run may create it first, which is as good
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=cfg.train.max_concurrent))
            except Exception:
                pass
    return name


def _publish_report(cfg: PipelineConfig, results: list[StageResult], workdir: str) -> None:
    """A markdown artifact on the flow run: what each stage did and where the model went."""
    create_markdown_artifact(
        markdown=markdown_report(cfg, results, workdir),
        key=f"tunepipe-{cfg.registry.model_name.lower().replace('_', '-').replace('.', '-')}",
        description=f"tunepipe run of {run_name(cfg)}",
    )
