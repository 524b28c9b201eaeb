"""The fine-tuning DAG as a Prefect flow: one task per stage.

    tunepipe run examples/quickstart.yaml --set train.max_steps=100

The flow only sequences `pipeline.stages`; all work, and the cache, live there. Task results are
not persisted: the committed stage output (its manifest) is the cache, and `materialize` answers
"cached" from it in milliseconds. A persisted Prefect result would be a pickle read back on the
next run, which a planted file could use to run code, and a second cache that can disagree with
the first (a deleted output, a cache hit from another workdir).
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline import artifacts, stages
from pipeline.config import PipelineConfig
from pipeline.stages import StageResult


def _run_stage(name: str, fingerprint: str, cfg: PipelineConfig, parents: dict, workdir: str) -> StageResult:
    return stages.materialize(name, cfg, parents, workdir, fp=fingerprint)


def stage_task(name: str):
    return task(
        _run_stage,
        name=name,
        task_run_name=f"{name}-{{fingerprint:.12}}",
        cache_policy=NO_CACHE,
        persist_result=False,
        log_prints=True,
    )


STAGE_TASKS = {name: stage_task(name) for name in stages.ORDER}


@flow(name="tunepipe-finetune", log_prints=True, persist_result=False)
def finetune(cfg: PipelineConfig, workdir: str = "runs", until: str | None = None) -> list[StageResult]:
    stages.preflight(cfg, until)
    artifacts.use_s3_endpoint(cfg.data.s3_endpoint_url)
    results: dict[str, StageResult] = {}
    for name in stages.ORDER:
        parents = {p: results[p].artifact for p in stages.STAGES[name].parents}
        fp = stages.compute_fingerprint(name, cfg, parents)
        start = time.perf_counter()
        try:
            result: StageResult = STAGE_TASKS[name](name, fp, cfg, parents, workdir)
        except Exception as e:
            raise stages.StageFailed(stages.failed_result(name, fp, start, e), list(results.values()), e) from e
        results[name] = result
        print(f"[{name}] {result.status} in {time.perf_counter() - start:.1f}s -> {result.output}")
        if name == until:
            break
    return list(results.values())
