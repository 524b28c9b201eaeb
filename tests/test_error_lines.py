"""A user-facing failure is one `tunepipe: ...` line on stderr naming the stage and the reason;
the summary.json path is still the last line of stdout; `--debug` shows the traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tiny import QUICKSTART, REPO, cli_args, cli_command


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=REPO, capture_output=True, text=True, timeout=600)


def test_an_empty_input_is_one_line_and_a_summary(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    done = run("stage", "ingest", str(QUICKSTART), "--workdir", str(tmp_path / "runs"), "--set", f"data.source={empty}")

    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"tunepipe: ingest stage failed: every input is empty (no rows): ['{empty}']"]
    summary = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("ingest", "failed")]
    assert summary["stages"][0]["stats"]["error"].startswith("every input is empty")


def test_debug_shows_the_traceback(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    done = run("--debug", "stage", "ingest", str(QUICKSTART), "--workdir", str(tmp_path / "runs"), "--set", f"data.source={empty}")
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "every input is empty" in done.stderr.strip().splitlines()[-1]


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_gate_under_prefect_is_the_last_line_and_no_traceback(tmp_path):
    done = run(*cli_args("run", tmp_path / "runs", tmp_path / "registry", **{"train.max_steps": 3, "evaluate.max_perplexity": 1.5}))

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tunepipe: publish stage failed: evaluation gate (causal_lm): perplexity ")
    assert last.endswith("is not <= evaluate.max_perplexity 1.5; not publishing")
    summary = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())
    assert [s["status"] for s in summary["stages"]] == ["ran"] * 6 + ["failed"]
    assert not (tmp_path / "registry").exists()
