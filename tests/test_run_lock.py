"""One process at a time per train fingerprint: `run_lock.held` between processes, a lock that
dies with a SIGKILLed holder, and two `tunepipe stage train` runs of one config at once.

    python -m pytest -q tests/test_run_lock.py                      # the unit tests
    python -m pytest -q -m integration tests/test_run_lock.py       # two real training runs at once
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import REPO, cli_args, cli_command, read_jsonl, stage_status, summary_of

from pipeline import artifacts, run_lock

HOLDER = """
import sys, time
from pathlib import Path
from pipeline import run_lock

with run_lock.held(Path(sys.argv[1]), "child", print):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    print("releasing", time.time(), flush=True)
"""


def start_holder(lock: Path, seconds: float) -> subprocess.Popen:
    """A process that holds `lock` for `seconds`; returns once it holds it."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = child.stdout.readline()
    assert first == "held\n", first + child.stderr.read()
    return child


def test_a_second_process_waits_for_the_holder_and_says_whom_it_waits_for(tmp_path):
    lock = tmp_path / "deep" / "run.lock"
    child = start_holder(lock, 2.0)
    try:
        assert lock.read_text() == f"pid {child.pid} on {os.uname().nodename}\n"
        lines: list[str] = []
        with run_lock.held(lock, "[train] abc", lines.append):
            acquired = time.time()
            assert lock.read_text().startswith(f"pid {os.getpid()} on ")
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err
    released = float(out.split()[-1])
    assert out.split()[0] == "releasing"
    assert acquired > released, "the lock was taken while its holder still held it"
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"[train] abc: waiting for pid {child.pid} on ")
    assert lines[0].endswith("which runs it now; its output will be reused")
    assert re.fullmatch(r"\[train\] abc: lock acquired after \d+s", lines[1]), lines[1]


def test_a_free_lock_is_taken_without_a_word(tmp_path):
    lines: list[str] = []
    lock = tmp_path / "run.lock"
    for _ in range(2):  # twice in a row: leaving the block releases it
        with run_lock.held(lock, "x", lines.append):
            assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    assert lines == []


def test_a_holder_killed_with_sigkill_releases_the_lock(tmp_path):
    lock = tmp_path / "run.lock"
    child = start_holder(lock, 600)
    assert lock.read_text().startswith(f"pid {child.pid} on ")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    lines: list[str] = []
    with run_lock.held(lock, "x", lines.append):
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    assert lines == [], "a dead holder's lock made the next run wait"


@pytest.mark.integration
def test_two_runs_of_one_config_train_once(tmp_path):
    workdir, registry = tmp_path / "w", tmp_path / "r"
    command = cli_command(*cli_args("stage", workdir, registry, "train", **{"train.max_steps": 30}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = []
    for proc in runs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for proc in done:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summaries = [summary_of(proc) for proc in done]
    train_status = [stage_status(s)["train"] for s in summaries]
    assert sorted(train_status) == ["cached", "ran"], train_status
    ran, waited = (0, 1) if train_status[0] == "ran" else (1, 0)
    waiting = [("waiting for" in p.stdout + p.stderr) for p in done]
    assert waiting[waited] and not waiting[ran], waiting
    assert f"waiting for pid {runs[ran].pid} on " in done[waited].stdout

    # One train output, committed by the run that trained, and the waiter reports that same one.
    fp = summaries[ran]["stages"][-1]["fingerprint"]
    assert [s["stages"][-1]["fingerprint"] for s in summaries] == [fp, fp]
    assert sorted(p.name for p in (workdir / "train").iterdir()) == [fp]
    output = workdir / "train" / fp
    assert summaries[waited]["stages"][-1]["output"] == str(output) == summaries[ran]["stages"][-1]["output"]
    assert artifacts.verify(str(output)) == []
    # Every step trained once, by one run: a second trainer in the same checkpoint folder would
    # have resumed from the first one's checkpoints or logged steps twice.
    assert [row["step"] for row in read_jsonl(output / "train_log.jsonl")] == list(range(1, 31))
    assert summaries[ran]["stages"][-1]["stats"]["steps"] == 30
    assert not summaries[ran]["stages"][-1]["stats"].get("resumed_from_step")
    checkpoints = workdir / "scratch" / "train" / fp / "checkpoints"
    steps = sorted(p.name for p in checkpoints.glob("step_*"))
    assert steps and steps[-1] == "step_00000030", steps
    # The waiter took the lock last (after the trainer let go), and wrote its pid.
    assert (workdir / "scratch" / "train" / fp / "run.lock").read_text().startswith(f"pid {runs[waited].pid} on ")
