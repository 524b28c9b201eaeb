"""Scheduled runs: a Prefect deployment of the tunepipe flow, its work pool and its train limit.

    export PREFECT_API_URL=http://127.0.0.1:4200/api                       # a `prefect server start`
    tunepipe deploy examples/quickstart.yaml --name nightly --cron "0 3 * * *"
    tunepipe worker                                                        # runs what the schedule makes

The deployment's parameters are the resolved config (every key, overrides applied) and the
workdir, so it no longer depends on the YAML file; its pull step sets the working directory to
the folder `tunepipe deploy` ran in, so relative paths (data.source, the workdir, the registry)
mean what they meant there and a scheduled run shares the cache of `tunepipe run` from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config import PipelineConfig

FLOW_NAME = "tunepipe-finetune"
ENTRYPOINT = "flows.finetune.finetune"
"""A module path, not a file path: it resolves wherever tunepipe is installed (a checkout or a wheel)."""
DEFAULT_POOL = "tunepipe"


class DeployError(RuntimeError):
    pass


@dataclass(frozen=True)
class Deployment:
    name: str
    pool: str
    parameters: dict[str, Any]
    directory: str
    cron: str | None = None
    interval_s: float | None = None
    timezone: str = "UTC"
    max_concurrent: int = 1

    def schedule_yaml(self) -> list[dict[str, Any]]:
        if self.cron:
            return [{"cron": self.cron, "timezone": self.timezone}]
        if self.interval_s:
            return [{"interval": self.interval_s}]
        return []


def plan_deployment(cfg: PipelineConfig, name: str, workdir: str, pool: str = DEFAULT_POOL, cron: str | None = None,
                    interval_s: float | None = None, timezone: str = "UTC") -> Deployment:
    if cron and interval_s:
        raise DeployError("give --cron or --interval, not both")
    if interval_s is not None and interval_s <= 0:
        raise DeployError(f"--interval must be positive seconds, got {interval_s}")
    if cron:
        _check_cron(cron, timezone)
    parameters = {"config": cfg.model_dump(mode="json"), "workdir": workdir, "overrides": []}
    return Deployment(name, pool, parameters, str(Path.cwd()), cron, interval_s, timezone, cfg.train.max_concurrent)


def _check_cron(cron: str, timezone: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule  # what Prefect's schema accepts, the server accepts

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        reason = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise DeployError(f"--cron {cron!r} --timezone {timezone}: {reason} (cron has five fields: minute hour day month weekday)") from None


def prefect_yaml(d: Deployment) -> str:
    """The `prefect.yaml` that `prefect deploy --name NAME` turns into the same deployment."""
    from importlib.metadata import version

    document = {
        "name": "tunepipe",
        "prefect-version": version("prefect"),
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": d.directory}}],
        "deployments": [{
            "name": d.name,
            "entrypoint": ENTRYPOINT,
            "work_pool": {"name": d.pool},
            "schedules": d.schedule_yaml(),
            "parameters": d.parameters,
        }],
    }
    header = (f"# Made by `tunepipe deploy --print`: `prefect deploy --name {d.name}` in this folder creates the same\n"
              f"# deployment. Its first run creates the pool's train limit tunepipe-train-{d.pool} ({d.max_concurrent} at once)\n"
              f"# if there is none; `tunepipe deploy` also resizes an existing one.\n")
    return header + dump_yaml(document)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    # Templates span lines: show them as the YAML a person writes (a `|` block), not as "\n" soup.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump_yaml(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def apply(d: Deployment) -> str:
    """Create or update the deployment (and its pool and train limit) on PREFECT_API_URL's server;
    returns the deployment's id."""
    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError("deploying needs a Prefect server that outlives this command: start one "
                          "(`prefect server start`) and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune, train_limit_name

    schedules = []
    if d.cron:
        schedules.append(DeploymentScheduleCreate(schedule=CronSchedule(cron=d.cron, timezone=d.timezone)))
    elif d.interval_s:
        schedules.append(DeploymentScheduleCreate(schedule=IntervalSchedule(interval=timedelta(seconds=d.interval_s))))
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(d.pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=d.pool, type="process"))
            print(f"created process work pool {d.pool!r}")
        client.upsert_global_concurrency_limit_by_name(train_limit_name(d.pool), d.max_concurrent)
        flow_id = client.create_flow_from_name(FLOW_NAME)
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=d.name,
            work_pool_name=d.pool,
            parameters=d.parameters,
            schedules=schedules,
            entrypoint=ENTRYPOINT,
            path=d.directory,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": d.directory}}],
            parameter_openapi_schema=parameter_schema(finetune).model_dump_for_openapi(),
            enforce_parameter_schema=True,
        )
    return str(deployment_id)


def start_worker(pool: str, extra: list[str]) -> int:
    """Prefect's own process worker on `pool`, in this process (it runs until stopped)."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise DeployError("a worker needs PREFECT_API_URL: the server the deployments live on")
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", *extra]
    print("tunepipe: " + " ".join(command[1:]), flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 130
