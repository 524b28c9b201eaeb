"""The Prefect flow end to end, in this process, on the session's real Prefect server
(conftest.py's `prefect_server`): the flow is called as a function, as a script would call it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny import QUICKSTART, REPO, published_weights, tiny_overrides

from pipeline import artifacts
from pipeline.config import load_config

# Slow: whole pipelines run under Prefect.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def prefect_harness(prefect_server, monkeypatch):
    """Prefect's client in this process pointed at the shared server, for one test."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    # Its own result storage: the test checks that nothing lands there, and other processes of the
    # suite (xdist's other worker) may write to the default one meanwhile.
    storage = prefect_server.client_home / f"storage-{os.getpid()}"
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url, PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                     PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield
        # Send the test's log lines and events now: at exit, the server they were meant for is gone.
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


def statuses(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def test_flow_runs_caches_and_republishes_a_deleted_version(prefect_harness, tmp_path, monkeypatch):
    from flows.finetune import finetune

    monkeypatch.chdir(REPO)
    registry = tmp_path / "registry"
    cfg = load_config(QUICKSTART, tiny_overrides(registry, **{"train.max_steps": 8}))
    workdir = str(tmp_path / "runs")

    from prefect.settings import get_current_settings

    storage = Path(get_current_settings().results.local_storage_path).expanduser()
    stored_before = sorted(storage.rglob("*")) if storage.exists() else []

    first = finetune(cfg.model_dump(mode="json"), workdir=workdir)
    assert statuses(first) == {name: "ran" for name in statuses(first)}
    assert list(statuses(first)) == ["ingest", "sample", "preprocess", "tokenize", "train", "evaluate", "publish"]
    version_url = first[-1].stats["url"]
    assert artifacts.verify(version_url) == []
    weights = published_weights(registry).read_bytes()

    second = finetune(cfg.model_dump(mode="json"), workdir=workdir)
    assert set(statuses(second).values()) == {"cached"}
    assert [r.fingerprint for r in second] == [r.fingerprint for r in first]
    assert [r.output for r in second] == [r.output for r in first]
    # Nothing was persisted for Prefect to unpickle on the next run: the manifests are the cache.
    assert (sorted(storage.rglob("*")) if storage.exists() else []) == stored_before

    # A cache hit is honoured only while the committed output exists.
    shutil.rmtree(version_url)
    third = finetune(cfg.model_dump(mode="json"), workdir=workdir)
    assert statuses(third)["publish"] == "ran" and statuses(third)["train"] == "cached"
    assert published_weights(registry).read_bytes() == weights

    # Changing a training setting reuses every data stage and retrains.
    changed = finetune(cfg.model_dump(mode="json"), workdir=workdir, overrides=["train.lr=5e-4"])
    status = statuses(changed)
    assert [status[s] for s in ("ingest", "sample", "preprocess", "tokenize")] == ["cached"] * 4
    assert status["train"] == "ran" and status["publish"] == "ran"


def test_cli_run_writes_summary_json_as_last_line(prefect_harness, tmp_path, monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.chdir(REPO)
    registry = tmp_path / "registry"
    args = ["run", str(QUICKSTART), "--workdir", str(tmp_path / "runs")]
    for override in tiny_overrides(registry, **{"train.max_steps": 4}):
        args += ["--set", override]
    assert cli.main(args) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(Path(last_line).read_text())
    assert [s["name"] for s in summary["stages"]][-1] == "publish"
    assert {s["status"] for s in summary["stages"]} == {"ran"}
    assert set(summary["stages"][0]) == {"name", "status", "fingerprint", "seconds", "output", "stats"}
    assert summary["registry_version"] and artifacts.verify(summary["registry_version"]) == []
    ingest = summary["stages"][0]["stats"]
    assert ingest["rows_in"] == ingest["rows_out"] + ingest["rows_rejected"] == 3000


def test_run_time_parameters_meet_the_cli_validation(prefect_harness, tmp_path):
    """A deployment's run may pass other parameters; a bad key fails the run naming it, before any stage."""
    from flows.finetune import finetune

    from pipeline.config import ConfigError

    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "registry"))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_stpes' \(did you mean 'train.max_steps'\?\)"):
        finetune(cfg.model_dump(mode="json"), workdir=str(tmp_path / "runs"), overrides=["train.max_stpes=3"])
    bad_config = {**cfg.model_dump(mode="json"), "trian": {"lr": 1.0}}
    with pytest.raises(ConfigError, match="trian"):
        finetune(bad_config, workdir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
