"""The stage table and the cache-aware runner. Works without Prefect; `flows/` only sequences it.

Each stage is `run(*sections, inputs={parent: Path}, out=Path, scratch=Path) -> stats`. It is
handed exactly the config sections it declares, and those sections are exactly what its
fingerprint hashes, so a stage cannot read a setting that its cache key ignores.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import artifacts, run_lock
from pipeline.artifacts import Artifact, StageOutput
from pipeline.code_version import code_version
from pipeline.config import PipelineConfig


class StageInputsChanged(RuntimeError):
    pass


class StageFailed(RuntimeError):
    """A stage raised; carries the results of the stages before it and the failed one's, so the
    run can still write its summary. The message names the stage and the reason."""

    def __init__(self, failed: "StageResult", done: list["StageResult"], error: BaseException):
        reason = str(error).strip() or type(error).__name__
        super().__init__(f"{failed.name} stage failed: {reason}")
        self.failed, self.done, self.error = failed, done, error

    @property
    def results(self) -> list["StageResult"]:
        return [*self.done, self.failed]


def failed_result(name: str, fp: str, started: float, error: BaseException) -> "StageResult":
    reason = (str(error).strip() or type(error).__name__).splitlines()[0]
    return StageResult(name, "failed", fp, time.perf_counter() - started, "", {"error": reason})


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    """Module with `run(...)` (and optionally `content_fingerprint(...)`). Its import closure is the
    stage's code version (code_version.py): nothing else needs listing."""
    sections: tuple[str, ...]
    """Config sections handed to `run`, in order; exactly these are fingerprinted (less their inactive keys)."""
    parents: tuple[str, ...] = ()
    has_content: bool = False
    """The module has `content_fingerprint(*sections)`: bytes read from outside the pipeline."""
    has_external_output: bool = False
    """The module has `still_valid(artifact)`: its output also lives outside the workdir (the registry)."""
    shared_scratch: bool = False
    """`run` also takes `shared=`: scratch every node sees (in the workdir, even an s3:// one)."""
    content_module: str | None = None
    """Where `content_fingerprint` lives when `module` is too heavy to import just to check the
    cache (train's imports torch: seconds a fully cached run must not pay). `module` imports it
    too, so its source stays in the stage's code version."""
    applies: Callable[[PipelineConfig], bool] | None = None
    """For which configs the stage exists (None: all). A stage that does not apply is skipped and
    is no one's parent: the reference stage exists for task preference only, and every other
    config's fingerprints stay what they were before it was added."""
    exclusive: Callable[[PipelineConfig], bool] | None = None
    """For which configs one process at a time runs this stage for a fingerprint (a lock in its
    local scratch): two runs of one config must never train into the same checkpoint folder. The
    second waits, then finds the first one's committed output."""

    def load(self):
        return importlib.import_module(self.module)

    def load_content(self):
        return importlib.import_module(self.content_module or self.module)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        # `row_spec` is derived (PipelineConfig.row_spec): the task and the columns each row must hold.
        Stage("ingest", "pipeline.data.ingest", ("data", "row_spec"), (), has_content=True),
        Stage("sample", "pipeline.data.sample", ("sample", "row_spec"), ("ingest",)),
        # content: the stop-word list's digest when it is used (it is data, found beside normalize.py).
        Stage("preprocess", "pipeline.data.preprocess", ("preprocess", "row_spec"), ("sample",), has_content=True),
        Stage("tokenize", "pipeline.data.tokenize", ("tokenize", "model", "row_spec"), ("preprocess",), has_content=True),
        # Preference tuning's reference log-probabilities: keyed by the base and the data only.
        Stage("reference", "pipeline.train.reference", ("model", "reference_spec"), ("tokenize",), has_content=True,
              applies=lambda cfg: cfg.task == "preference"),
        # slurm: where the job runs, never part of the fingerprint (config/cluster.py).
        Stage("train", "pipeline.train.stage", ("model", "train", "slurm"), ("tokenize", "reference"), has_content=True, shared_scratch=True,
              content_module="pipeline.train.fingerprint",
              # Not when every node runs its own share of one job: they must all start at once.
              exclusive=lambda cfg: not cfg.train.started_on_every_node),
        Stage("evaluate", "pipeline.evaluate.stage", ("evaluate", "model"), ("preprocess", "tokenize", "reference", "train")),
        Stage("publish", "pipeline.registry.publish", ("registry", "evaluate", "model"), ("tokenize", "train", "evaluate"), has_external_output=True),
    ]
}
ORDER = list(STAGES)
"""Every stage of the table, in order; `stage_names(cfg=...)` gives those a config runs."""


def applies(name: str, cfg: PipelineConfig) -> bool:
    stage = STAGES[name]
    return stage.applies is None or stage.applies(cfg)


def parents_of(name: str, cfg: PipelineConfig) -> tuple[str, ...]:
    """The parents stage `name` has under this config (those that apply)."""
    return tuple(p for p in STAGES[name].parents if applies(p, cfg))


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "cached" | "resumed"
    fingerprint: str
    seconds: float
    output: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact(self) -> Artifact:
        return Artifact(self.name, self.fingerprint, self.output, self.stats)

    def as_summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "fingerprint": self.fingerprint,
            "seconds": round(self.seconds, 3),
            "output": self.output,
            "stats": self.stats,
        }


def _sections(stage: Stage, cfg: PipelineConfig) -> list[Any]:
    return [getattr(cfg, s) for s in stage.sections]


def compute_fingerprint(name: str, cfg: PipelineConfig, parents: dict[str, Artifact | str]) -> str:
    """`parents`: each parent's Artifact or just its fingerprint (all the key needs)."""
    return _fingerprint_and_content(name, cfg, parents)[0]


def _fingerprint_and_content(name: str, cfg: PipelineConfig, parents: dict[str, Artifact | str]) -> tuple[str, Any]:
    stage = STAGES[name]
    sections = _sections(stage, cfg)
    content = _content(stage, sections)
    fp = artifacts.fingerprint(
        name,
        {s: cfg.fingerprint_section(s) for s in stage.sections},
        {p: parents[p] if isinstance(parents[p], str) else parents[p].fingerprint for p in parents_of(name, cfg)},
        code_version(stage.module),
        content,
    )
    return fp, content


def _content(stage: Stage, sections: list[Any]) -> Any:
    """Hashes of what the stage reads from outside the pipeline (data files, tokenizer files)."""
    if not stage.has_content:
        return None
    return stage.load_content().content_fingerprint(*sections)


def scratch_dir(workdir: str, name: str, fp: str) -> Path:
    """Local, non-artifact space that survives a crash (a job's config, script and log live here)."""
    base = Path(workdir) if not artifacts.is_remote(workdir) else Path.home() / ".cache" / "tunepipe" / "scratch"
    return base / "scratch" / name / fp


def shared_scratch(workdir: str, name: str, fp: str) -> str:
    """Non-artifact space in the workdir itself, local or s3://: checkpoints and a cluster job's
    model live here, where a job on any node (and a later run on any machine) finds them."""
    return artifacts.join(workdir, "scratch", name, fp)


def materialize(
    name: str,
    cfg: PipelineConfig,
    parents: dict[str, Artifact],
    workdir: str,
    fp: str | None = None,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Load the committed output of stage `name` for these inputs, or run the stage and commit it."""
    stage = STAGES[name]
    fp = fp or compute_fingerprint(name, cfg, parents)
    start = time.perf_counter()
    done = committed(name, workdir, fp)
    if done is not None:
        return StageResult(name, "cached", fp, time.perf_counter() - start, done.url, done.stats)
    if stage.exclusive is None or not stage.exclusive(cfg):
        return _run_and_commit(stage, cfg, parents, workdir, fp, start)
    lock = scratch_dir(workdir, name, fp) / "run.lock"
    with run_lock.held(lock, f"[{name}] {fp[:12]}", log):
        done = committed(name, workdir, fp)  # committed by the run we waited for
        if done is not None:
            return StageResult(name, "cached", fp, time.perf_counter() - start, done.url, done.stats)
        return _run_and_commit(stage, cfg, parents, workdir, fp, start)


def committed(name: str, workdir: str, fp: str) -> Artifact | None:
    """The committed output of `name` at `fp`, checked against its manifest (a changed or missing
    file raises, naming it: never silent reuse), or None when there is none to reuse."""
    done = StageOutput(workdir, name, fp).verified()
    return done if done is not None and still_valid(STAGES[name], done) else None


def _run_and_commit(stage: Stage, cfg: PipelineConfig, parents: dict[str, Artifact], workdir: str, fp: str, start: float) -> StageResult:
    name = stage.name
    out = StageOutput(workdir, name, fp)
    path = out.prepare()
    try:
        module = stage.load()
        inputs = {p: parents[p].local_path() for p in parents_of(name, cfg)}
        shared = {"shared": shared_scratch(workdir, name, fp)} if stage.shared_scratch else {}
        stats = module.run(*_sections(stage, cfg), inputs=inputs, out=path, scratch=scratch_dir(workdir, name, fp), **shared)
        # The fingerprint was taken before the run; if a data file or the stage's code changed
        # meanwhile, the output belongs to neither version. Hashes are cached by (size, mtime),
        # so this re-check costs a stat per file unless something did change.
        fp_after, content = _fingerprint_and_content(name, cfg, parents)
        if fp_after != fp:
            raise StageInputsChanged(
                f"[{name}] its input files or code changed while it ran; nothing was committed, run again"
            )
    except BaseException:
        out.abandon()  # our own staging folder; a concurrent run's is not ours to touch
        raise
    record = {
        "content": content,
        "config": {s: getattr(cfg, s).model_dump(mode="json") for s in stage.sections},
        "parents": {p: {"fingerprint": parents[p].fingerprint, "url": parents[p].url} for p in parents_of(name, cfg)},
    }
    artifact = out.commit(stats, record)  # a concurrent run may have committed first: then it is theirs
    status = "resumed" if stats.get("resumed_from_step") else "ran"
    return StageResult(name, status, fp, time.perf_counter() - start, artifact.url, artifact.stats)


def still_valid(stage: Stage, done: Artifact) -> bool:
    """A committed output is reusable unless part of it lives elsewhere and has gone missing."""
    return stage.load().still_valid(done) if stage.has_external_output else True


def retryable(name: str, cfg: PipelineConfig, workdir: str) -> bool:
    """Does a failure of this stage deserve a retry? Only where it reads or writes remote storage
    (a dropped connection, a throttled bucket): ingest of an s3:// or hub source, publish to an
    s3:// registry, any stage of an s3:// workdir. Never train, which resumes from its checkpoint
    on the next run instead; a local failure is a real one and a retry only repeats it."""
    if name == "train":
        return False
    if artifacts.is_remote(workdir):
        return True
    if name == "ingest":
        sources = [cfg.data.source] if isinstance(cfg.data.source, str) else cfg.data.source
        return any(artifacts.is_remote(s) or s.startswith("hf:") for s in sources)
    return name == "publish" and artifacts.is_remote(cfg.registry.url)


def stage_names(until: str | None = None, cfg: PipelineConfig | None = None) -> list[str]:
    """The stages a run goes through, in order, up to and including `until`: with `cfg`, those
    that apply to it (`until` itself always counts as the stop, applying or not)."""
    names = ORDER[: ORDER.index(until) + 1] if until else list(ORDER)
    return names if cfg is None else [n for n in names if applies(n, cfg)]


def plan(cfg: PipelineConfig, until: str | None = None) -> dict[str, str]:
    """Each stage's fingerprint, in order, up to and including `until`. A key needs only the
    config, the parents' keys, code and content, so the whole DAG is known before any stage runs
    and without importing any stage's module (torch, transformers: seconds a cached run skips).
    Raises what the first stage whose key cannot be taken raised (a missing data file)."""
    fps, failure = plan_partial(cfg, until)
    if failure is not None:
        raise failure[1]
    return fps


def plan_partial(cfg: PipelineConfig, until: str | None = None) -> tuple[dict[str, str], tuple[str, Exception] | None]:
    """As `plan`, but stops at the first stage whose key cannot be taken, and says which and why.
    The runners then take that stage's key inside the stage itself, so its failure is reported
    (and, for remote storage, retried) as that stage's."""
    fps: dict[str, str] = {}
    for name in stage_names(until, cfg):
        try:
            fps[name] = compute_fingerprint(name, cfg, {p: fps[p] for p in parents_of(name, cfg)})
        except Exception as e:
            return fps, (name, e)
    return fps, None


def cached_run(cfg: PipelineConfig, workdir: str, until: str | None = None) -> list[StageResult] | None:
    """Every planned stage's committed output if all are committed and intact, else None: the
    run has nothing to do. Any doubt (a changed file, an unreadable manifest) answers None, so
    the full run meets it and reports it in its usual way."""
    artifacts.use_s3_endpoint(cfg.data.s3_endpoint_url)
    results = []
    try:
        for name, fp in plan(cfg, until).items():
            start = time.perf_counter()
            done = committed(name, workdir, fp)
            if done is None:
                return None
            results.append(StageResult(name, "cached", fp, time.perf_counter() - start, done.url, done.stats))
    except Exception:
        return None
    return results


def preflight(cfg: PipelineConfig, fingerprints: dict[str, str], workdir: str, log: Callable[[str], None] = print) -> None:
    """Settings that cannot work on this machine fail here, before ingest reads a byte; settings
    that run but will disappoint are said here, once. Only when training is still to be done: a
    cached train needs neither (nor the seconds torch takes to import)."""
    if "train" not in fingerprints:
        return
    try:
        if committed("train", workdir, fingerprints["train"]) is not None:
            return
    except Exception:
        pass  # the run itself will name the problem with the committed output
    from pipeline.train.stage import preflight as train_preflight

    for warning in [*cfg.disappointing_settings(), *train_preflight(cfg.model, cfg.train)]:
        log(f"warning: {warning}")


def run_stages(
    cfg: PipelineConfig,
    workdir: str,
    until: str | None = None,
    log: Callable[[str], None] = print,
) -> list[StageResult]:
    """Run (or load) every stage in order up to and including `until`, without Prefect."""
    artifacts.use_s3_endpoint(cfg.data.s3_endpoint_url)
    fingerprints, _ = plan_partial(cfg, until)
    preflight(cfg, fingerprints, workdir, log)
    results: dict[str, StageResult] = {}
    for name in stage_names(until, cfg):
        parents = {p: results[p].artifact for p in parents_of(name, cfg)}
        started = time.perf_counter()
        fp = fingerprints.get(name)  # None past a stage whose key could not be taken: taken inside, below
        try:
            results[name] = materialize(name, cfg, parents, workdir, fp=fp, log=log)
        except Exception as e:
            raise StageFailed(failed_result(name, fp or "", started, e), list(results.values()), e) from e
        log(f"[{name}] {results[name].status} -> {results[name].output}")
    return list(results.values())
