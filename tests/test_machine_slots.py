"""Train slots on one machine (pipeline/machine_slots.py): never more holders than slots, even
when many processes ask at once; a waiter is told who holds them; kill -9 of a holder frees its
slot at once. Real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from tiny import REPO

HOLD = """
import json, sys, time
from pathlib import Path
from pipeline.machine_slots import take_slot
folder, count, name, hold_s, log = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
said = lambda line: print(line, flush=True)
with take_slot(folder, count, name, log=said, poll_s=0.05):
    with open(log, "a") as f:
        f.write(json.dumps([name, "in", time.monotonic()]) + "\\n")
    print("holding", flush=True)
    time.sleep(hold_s)
    with open(log, "a") as f:
        f.write(json.dumps([name, "out", time.monotonic()]) + "\\n")
"""


def holder(tmp_path, count: int, name: str, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "slots"), str(count), name, str(hold_s), str(tmp_path / "log")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)


def most_at_once(tmp_path) -> int:
    events = sorted((json.loads(line) for line in (tmp_path / "log").read_text().splitlines()), key=lambda e: e[2])
    inside, most = 0, 0
    for _, what, _ in events:
        inside += 1 if what == "in" else -1
        most = max(most, inside)
    return most


@pytest.mark.parametrize("count", [1, 2])
def test_never_more_holders_than_slots_when_six_ask_at_once(tmp_path, count):
    procs = [holder(tmp_path, count, f"run-{i}", 0.3) for i in range(6)]
    for proc in procs:
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    assert most_at_once(tmp_path) == count
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == ["admission.lock", *(f"slot-{i}.lock" for i in range(count))]


def test_a_waiter_names_the_holder_and_takes_the_slot_when_it_is_killed(tmp_path):
    first = holder(tmp_path, 1, "run-a", 120)
    assert first.stdout.readline() == "holding\n"
    second = holder(tmp_path, 1, "run-b", 0)
    try:
        queued = second.stdout.readline()
        assert queued.startswith(f"train slot: 1 of 1 taken, by run-a (pid {first.pid} on ")
        assert queued.rstrip().endswith("; queued until one frees")
        time.sleep(0.5)
        assert second.poll() is None  # still queued while run-a lives
        first.kill()  # no exit handler runs: the kernel drops the lock
        first.wait()
        out, _ = second.communicate(timeout=10)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert second.returncode == 0
    assert out.splitlines()[0].startswith("train slot: taken after ") and out.splitlines()[1] == "holding"


def test_a_run_asking_for_one_slot_waits_while_one_is_held_under_a_limit_of_two(tmp_path):
    """Limits of different size meet in one folder: each waits until fewer than its own are taken."""
    wide = holder(tmp_path, 2, "wide", 120)
    assert wide.stdout.readline() == "holding\n"
    narrow = holder(tmp_path, 1, "narrow", 0)
    try:
        assert narrow.stdout.readline().startswith("train slot: 1 of 1 taken, by wide (pid ")
        other_wide = holder(tmp_path, 2, "wide-2", 0)
        other_wide.communicate(timeout=10)  # a second slot of two is free for it
        assert other_wide.returncode == 0
        assert narrow.poll() is None
    finally:
        wide.kill()
        wide.wait()
    narrow.communicate(timeout=10)
    assert narrow.returncode == 0
