"""The `prefect_server` fixture (tests/prefect_server.py): a real `prefect server start` answers
the API and the prefect CLI, and its scheduler turns an interval deployment into runs with no
worker anywhere.

    python -m pytest -q tests/test_prefect_server.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime

import pytest
from prefect_server import flow_runs, prefect_command

pytestmark = pytest.mark.integration

SCHEDULE_SECONDS = 30  # the scheduler polls every second here; its default is 60 s

TINY_FLOW = '''from prefect import flow


@flow
def tiny():
    return 1
'''

# from_source on a plain folder gives LocalStorage (prefect/runner/storage.py), so nothing is
# built or pushed and no image is needed for a process pool.
DEPLOY = '''import sys
from prefect import flow

flow.from_source(source=sys.argv[1], entrypoint="tiny_flow.py:tiny").deploy(
    name="probe", work_pool_name=sys.argv[2], interval=2, build=False, push=False)
'''


def run(command: list[str], env: dict[str, str], cwd) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def work_pool_names(server) -> set[str]:
    request = urllib.request.Request(server.url + "/work_pools/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return {pool["name"] for pool in json.loads(response.read())}


def test_server_answers_health_and_the_cli(prefect_server, tmp_path):
    with urllib.request.urlopen(prefect_server.url + "/health", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) is True

    env = prefect_server.env({"COLUMNS": "200"})  # a narrow terminal would let Rich cut names
    run([*prefect_command(), "work-pool", "create", "probe-pool", "--type", "process"], env, tmp_path)
    assert "probe-pool" in run([*prefect_command(), "work-pool", "ls"], env, tmp_path)
    # Read back from this server, not through the CLI: a client that lost PREFECT_API_URL would
    # have started an ephemeral server of its own and been just as happy.
    assert "probe-pool" in work_pool_names(prefect_server)


def test_scheduler_turns_an_interval_deployment_into_runs(prefect_server, tmp_path):
    # prefect_test_harness cannot show this: its server is ephemeral (PREFECT__SERVER_EPHEMERAL=1),
    # and an ephemeral server starts only the perpetual services marked run_in_ephemeral, which the
    # scheduler's schedule_deployments is not (prefect/server/services/scheduler.py).
    env = prefect_server.env({"COLUMNS": "200"})
    run([*prefect_command(), "work-pool", "create", "scheduled-pool", "--type", "process"], env, tmp_path)
    (tmp_path / "tiny_flow.py").write_text(TINY_FLOW)
    run([sys.executable, "-c", DEPLOY, str(tmp_path), "scheduled-pool"], env, tmp_path)

    deadline = time.monotonic() + SCHEDULE_SECONDS
    scheduled = []
    while time.monotonic() < deadline and len(scheduled) < 2:
        time.sleep(0.5)
        scheduled = [r for r in flow_runs(prefect_server, "probe") if r["state_type"] == "SCHEDULED"]
    assert len(scheduled) >= 2, f"no runs scheduled within {SCHEDULE_SECONDS}s:\n{scheduled}"

    # Creating a deployment schedules nothing itself; auto_scheduled runs come only from the
    # scheduler service.
    assert all(r["auto_scheduled"] for r in scheduled)
    assert len({r["deployment_id"] for r in scheduled}) == 1
    starts = [datetime.fromisoformat(r["expected_start_time"]) for r in scheduled]
    assert {(later - earlier).total_seconds() for earlier, later in zip(starts, starts[1:])} == {2.0}
