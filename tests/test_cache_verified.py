"""A cached output is reused only after a look: tampered, truncated, deleted or substituted files
never reach a downstream stage; the run stops naming the file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tiny import QUICKSTART, REPO, cli_args, cli_command, tiny_overrides

from pipeline import artifacts, stages
from pipeline.artifacts import MANIFEST, VERIFY_ENV, ArtifactError
from pipeline.config import load_config
from pipeline.stages import StageFailed


@pytest.fixture
def cached(tmp_path):
    """Ingest to preprocess, committed; the ingest shard every later stage reads."""
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "registry"))
    workdir = str(tmp_path / "runs")
    results = stages.run_stages(cfg, workdir, until="preprocess", log=lambda _: None)
    ingest = Path(results[0].output)
    [shard] = sorted((ingest / "shards").glob("*.parquet"))
    return cfg, workdir, shard


def rerun(cfg, workdir):
    return {r.name: r.status for r in stages.run_stages(cfg, workdir, until="preprocess", log=lambda _: None)}


def test_an_untouched_cache_is_reused_and_a_touch_alone_is_fine(cached):
    cfg, workdir, shard = cached
    assert set(rerun(cfg, workdir).values()) == {"cached"}
    os.utime(shard)  # a new mtime, the same bytes: hashed once, still valid
    assert set(rerun(cfg, workdir).values()) == {"cached"}


@pytest.mark.parametrize("tamper,says", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"bytes, the manifest says"),
    (lambda p: p.unlink(), r"missing, though the manifest lists it"),
    (lambda p: p.write_bytes(bytes(len(p.read_bytes()))), r"sha256 differs from the manifest's"),
], ids=["truncated", "deleted", "substituted"])
def test_a_tampered_cached_file_stops_the_run_naming_it(cached, tamper, says):
    cfg, workdir, shard = cached
    sample_before = sorted(p.stat().st_mtime_ns for p in Path(workdir, "sample").rglob("*.parquet"))
    tamper(shard)
    with pytest.raises(StageFailed, match=rf"ingest stage failed: {shard}: .*{says}.*delete that folder to rebuild it") as failed:
        rerun(cfg, workdir)
    assert isinstance(failed.value.error, ArtifactError) and failed.value.done == []
    assert sorted(p.stat().st_mtime_ns for p in Path(workdir, "sample").rglob("*.parquet")) == sample_before


def test_a_substitution_that_keeps_size_and_time_is_caught_with_verify(cached, monkeypatch):
    cfg, workdir, shard = cached
    entry = json.loads((shard.parents[1] / MANIFEST).read_text())["files"][f"shards/{shard.name}"]
    shard.write_bytes(bytes(entry["bytes"]))
    os.utime(shard, ns=(entry["mtime_ns"], entry["mtime_ns"]))
    assert set(rerun(cfg, workdir).values()) == {"cached"}  # the fast path cannot see it: documented
    monkeypatch.setenv(VERIFY_ENV, "1")
    with pytest.raises(StageFailed, match="ingest stage failed: .*sha256 differs"):
        rerun(cfg, workdir)


def test_the_command_line_says_it_in_one_line(tmp_path):
    registry, workdir = tmp_path / "registry", tmp_path / "runs"
    first = subprocess.run(cli_command(*cli_args("stage", workdir, registry, "sample")), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    [shard] = sorted((workdir / "ingest").glob("*/shards/*.parquet"))
    recorded = json.loads((shard.parents[1] / MANIFEST).read_text())["files"][f"shards/{shard.name}"]["bytes"]
    shard.write_bytes(b"not parquet")
    done = subprocess.run(cli_command(*cli_args("stage", workdir, registry, "sample")), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"tunepipe: ingest stage failed: {shard}: 11 bytes, the manifest says {recorded:,}; "
        f"the output at {shard.parents[1]} was changed after it was committed; delete that folder to rebuild it"]


@pytest.mark.integration
def test_two_runs_of_one_config_at_once_both_finish_and_leave_one_output_per_stage(tmp_path):
    """Before, the second run deleted the first one's unfinished output as 'uncommitted'."""
    workdir, registry = tmp_path / "runs", tmp_path / "registry"
    command = cli_command(*cli_args("stage", workdir, registry, "tokenize"))
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]

    summaries = [json.loads(Path(out.strip().splitlines()[-1]).read_text()) for out, _ in outs]
    assert [s["output"] for s in summaries[0]["stages"]] == [s["output"] for s in summaries[1]["stages"]]
    for stage in ("ingest", "sample", "preprocess", "tokenize"):
        assert [p.name for p in (workdir / stage).iterdir()] == [next(s["fingerprint"] for s in summaries[0]["stages"] if s["name"] == stage)]
        assert artifacts.verify(str(next((workdir / stage).iterdir()))) == []
