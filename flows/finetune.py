"""The fine-tuning DAG as a Prefect flow: one task per stage, cached by stage fingerprint.

    tunepipe run examples/quickstart.yaml --set train.max_steps=100

The flow only sequences `pipeline.stages`; all work, and the on-disk cache, live there. A
Prefect cache hit is honoured only while the committed output it points to still exists, so
deleting an output folder (or the registry version) makes the stage run again.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.context import TaskRunContext

from pipeline import artifacts, stages
from pipeline.artifacts import StageOutput
from pipeline.config import PipelineConfig
from pipeline.stages import StageResult


def _cache_key(context: TaskRunContext, parameters: dict) -> str | None:
    name, fp, workdir = parameters["name"], parameters["fingerprint"], parameters["workdir"]
    done = StageOutput(workdir, name, fp).committed()
    if done is None or not stages.still_valid(stages.STAGES[name], done):
        return None  # no key: Prefect runs the task, and materialize rebuilds the output
    # The workdir is part of the key: Prefect's result store outlives any one workdir, and a hit
    # recorded for another workdir would hand back paths that are not this run's.
    where = artifacts.hash_json(str(Path(workdir).resolve()) if not artifacts.is_remote(workdir) else workdir)[:12]
    return f"tunepipe-{name}-{fp}-{where}"


def _run_stage(name: str, fingerprint: str, cfg: PipelineConfig, parents: dict, workdir: str) -> StageResult:
    return stages.materialize(name, cfg, parents, workdir, fp=fingerprint)


def stage_task(name: str):
    return task(
        _run_stage,
        name=name,
        task_run_name=f"{name}-{{fingerprint:.12}}",
        cache_key_fn=_cache_key,
        persist_result=True,
        log_prints=True,
    )


STAGE_TASKS = {name: stage_task(name) for name in stages.ORDER}


@flow(name="tunepipe-finetune", log_prints=True)
def finetune(cfg: PipelineConfig, workdir: str = "runs", until: str | None = None) -> list[StageResult]:
    stages.preflight(cfg, until)
    artifacts.use_s3_endpoint(cfg.data.s3_endpoint_url)
    results: dict[str, StageResult] = {}
    for name in stages.ORDER:
        parents = {p: results[p].artifact for p in stages.STAGES[name].parents}
        fp = stages.compute_fingerprint(name, cfg, parents)
        start = time.perf_counter()
        state = STAGE_TASKS[name](name, fp, cfg, parents, workdir, return_state=True)
        result: StageResult = state.result()
        if state.name == "Cached":
            # Report the committed output itself, not the stored result that pointed at it.
            done = StageOutput(workdir, name, fp).committed()
            result = StageResult(name, "cached", fp, time.perf_counter() - start, done.url, done.stats)
        results[name] = result
        print(f"[{name}] {result.status} in {result.seconds:.1f}s -> {result.output}")
        if name == until:
            break
    return list(results.values())
