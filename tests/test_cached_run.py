"""A run with nothing to do: answered from the cache without torch, transformers or Prefect; the
plan of fingerprints; which failures deserve a retry; the `prefect:` section; the run's name and
markdown report; `tunepipe deploy --print` without a server.

    python -m pytest -q tests/test_cached_run.py                    # the fast tier
    python -m pytest -q -m integration tests/test_cached_run.py     # with a built tiny pipeline
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import QUICKSTART, REPO, cli_args, cli_command, stage_status, summary_of, tiny_overrides

from pipeline import cli, run_report, stages
from pipeline.config import ConfigError, build_config, load_config
from pipeline.config import orchestration
from pipeline.stages import StageResult

HEAVY = ("torch", "transformers", "prefect", "deepspeed")
RUN = [name for name in stages.ORDER if name != "reference"]
"""The stages a causal LM config runs (the reference stage is preference tuning's)."""


def no_server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def tiny_config(registry: Path, *extra: str):
    return load_config(QUICKSTART, [*tiny_overrides(registry), *extra])


def main_in_fresh_process(argv: list[str]) -> tuple[dict, list[str]]:
    """`pipeline.cli.main(argv)` in a new interpreter: its return code and which heavy modules it
    imported; and the lines it printed before that report."""
    code = (
        "import json, sys\n"
        "from pipeline.cli import main\n"
        f"rc = main({argv!r})\n"
        f"print(json.dumps({{'rc': rc, 'loaded': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=no_server_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


def summary_at(lines: list[str]) -> dict:
    assert lines[-1].endswith("summary.json"), lines[-1]
    return json.loads(Path(lines[-1]).read_text())


# ---------------------------------------------------------------- a fully cached run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny pipeline run once to publish, as `tunepipe stage publish` does: (workdir, registry, its summary)."""
    root = tmp_path_factory.mktemp("built")
    workdir, registry = root / "w", root / "r"
    proc = subprocess.run(cli_command(*cli_args("stage", workdir, registry, "publish", **{"train.max_steps": 6})),
                          cwd=REPO, env=no_server_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = summary_of(proc)
    assert set(stage_status(summary).values()) == {"ran"}
    return workdir, registry, summary


@pytest.mark.integration
def test_a_fully_cached_run_imports_no_heavy_library_and_starts_no_prefect(built):
    workdir, registry, first = built
    for command in ("run", "stage"):
        args = cli_args(command, workdir, registry, *(["publish"] if command == "stage" else []), **{"train.max_steps": 6})
        report, lines = main_in_fresh_process(args)
        assert report == {"rc": 0, "loaded": []}, (command, report, lines[-20:])
        for name in RUN:
            assert sum(line.startswith(f"[{name}] cached -> ") for line in lines) == 1, (command, name, lines)
        if command == "run":
            assert any(line.startswith("every stage is cached: nothing to run") for line in lines), lines
        summary = summary_at(lines)
        assert stage_status(summary) == {name: "cached" for name in RUN}
        assert [s["fingerprint"] for s in summary["stages"]] == [s["fingerprint"] for s in first["stages"]]
        assert summary["registry_version"] == first["registry_version"]


@pytest.mark.integration
def test_plan_is_what_the_run_fingerprinted_and_a_missing_output_ends_the_cached_answer(built):
    workdir, registry, first = built
    cfg = tiny_config(registry, "train.max_steps=6")
    fingerprints = {s["name"]: s["fingerprint"] for s in first["stages"]}
    assert stages.plan(cfg) == fingerprints
    assert list(stages.plan(cfg, until="tokenize")) == ["ingest", "sample", "preprocess", "tokenize"]
    assert stages.plan(cfg, until="tokenize") == {k: fingerprints[k] for k in ("ingest", "sample", "preprocess", "tokenize")}

    cached = stages.cached_run(cfg, str(workdir))
    assert [(r.name, r.status, r.fingerprint, r.output) for r in cached] == [
        (s["name"], "cached", s["fingerprint"], s["output"]) for s in first["stages"]
    ]

    # The registry version goes: publish is no longer done, though its stage folder still is.
    version = Path(first["registry_version"])
    moved = version.parent / ".gone"
    version.rename(moved)
    try:
        assert stages.cached_run(cfg, str(workdir)) is None
        assert [r.name for r in stages.cached_run(cfg, str(workdir), until="evaluate")] == RUN[:-1]
    finally:
        moved.rename(version)
    assert len(stages.cached_run(cfg, str(workdir))) == len(RUN)

    # Its stage folder goes: the same.
    publish = Path(first["stages"][-1]["output"])
    shutil.move(publish, publish.parent / ".gone")
    try:
        assert stages.cached_run(cfg, str(workdir)) is None
    finally:
        shutil.move(publish.parent / ".gone", publish)
    # Another config (train.max_steps) has nothing committed: not cached either.
    assert stages.cached_run(tiny_config(registry, "train.max_steps=7"), str(workdir)) is None


def test_an_edited_committed_file_is_no_cached_answer_and_the_run_names_it(tmp_path):
    cfg = tiny_config(tmp_path / "registry")
    workdir = str(tmp_path / "w")
    results = stages.run_stages(cfg, workdir, until="sample", log=lambda line: None)
    assert [r.status for r in results] == ["ran", "ran"]
    assert [r.name for r in stages.cached_run(cfg, workdir, until="sample")] == ["ingest", "sample"]

    edited = Path(results[1].output) / "train.parquet"
    size = edited.stat().st_size
    with open(edited, "ab") as f:
        f.write(b"\0")
    assert stages.cached_run(cfg, workdir, until="sample") is None
    assert stages.cached_run(cfg, workdir) is None

    with pytest.raises(stages.StageFailed) as failed:
        stages.run_stages(cfg, workdir, until="sample", log=lambda line: None)
    message = str(failed.value)
    assert message.startswith("sample stage failed: ")
    assert str(edited) in message
    assert f"{size + 1:,} bytes, the manifest says {size:,}" in message
    assert [r.status for r in failed.value.results] == ["cached", "failed"]


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "overrides, workdir, expected",
    [
        ([], "runs", set()),
        (["data.source=s3://b/x.csv"], "runs", {"ingest"}),
        (["data.source=hf:name"], "runs", {"ingest"}),
        (["registry.url=s3://b/registry"], "runs", {"publish"}),
        ([], "s3://b/runs", set(stages.ORDER) - {"train"}),
        (["data.source=s3://b/x.csv", "registry.url=s3://b/registry"], "s3://b/runs", set(stages.ORDER) - {"train"}),
    ],
)
def test_retryable_only_at_remote_edges_and_never_train(overrides, workdir, expected):
    cfg = build_config({}, overrides)
    assert {name for name in stages.ORDER if stages.retryable(name, cfg, workdir)} == expected


# ---------------------------------------------------------------- the prefect: section


def test_timeout_of_an_unknown_stage_names_the_key_and_lists_the_stages():
    with pytest.raises(ConfigError) as error:
        build_config({}, ['prefect.timeout_s={"trian": 10}'])
    message = str(error.value)
    assert "prefect.timeout_s" in message
    assert "'trian'" in message
    assert str(list(stages.ORDER)) in message


@pytest.mark.parametrize("seconds", [0, -5])
def test_timeout_must_be_positive(seconds):
    with pytest.raises(ConfigError) as error:
        build_config({}, [f'prefect.timeout_s={{"train": {seconds}}}'])
    assert "prefect.timeout_s" in str(error.value)
    assert "positive" in str(error.value)


def test_a_timeout_per_known_stage_is_kept():
    cfg = build_config({}, ['prefect.timeout_s={"train": 10, "ingest": 3600}', "prefect.retries=5"])
    assert cfg.prefect.timeout_s == {"train": 10.0, "ingest": 3600.0}
    assert cfg.prefect.retries == 5


def test_launch_settings_are_in_no_fingerprint(tmp_path):
    base = tiny_config(tmp_path / "r")
    launch = tiny_config(tmp_path / "r", "train.max_concurrent=3", "prefect.retries=5", 'prefect.timeout_s={"train": 10}')
    assert (launch.train.max_concurrent, launch.prefect.retries, launch.prefect.timeout_s) == (3, 5, {"train": 10.0})
    planned = stages.plan(base)
    assert stages.plan(launch) == planned
    assert len(set(planned.values())) == len(RUN)
    for name in RUN:
        parents = {p: planned[p] for p in stages.parents_of(name, base)}
        assert stages.compute_fingerprint(name, launch, parents) == stages.compute_fingerprint(name, base, parents) == planned[name]
    # ... while a setting that changes the model does change train's key and everything after it.
    changed = stages.plan(tiny_config(tmp_path / "r", "train.lr=1e-2"))
    assert [n for n in RUN if changed[n] != planned[n]] == ["train", "evaluate", "publish"]


def test_the_prefect_sections_stage_names_are_the_stage_table():
    assert orchestration.STAGE_NAMES == tuple(stages.ORDER)


# ---------------------------------------------------------------- the run's name and report


def test_run_name_changes_with_what_the_run_makes_only(tmp_path):
    base = tiny_config(tmp_path / "r")
    name = run_report.run_name(base)
    assert re.fullmatch(r"tiny-[0-9a-f]{8}", name), name
    launch = tiny_config(tmp_path / "r", "train.max_concurrent=4", "train.save_every_steps=7", "prefect.retries=0")
    assert run_report.run_name(launch) == name
    assert run_report.run_name(tiny_config(tmp_path / "r", "train.lr=0.01")) != name
    assert run_report.run_name(tiny_config(tmp_path / "r", "registry.model_name=other")).startswith("other-")


def results_of(statuses: dict[str, str], publish_stats: dict | None = None) -> list[StageResult]:
    results = []
    for i, (name, status) in enumerate(statuses.items()):
        stats = {"error": "CUDA out of memory"} if status == "failed" else {}
        if name == "publish" and publish_stats is not None:
            stats = publish_stats
        results.append(StageResult(name, status, f"{i:02d}" + "ab" * 31, 1.5, f"/w/{name}/{i}", stats))
    return results


def table_rows(report: str) -> list[list[str]]:
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]  # less the header


def test_markdown_report_of_an_all_cached_run_says_nothing_was_published(tmp_path):
    cfg = tiny_config(tmp_path / "r")
    url = "/reg/tiny/0123abcd"
    results = results_of({n: "cached" for n in stages.ORDER}, {"version": "0123abcd", "url": url})
    report = run_report.markdown_report(cfg, results, "/w")
    assert report.splitlines()[0] == f"# {run_report.run_name(cfg)}"
    assert "nothing new was trained or published" in report
    assert f"`{url}`" in report
    assert "**Published:**" not in report and "**Failed**" not in report
    assert [row[:2] for row in table_rows(report)] == [[n, "cached"] for n in stages.ORDER]
    assert report.splitlines()[-1] == "workdir: `/w`"


def test_markdown_report_of_a_failed_run_names_the_stage_and_error(tmp_path):
    cfg = tiny_config(tmp_path / "r")
    results = results_of({"ingest": "cached", "sample": "cached", "preprocess": "ran", "tokenize": "ran", "train": "failed"})
    report = run_report.markdown_report(cfg, results, "/w")
    assert "**Failed** at stage `train`: CUDA out of memory" in report
    assert "nothing new" not in report and "**Published:**" not in report
    assert [row[:2] for row in table_rows(report)] == [[r.name, r.status] for r in results]


def test_markdown_report_of_a_run_that_published_shows_the_version(tmp_path):
    cfg = tiny_config(tmp_path / "r")
    url = "/reg/tiny/feedbeef"
    statuses = {n: "cached" for n in stages.ORDER[:4]} | {n: "ran" for n in stages.ORDER[4:]}
    results = results_of(statuses, {"version": "feedbeef", "url": url, "newly_published": True})
    report = run_report.markdown_report(cfg, results, "/w")
    assert f"**Published:** `{url}` (version `feedbeef`)" in report
    assert "nothing new" not in report
    rows = table_rows(report)
    assert len(rows) == len(stages.ORDER)
    assert rows[-1][:4] == ["publish", "ran", "1.5", results[-1].fingerprint[:12]]
    assert rows[-1][4] == "version=feedbeef"


# ---------------------------------------------------------------- deploy without a server


def deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command("deploy", *args), cwd=REPO, env=no_server_env(), capture_output=True, text=True, timeout=180)


def test_deploy_print_makes_prefect_yaml_of_the_resolved_config(monkeypatch):
    monkeypatch.chdir(REPO)  # the quickstart's data.source is relative to the repository
    proc = deploy(str(QUICKSTART), "--name", "nightly", "--interval", "30", "--set", "train.max_steps=20", "--print")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = yaml.safe_load(proc.stdout)
    assert document["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert len(document["deployments"]) == 1
    deployment = document["deployments"][0]
    assert deployment["name"] == "nightly"
    assert deployment["entrypoint"] == "flows.finetune.finetune"
    assert deployment["schedules"] == [{"interval": 30.0}]
    assert deployment["work_pool"] == {"name": "tunepipe"}
    parameters = deployment["parameters"]
    assert (parameters["workdir"], parameters["overrides"]) == ("runs", [])

    deployed = build_config(parameters["config"])
    expected = load_config(QUICKSTART, ["train.max_steps=20"])
    assert deployed.train.max_steps == 20
    assert deployed.model_dump() == expected.model_dump()
    assert stages.plan(deployed) == stages.plan(expected)
    assert stages.plan(deployed)["train"] != stages.plan(load_config(QUICKSTART))["train"]


def test_deploy_print_with_a_cron_and_another_pool():
    proc = deploy(str(QUICKSTART), "--name", "nightly", "--cron", "0 3 * * *", "--pool", "gpus", "--print")
    assert proc.returncode == 0, proc.stderr[-3000:]
    deployment = yaml.safe_load(proc.stdout)["deployments"][0]
    assert deployment["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC"}]
    assert deployment["work_pool"] == {"name": "gpus"}


def test_deploy_refuses_a_bad_cron_in_one_line():
    proc = deploy(str(QUICKSTART), "--name", "nightly", "--cron", "0 3 * *", "--print")
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'0 3 * *'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_deploy_refuses_cron_and_interval_together():
    proc = deploy(str(QUICKSTART), "--name", "nightly", "--cron", "0 3 * * *", "--interval", "30", "--print")
    assert proc.returncode == 2
    assert "not allowed with argument" in proc.stderr
    assert proc.stdout == ""


def test_deploy_without_print_needs_a_prefect_server():
    proc = deploy(str(QUICKSTART), "--name", "nightly", "--interval", "30")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Prefect server" in lines[0] and "PREFECT_API_URL" in lines[0]
    assert proc.stdout == ""


def test_deploy_with_a_misspelled_key_names_it():
    proc = deploy(str(QUICKSTART), "--name", "nightly", "--set", "train.max_stesp=20", "--print")
    assert proc.returncode == 2
    assert "train.max_stesp" in proc.stderr
    assert "train.max_steps" in proc.stderr  # the suggestion
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------- help


def test_help_lists_deploy_and_worker(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    commands = re.search(r"\{([a-z0-9,]+)\}", text).group(1).split(",")
    assert {"deploy", "worker"} <= set(commands)
    assert re.search(r"^\s+deploy\s+create or update a scheduled Prefect deployment", text, re.M)
    assert re.search(r"^\s+worker\s+start a Prefect process worker", text, re.M)


def test_deploy_help_names_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["deploy", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--cron", "--interval", "--pool", "--print", "--name", "--timezone"):
        assert option in text, option
