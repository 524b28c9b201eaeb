"""The shipped prefect.yaml is one `prefect deploy` accepts, and it deploys the quickstart."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
import yaml
from prefect_server import prefect_command
from tiny import QUICKSTART, REPO

from pipeline.config import build_config, load_config
from pipeline.stages import plan

pytestmark = pytest.mark.integration


def _post(server, path: str, body: dict):
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_prefect_deploy_accepts_the_shipped_prefect_yaml(prefect_server):
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [entry] = shipped["deployments"]
    env = prefect_server.env()
    subprocess.run([*prefect_command(), "work-pool", "create", entry["work_pool"]["name"], "--type", "process"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    done = subprocess.run([*prefect_command(), "--no-prompt", "deploy", "--name", entry["name"]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr

    [deployment] = _post(prefect_server, "/deployments/filter", {"deployments": {"name": {"any_": [entry["name"]]}}})
    assert deployment["entrypoint"] == "flows.finetune.finetune"
    assert deployment["work_pool_name"] == "tunepipe"
    # No pull section in the file: Prefect records the folder it deployed from, where the
    # parameters' relative paths (data.source, workdir, registry) resolve at run time.
    assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    # The parameters are the quickstart: the same config, so the same cache keys as `tunepipe run`.
    parameters = deployment["parameters"]
    deployed = build_config(parameters["config"], parameters["overrides"])
    assert deployed.model_dump() == load_config(QUICKSTART).model_dump()
    assert plan(deployed) == plan(load_config(QUICKSTART))
    assert parameters["workdir"] == "runs"
