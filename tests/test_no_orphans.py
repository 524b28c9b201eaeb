"""After kill -9 of a whole run nothing of it lives on, and two trainers never write into one
checkpoint folder. Real processes, counted with psutil."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny import REPO, cli_args, cli_command, make_blocks, trainer_args, wait_for

pytestmark = pytest.mark.integration

LONG_RUN = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.max_steps=100000", "train.micro_batch_size=4",
            "train.save_every_steps=5", "train.tensorboard=false")


def alive_with(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `text` (a path unique to the test)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(text in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    tokenized = make_blocks(tmp_path / "tok")
    first = subprocess.Popen([sys.executable, "-m", "pipeline.train", *trainer_args(tokenized, tmp_path / "a", *LONG_RUN)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list((tmp_path / "a" / "ckpt").glob("step_*/COMPLETE")), 120, "the first trainer's first checkpoint")
        args = trainer_args(tokenized, tmp_path / "b", *LONG_RUN)
        args[args.index("--checkpoints") + 1] = str(tmp_path / "a" / "ckpt")  # the same folder
        second = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"{tmp_path / 'a' / 'ckpt'} is in use by another trainer (pid {first.pid} on " in second.stderr
        assert not (tmp_path / "b" / "out").exists()
        assert first.poll() is None  # the holder trains on, untouched
    finally:
        first.kill()
        first.wait()


def test_kill_9_of_the_whole_run_leaves_no_process_of_it(tmp_path):
    """torchrun puts its workers in sessions of their own: a process-group kill reaches only the
    CLI and torchrun. Each worker dies with its launcher, within 5 s, even with output to a pipe."""
    workdir = tmp_path / "runs"
    cmd = cli_command(*cli_args("stage", workdir, tmp_path / "registry", "train", **{"train.max_steps": 100000, "train.nproc_per_node": 2, "train.log_every_steps": 100000}))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: list(workdir.glob("scratch/train/*/checkpoints/step_*/COMPLETE")), 300, "a first checkpoint")
        assert len(alive_with(str(workdir))) >= 4  # CLI, torchrun, two workers
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while alive_with(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.info["cmdline"][:4] for p in alive_with(str(workdir))] == []
    [folder] = workdir.glob("scratch/train/*/checkpoints")
    saved = sorted(folder.glob("step_*"))
    time.sleep(2)
    assert sorted(folder.glob("step_*")) == saved  # nobody writes there any more


HOLDER = """
import subprocess, sys, time
from pipeline.process_reaper import end_with_this_process
target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
end_with_this_process(target.pid)
print(target.pid, flush=True)
time.sleep(120)
"""


def test_a_helper_ends_with_its_owner_even_under_kill_9():
    """The watcher's pipe closes when its owner dies by any means; a helper in a session of its
    own (out of reach of a group kill) still goes, and not before."""
    owner = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    helper = psutil.Process(int(owner.stdout.readline()))
    try:
        time.sleep(1.0)
        assert helper.is_running() and helper.status() != psutil.STATUS_ZOMBIE  # its owner lives: left alone
        owner.kill()
        owner.wait()
        helper.wait(timeout=10)  # raises psutil.TimeoutExpired if it lives on
    finally:
        if helper.is_running():
            helper.kill()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_signal_to_the_cli_alone_leaves_no_process_of_the_run(tmp_path, stop):
    """`kill PID` (or kill -9) of `tunepipe run` alone, not its process group: Prefect's temporary
    server, started by the CLI, and the training job go with it. SIGTERM first has the job write a
    checkpoint and the CLI say so in one line. A second run, queued for the train slot meanwhile
    (naming the holder), takes it at once after either."""
    workdir, env = tmp_path / "runs", {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    cmd = cli_command(*cli_args("run", workdir, tmp_path / "registry", **{"train.max_steps": 100000, "train.log_every_steps": 100000}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    second_log = tmp_path / "second.log"
    second = None
    try:
        wait_for(lambda: list(workdir.glob("scratch/train/*/checkpoints/step_*/COMPLETE")), 300, "a first checkpoint")
        run = psutil.Process(proc.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in run)  # the temporary server is the CLI's child
        second = subprocess.Popen(cli_command(*cli_args("run", tmp_path / "runs2", tmp_path / "registry2", **{"train.max_steps": 10})),
                                  cwd=REPO, env=env, stdout=second_log.open("w"), stderr=subprocess.STDOUT)
        queued = wait_for(lambda: [line for line in second_log.read_text().splitlines() if "queued until one frees" in line], 300,
                          "the second run to queue for the train slot")
        assert f"[train] train slot: 1 of 1 taken, by flow run 'tiny-" in queued[0] and f" into {workdir} (pid {proc.pid} on " in queued[0]
        os.kill(proc.pid, stop)
        out, err = proc.communicate(timeout=120)
        assert second.wait(timeout=300) == 0, second_log.read_text()[-2000:]  # the slot freed by either signal
    finally:
        for p in (proc, second):
            if p is not None and p.poll() is None:
                p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "[train] train slot: taken after " in second_log.read_text()
    deadline = time.monotonic() + 15
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [" ".join(p.cmdline()[:4]) for p in run if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    if stop == signal.SIGTERM:
        assert proc.returncode == 143
        assert "stop requested (SIGTERM): checkpoint at step" in out
        assert err.strip().splitlines()[-1].startswith("tunepipe: stopped by SIGTERM; a rerun reuses every committed stage")
