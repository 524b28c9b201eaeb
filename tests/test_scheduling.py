"""Scheduled runs on a real Prefect server: `tunepipe deploy`, `tunepipe worker`, the train
concurrency limit, retries at remote edges, and `tunepipe run` recorded on a server.

    python -m pytest -q tests/test_scheduling.py

Everything Prefect runs in subprocesses (the CLI, the worker and the flow runs it starts) against
the session's `prefect server start` (tests/prefect_server.py); this process only reads the server
back through its REST API and never imports prefect, which other modules' prefect_test_harness
owns in-process. Each test has a pool of its own, so no worker of one test picks up another's runs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from uuid import uuid4

import pytest
import prefect_server as server_api
from tiny import QUICKSTART, REPO, cli_command, tiny_overrides

from pipeline.config import load_config
from pipeline.run_report import run_name

# Slow: whole tiny pipelines run under a worker (~10-15 s each, plus ~5 s to start a flow run).
pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The worker asks the server for due runs every second (default 10 s) and starts them at most
# 2 s early (default 10 s), so a test waits on the pipeline, not on polling.
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
RUN_TIMEOUT_S = 150
# Half the tiny config's steps: these tests look at what runs when, not at what the model learns.
STEPS = {"train.max_steps": 20}
STAGES = ["ingest", "sample", "preprocess", "tokenize", "train", "evaluate", "publish"]
NEW_ROWS = [
    (f"Hi, this is Quentin {i}. Can I swap the strap on my TrailWatch {i} for a bigger size?",
     f"Hello Quentin, yes: send us strap {i} unworn within 30 days and we will post the larger one free of charge.")
    for i in range(6)
]


# ---------------------------------------------------------------- the server's REST API

BUSY_TRIES = 20


def retried(call):
    """call(), again while the server answers 503: its SQLite database is locked now and then while
    flow runs write to it ("database is locked"), and Prefect's own client retries a 503 too."""
    for attempt in range(BUSY_TRIES):
        try:
            return call()
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == BUSY_TRIES - 1:
                raise
            time.sleep(0.5)


def flow_runs(server, deployment_name: str | None = None) -> list[dict]:
    return retried(lambda: server_api.flow_runs(server, deployment_name))


def task_runs(server, flow_run_id: str) -> list[dict]:
    return retried(lambda: server_api.task_runs(server, flow_run_id))


def runs_named(server, name: str) -> list[dict]:
    return ok(server, "POST", "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})


def api(server, method: str, route: str, body: dict | None = None) -> tuple[int, object]:
    """(HTTP status, decoded JSON or None) of one request; an error status other than a passing 503
    is returned, not raised."""
    data = None if body is None else json.dumps(body).encode()

    def request():
        sent = urllib.request.Request(server.url + route, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(sent, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None

    try:
        return retried(request)
    except urllib.error.HTTPError as e:
        return e.code, None


def ok(server, method: str, route: str, body: dict | None = None):
    status, answer = api(server, method, route, body)
    assert 200 <= status < 300, f"{method} {route} answered {status}"
    return answer


def deployment_named(server, name: str) -> list[dict]:
    return ok(server, "POST", "/deployments/filter", {"deployments": {"name": {"any_": [name]}}})


def train_limit(server, pool: str) -> dict:
    limits = ok(server, "POST", "/v2/concurrency_limits/filter", {"limit": 200})
    found = [c for c in limits if c["name"] == f"tunepipe-train-{pool}"]
    assert len(found) == 1, [c["name"] for c in limits]
    return found[0]


def report_of(server, flow_run: dict, model_name: str) -> str:
    """The markdown artifact the run attached (key tunepipe-<model_name>)."""
    found = ok(server, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    reports = [a for a in found if a["key"] == f"tunepipe-{model_name}"]
    assert len(reports) == 1, [(a["key"], a["type"]) for a in found]
    assert reports[0]["type"] == "markdown"
    return reports[0]["data"]


def stage_statuses(report: str) -> dict[str, str]:
    """{stage: status} from the report's table rows, `| stage | status | seconds | ...`."""
    rows = re.findall(r"^\| (\w+) \| (\w+) \| [\d.]+ \|", report, re.MULTILINE)
    return dict(rows)


def when(stamp: str | None) -> datetime:
    assert stamp, "no time recorded"
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def interval(task_run: dict) -> tuple[datetime, datetime]:
    return when(task_run["start_time"]), when(task_run["end_time"])


def assert_disjoint(intervals: list[tuple[datetime, datetime]], what: str) -> None:
    ordered = sorted(intervals)
    for (_, first_end), (second_start, _) in zip(ordered, ordered[1:]):
        assert second_start >= first_end, f"{what} overlapped: {ordered}"


# ---------------------------------------------------------------- processes


def tunepipe(server, tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`tunepipe ARGS` with PREFECT_API_URL pointing at the test server, run from tmp_path (a
    folder holding no .env or prefect.toml that Prefect would read)."""
    return subprocess.run(cli_command(*args), cwd=tmp_path, env=server.env(), capture_output=True, text=True, timeout=timeout)


def set_args(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (the CLI, `prefect worker` and the flow runs it started), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Flow runs outlive a SIGTERM'd worker for a moment: wait until nothing of the group is left.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)


@contextmanager
def worker(server, pool: str, log: Path, *prefect_args: str):
    """`tunepipe worker --pool POOL [-- PREFECT_ARGS]` in a session of its own, stopped on exit."""
    extra = ["--", *prefect_args] if prefect_args else []
    with log.open("wb") as stream:
        process = subprocess.Popen(cli_command("worker", "--pool", pool, *extra), cwd=log.parent, env=server.env(WORKER_ENV),
                                   stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_group(process)


def wait_for_runs(server, deployment: str, log: Path, done, what: str, timeout: float = RUN_TIMEOUT_S) -> list[dict]:
    """Poll the deployment's runs every second until done(runs) is true; a failed or crashed run,
    or the timeout, fails the test showing the runs and the worker's log."""
    deadline = time.monotonic() + timeout
    runs: list[dict] = []
    while time.monotonic() < deadline:
        runs = flow_runs(server, deployment)
        broken = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
        assert not broken, f"{[(r['name'], r['state']['message']) for r in broken]}\nworker log:\n{tail(log)}"
        if done(runs):
            return runs
        time.sleep(1)
    states = [(r["name"], r["state_name"], r["start_time"]) for r in runs]
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {states}\nworker log:\n{tail(log)}")


def completed(runs: list[dict]) -> list[dict]:
    return sorted((r for r in runs if r["state_type"] == "COMPLETED"), key=lambda r: r["start_time"])


def versions(registry: Path, model_name: str) -> list[str]:
    """Committed versions (<registry>/<model>/<version>/manifest.json; staging folders start with '.')."""
    return sorted(p.parent.name for p in (registry / model_name).glob("*/manifest.json") if not p.parent.name.startswith("."))


def tiny_data(tmp_path: Path) -> Path:
    """A copy of the bundled data the test may append rows to."""
    data = tmp_path / "data.csv"
    shutil.copy(REPO / "examples" / "data" / "support.csv", data)
    return data


def deploy(server, tmp_path: Path, name: str, pool: str, workdir: Path, overrides: list[str], *when: str) -> str:
    done = tunepipe(server, tmp_path, "deploy", str(QUICKSTART), "--name", name, "--pool", pool,
                    "--workdir", str(workdir), *when, *set_args(overrides), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(rf"deployment tunepipe-finetune/{name} \(([0-9a-f-]{{36}})\) on pool '{pool}'", done.stdout)
    assert match, done.stdout
    assert f"created process work pool {pool!r}" in done.stdout, done.stdout
    return match.group(1)


# ---------------------------------------------------------------- the tests


def test_a_schedule_runs_then_caches_then_picks_up_new_rows(prefect_server, tmp_path):
    server, model = prefect_server, "sched"
    name, pool = f"every5s-{uuid4().hex[:6]}", f"pool-{uuid4().hex[:6]}"
    data, workdir, registry = tiny_data(tmp_path), tmp_path / "runs", tmp_path / "registry"
    overrides = tiny_overrides(registry, **{"data.source": data, "registry.model_name": model}, **STEPS)
    expected_name = run_name(load_config(QUICKSTART, overrides))
    assert re.fullmatch(rf"{model}-[0-9a-f]{{8}}", expected_name)

    deployment_id = deploy(server, tmp_path, name, pool, workdir, overrides, "--interval", "5")
    [deployment] = deployment_named(server, name)
    assert deployment["id"] == deployment_id and deployment["work_pool_name"] == pool
    assert deployment["entrypoint"] == "flows.finetune.finetune"
    assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}]
    assert deployment["parameters"]["workdir"] == str(workdir) and deployment["parameters"]["overrides"] == []
    config = deployment["parameters"]["config"]
    assert config["data"]["source"] == str(data) and config["train"]["max_steps"] == 20
    assert config == load_config(QUICKSTART, overrides).model_dump(mode="json")
    assert [s["schedule"]["interval"] for s in deployment["schedules"]] == [5.0]
    assert train_limit(server, pool)["limit"] == 1

    # --limit 1: the worker starts one run at a time, so "the run after the first" is a run that
    # started once the first had finished (runs made every 5 s would otherwise overlap; overlapping
    # runs are test_overlapping_runs_queue_for_the_train_slot's).
    log = tmp_path / "worker.log"
    try:
        with worker(server, pool, log, "--limit", "1"):
            runs = wait_for_runs(server, name, log, lambda runs: len(completed(runs)) >= 2, "two completed runs")
            first, second = completed(runs)[:2]
            assert len(versions(registry, model)) == 1, versions(registry, model)
            [published] = versions(registry, model)

            report = report_of(server, first, model)
            assert stage_statuses(report) == {stage: "ran" for stage in STAGES}, report
            assert f"**Published:** `{registry / model / published}` (version `{published}`)" in report
            report = report_of(server, second, model)
            assert stage_statuses(report) == {stage: "cached" for stage in STAGES}, report
            assert "Every stage was cached" in report and str(registry / model / published) in report

            with data.open("a", newline="") as stream:
                csv.writer(stream, lineterminator="\n").writerows(NEW_ROWS)
            appended = datetime.now(timezone.utc)

            def after_append(runs):
                return [r for r in completed(runs) if when(r["start_time"]) > appended]

            # A run that started before the append may still have read the file after it (its plan
            # comes a few seconds after its start): so of the runs that ended after the append,
            # exactly one ran every stage on the new rows, and any other was all cached.
            runs = wait_for_runs(server, name, log, after_append, "a completed run started after the append")
            since = [stage_statuses(report_of(server, r, model)) for r in completed(runs) if when(r["end_time"]) > appended]
            ran, cached = ({stage: status for stage in STAGES} for status in ("ran", "cached"))
            assert since.count(ran) == 1 and since.count(ran) + since.count(cached) == len(since), since
            assert len(versions(registry, model)) == 2 and published in versions(registry, model), versions(registry, model)

            # Stop the schedule while the worker still runs: nothing makes new runs once it is gone.
            assert api(server, "DELETE", f"/deployments/{deployment_id}")[0] == 204
            assert deployment_named(server, name) == []
    finally:
        api(server, "DELETE", f"/deployments/{deployment_id}")

    finished = completed(runs)
    assert len(finished) >= 3
    assert {r["name"] for r in finished} == {expected_name}
    trains = []
    for run in finished:
        tasks = {t["name"].split("-")[0]: t for t in task_runs(server, run["id"])}
        assert sorted(tasks) == sorted(STAGES), sorted(tasks)
        assert all(re.fullmatch(rf"{stage}-[0-9a-f]{{12}}", tasks[stage]["name"]) for stage in STAGES)
        trains.append(interval(tasks["train"]))
    # With --limit 1 the worker alone keeps these apart; here it shows only that no run of the
    # schedule was started twice. The train limit's own test is the next-but-one.
    assert_disjoint(trains, "train task runs")
    assert train_limit(server, pool)["active_slots"] == 0

    # A `tunepipe run` of the same config against the server: all cached, and still recorded there.
    done = tunepipe(server, tmp_path, "run", str(QUICKSTART), "--workdir", str(workdir), *set_args(overrides))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"tunepipe: running on the Prefect server at {server.url}" in done.stderr
    ad_hoc = [r for r in runs_named(server, expected_name) if r["deployment_id"] is None]
    assert [r["state_type"] for r in ad_hoc] == ["COMPLETED"]
    report = report_of(server, ad_hoc[0], model)
    assert stage_statuses(report) == {stage: "cached" for stage in STAGES}, report


def test_a_misspelled_key_at_deploy_time_creates_nothing(prefect_server, tmp_path):
    name, pool = f"typo-{uuid4().hex[:6]}", f"fresh-{uuid4().hex[:6]}"
    done = tunepipe(prefect_server, tmp_path, "deploy", str(QUICKSTART), "--name", name, "--interval", "60",
                    "--pool", pool, "--set", "train.max_stpes=20", timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "train.max_stpes" in done.stderr and "train.max_steps" in done.stderr, done.stderr
    assert done.stdout == ""
    assert deployment_named(prefect_server, name) == []
    assert api(prefect_server, "GET", f"/work_pools/{pool}")[0] == 404
    limits = ok(prefect_server, "POST", "/v2/concurrency_limits/filter", {"limit": 200})
    assert f"tunepipe-train-{pool}" not in [c["name"] for c in limits]


def test_overlapping_runs_queue_for_the_train_slot(prefect_server, tmp_path):
    server, model = prefect_server, "queue"
    name, pool = f"byhand-{uuid4().hex[:6]}", f"pool-{uuid4().hex[:6]}"
    workdir, registry = tmp_path / "runs", tmp_path / "registry"
    overrides = tiny_overrides(registry, **{"data.source": tiny_data(tmp_path), "registry.model_name": model}, **STEPS)
    deployment_id = deploy(server, tmp_path, name, pool, workdir, overrides)
    [deployment] = deployment_named(server, name)
    assert deployment["schedules"] == []

    log = tmp_path / "worker.log"
    try:
        with worker(server, pool, log):
            created = [ok(server, "POST", f"/deployments/{deployment_id}/create_flow_run",
                          {"parameters": {"overrides": [f"train.seed={seed}"]}}) for seed in (1, 2)]
            # The server merges run parameters over the deployment's, key by key.
            for run, seed in zip(created, (1, 2)):
                assert run["parameters"]["overrides"] == [f"train.seed={seed}"]
                assert run["parameters"]["config"] == deployment["parameters"]["config"]
                assert run["parameters"]["workdir"] == str(workdir)
            ids = {run["id"] for run in created}
            runs = wait_for_runs(server, name, log, lambda runs: len([r for r in completed(runs) if r["id"] in ids]) == 2,
                                 "both runs to complete")
    finally:
        api(server, "DELETE", f"/deployments/{deployment_id}")

    first, second = completed(runs)
    names = {r["name"] for r in (first, second)}
    assert names == {run_name(load_config(QUICKSTART, [*overrides, f"train.seed={seed}"])) for seed in (1, 2)}
    # The runs were in flight together (else the limit had nothing to do) ...
    assert when(second["start_time"]) < when(first["end_time"]), (first, second)
    # ... and each trained: two train outputs, two published versions.
    trains = []
    for run in (first, second):
        [train] = [t for t in task_runs(server, run["id"]) if t["name"].startswith("train-")]
        assert train["state_type"] == "COMPLETED"
        assert stage_statuses(report_of(server, run, model))["train"] == "ran"
        # A train task run is running while it queues for the slot; what the slot serialises is the
        # training inside it: from taking the stage's lock (run.lock is written once the slot is
        # held) to the commit of its output (the manifest's created_unix).
        [scratch] = (workdir / "scratch" / "train").glob(train["name"].removeprefix("train-") + "*")
        manifest = json.loads((workdir / "train" / scratch.name / "manifest.json").read_text())
        began = datetime.fromtimestamp((scratch / "run.lock").stat().st_mtime, timezone.utc)
        trains.append((began, datetime.fromtimestamp(manifest["created_unix"], timezone.utc)))
    assert_disjoint(trains, "trainings")
    assert len(versions(registry, model)) == 2
    limit = train_limit(server, pool)
    assert limit["limit"] == 1 and limit["active_slots"] == 0


def failing_run(server, tmp_path: Path, source: str, retries: int = 2) -> tuple[subprocess.CompletedProcess, dict, list[dict]]:
    """`tunepipe run` of the tiny config reading `source`, recorded on the server: (the process,
    its flow run, that run's task runs)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides = tiny_overrides(tmp_path / "registry", **{"data.source": source, "registry.model_name": "fail",
                                                         "prefect.retries": retries, "prefect.retry_delay_s": 0.1})
    done = tunepipe(server, tmp_path, "run", str(QUICKSTART), "--workdir", str(tmp_path / "runs"), *set_args(overrides))
    assert f"tunepipe: running on the Prefect server at {server.url}" in done.stderr, done.stderr
    expected = run_name(load_config(QUICKSTART, overrides))
    [run] = runs_named(server, expected)
    return done, run, task_runs(server, run["id"])


BAD_CSV = "question,answer\nWhere is my parcel?,It ships tomorrow.\n"  # no prompt or response column


def test_a_run_stopped_while_queued_for_a_full_train_limit_exits(prefect_server, tmp_path):
    """SIGTERM to a `tunepipe run` that waits for a slot of a full limit on a server: it leaves
    with exit 143 and one line. Before, Prefect's exit hook drained its slot-request service,
    which waits for a slot that never frees, and the process hung at exit for good."""
    server, name = prefect_server, "tunepipe-train-tunepipe"  # the limit of ad-hoc runs
    status, _ = api(server, "PATCH", f"/v2/concurrency_limits/{name}", {"limit": 1, "active_slots": 1})
    if status == 404:
        ok(server, "POST", "/v2/concurrency_limits/", {"name": name, "limit": 1, "active_slots": 1})
    log = tmp_path / "run.log"
    overrides = tiny_overrides(tmp_path / "registry", **{"data.source": tiny_data(tmp_path), "registry.model_name": "stopped"}, **STEPS)
    proc = subprocess.Popen(cli_command("run", str(QUICKSTART), "--workdir", str(tmp_path / "runs"), *set_args(overrides)),
                            cwd=tmp_path, env=server.env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while f"taking a slot of concurrency limit {name!r}" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, tail(log)
            time.sleep(0.2)
        time.sleep(3)  # inside the slot request, which polls the full limit
        assert proc.poll() is None, tail(log)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        ok(server, "PATCH", f"/v2/concurrency_limits/{name}", {"active_slots": 0})
    assert code == 143, tail(log)
    assert took < 60, f"{took:.0f} s to exit"  # the CLI bounds a stopped run's exit to 30 s
    assert "tunepipe: stopped by SIGTERM; a rerun reuses every committed stage" in tail(log, 5)
    assert not (tmp_path / "runs" / "train").exists() or not list((tmp_path / "runs" / "train").glob("*/manifest.json"))


def test_a_failing_remote_ingest_is_retried_then_names_its_stage(prefect_server, tmp_path, s3_bucket):
    import s3fs

    s3fs.S3FileSystem().pipe_file(f"{s3_bucket}/bad.csv", BAD_CSV.encode())
    done, run, tasks = failing_run(prefect_server, tmp_path / "s3", f"s3://{s3_bucket}/bad.csv")
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tunepipe: ingest stage failed: "), done.stderr[-3000:]
    assert run["state_type"] == "FAILED"
    assert run["state"]["message"].startswith("Flow run encountered an exception: StageFailed: ingest stage failed: ")
    assert [(t["name"].split("-")[0], t["state_type"], t["run_count"]) for t in tasks] == [("ingest", "FAILED", 3)]

    local = tmp_path / "bad.csv"
    local.write_text(BAD_CSV)
    done, run, tasks = failing_run(prefect_server, tmp_path / "local", str(local))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("tunepipe: ingest stage failed: "), done.stderr[-3000:]
    assert run["state_type"] == "FAILED" and "StageFailed: ingest stage failed: " in run["state"]["message"]
    assert [(t["name"].split("-")[0], t["state_type"], t["run_count"]) for t in tasks] == [("ingest", "FAILED", 1)]


def test_a_missing_remote_source_is_retried_then_names_its_stage(prefect_server, tmp_path, s3_bucket):
    done, run, tasks = failing_run(prefect_server, tmp_path, f"s3://{s3_bucket}/not-there.csv")
    observed = {"exit": done.returncode, "state": run["state_type"], "message": run["state"]["message"],
                "last line": done.stderr.strip().splitlines()[-1], "tasks": [(t["name"], t["run_count"]) for t in tasks]}
    shown = json.dumps(observed, indent=1)
    assert observed["exit"] == 1 and observed["state"] == "FAILED", shown
    assert "StageFailed: ingest stage failed: " in observed["message"], shown
    assert "ingest stage failed" in observed["last line"], shown
    # The plan could not take ingest's key (nothing to hash): the ingest task takes it, and fails as ingest.
    assert observed["tasks"] == [("ingest-unplanned", 3)], shown

    # A missing local file is a real failure: reported the same way, never retried.
    done, run, tasks = failing_run(prefect_server, tmp_path / "local", str(tmp_path / "not-there.csv"))
    assert done.returncode == 1 and "ingest stage failed" in done.stderr.strip().splitlines()[-1], done.stderr
    assert [(t["name"], t["run_count"]) for t in tasks] == [("ingest-unplanned", 1)]


def test_a_train_timeout_stops_the_job_with_a_checkpoint(prefect_server, tmp_path):
    """`prefect.timeout_s.train`: Prefect fails the train task when its time is up; the stage
    stops torchrun with SIGTERM, the rank checkpoints, and no process of the job is left. (That
    a run resumes from such a stop checkpoint, bit-identically: tests/test_preemption.py.)"""
    import psutil

    workdir = tmp_path / "runs"
    # The quickstart's model size, ~15 steps/s here.
    size = {"model.n_layer": 2, "model.n_head": 4, "model.n_embd": 128, "tokenize.block_size": 128, "train.micro_batch_size": 8}
    # 2,000 steps cannot finish in 25 s; a checkpoint every 5 steps leaves one however busy the
    # machine is (the stop's own checkpoint is tests/test_preemption.py's).
    overrides = tiny_overrides(tmp_path / "registry", **{**size, "train.max_steps": 2000, "train.save_every_steps": 5,
                                                        "registry.model_name": "timeout"})
    done = tunepipe(prefect_server, tmp_path, "run", str(QUICKSTART), "--workdir", str(workdir),
                    *set_args([*overrides, 'prefect.timeout_s={"train": 25}']))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tunepipe: train stage failed: ") and "timed out" in last, done.stderr[-2000:]
    assert "[train] stopped the training job" in done.stdout + done.stderr
    [run] = runs_named(prefect_server, run_name(load_config(QUICKSTART, overrides)))
    assert run["state_type"] == "FAILED" and "train stage failed" in run["state"]["message"]
    assert [t["run_count"] for t in task_runs(prefect_server, run["id"]) if t["name"].startswith("train-")] == [1]  # never retried
    # Nothing of the job is left running, and its checkpoints are there for the next run.
    scratch = workdir / "scratch" / "train"
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if str(scratch) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    steps = sorted(int(p.name.removeprefix("step_")) for p in scratch.glob("*/checkpoints/step_*") if (p / "COMPLETE").exists())
    assert steps and 0 < steps[-1] < 2000
    assert not list(workdir.glob("train/*/manifest.json"))  # stopped, not finished
