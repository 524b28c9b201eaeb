"""A real Prefect server for tests: `prefect server start` on a free loopback port, its own
PREFECT_HOME (and so its own SQLite database) in a folder the caller owns, with the scheduler
and late-runs services polling every second so scheduled deployments turn into runs quickly.

    server = start_prefect_server(tmp / "prefect-server")
    subprocess.run(["prefect", "work-pool", "ls"], env=server.env(), check=True)
    runs = flow_runs(server, deployment_name="nightly")
    server.stop()

Unlike `prefect_test_harness`, whose temporary server is ephemeral (PREFECT__SERVER_EPHEMERAL=1)
and so runs only the services marked for ephemeral servers, this is the server a user runs:
the scheduler and late-runs services are on. Clients reach it through PREFECT_API_URL in
`PrefectServer.env()`, exactly as a user's shell would point them at it.

The server runs in a session of its own (a Ctrl-C in the terminal reaches only pytest, which
then stops it) and dies with this process if it dies first (PR_SET_PDEATHSIG). It is stopped
by pid, never by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from slurm_cluster import die_with_parent

STARTUP_SECONDS = 180  # the first start runs every database migration: ~20 s on 2 cores
STOP_GRACE_SECONDS = 20
_PORT_ATTEMPTS = 3
_API_LIMIT = 200  # the server's default PREFECT_API_DEFAULT_LIMIT, the most one filter call may ask

# Names from prefect/settings/models/server/{services,ui}.py (Prefect 3.9).
SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",  # nothing here browses it; skips building the UI at start
    # Defaults are 60 s and 5 s: a deployment would wait up to a minute for its first runs.
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    # Defaults are a 5 s loop and 15 s of lateness: a late-run test would wait 20 s for "Late".
    "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "5",
}


def _without_prefect_settings() -> dict[str, str]:
    """os.environ less every PREFECT_ variable: a developer's PREFECT_API_URL, PREFECT_API_KEY or
    profile, or a harness's PREFECT__SERVER_EPHEMERAL (which would switch the scheduler off),
    must not reach a server or client that is meant to talk only to this test server."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}


@dataclass
class PrefectServer:
    url: str  # the API URL, http://127.0.0.1:PORT/api
    home: Path  # the server's PREFECT_HOME; its SQLite database is home/prefect.db
    pid: int  # also the process group id: the server runs in a session of its own
    log: Path  # the server's stdout and stderr
    client_home: Path  # PREFECT_HOME for clients (profiles, local result storage)
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that talks to this server (prefect CLI, a flow, a worker)."""
        env = _without_prefect_settings()
        env.update(
            PREFECT_API_URL=self.url,
            PREFECT_HOME=str(self.client_home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        env.update(extra or {})
        return env

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after STOP_GRACE_SECONDS."""
        if self._process is not None and self._process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            if self._process is None:
                return
            try:
                self._process.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_command() -> list[str]:
    """The prefect CLI of this interpreter's environment, whatever is on PATH."""
    binary = Path(sys.executable).parent / "prefect"
    return [str(binary)] if binary.exists() else [sys.executable, "-m", "prefect"]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  ({exc.strerror})"
    return "\n".join("  " + line for line in text[-lines:]) or "  (empty)"


def _answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _launch(root: Path, home: Path, port: int) -> tuple[subprocess.Popen, Path]:
    log = root / "server.log"
    env = _without_prefect_settings()
    env.update(SERVER_SETTINGS, PREFECT_HOME=str(home))
    command = [*prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # Output goes to a file, not a pipe: the server logs every request, and a pipe nobody drains
    # fills up and blocks it mid-test. cwd=root: Prefect reads .env, prefect.toml and
    # pyproject.toml's [tool.prefect] from the working directory, and the repo's must not count.
    with log.open("wb") as stream:
        process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=stream,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
    return process, log


def start_prefect_server(root: Path) -> PrefectServer:
    """Start `prefect server start` with every file under root; return once /api/health answers."""
    root = Path(root)
    home, client_home = root / "home", root / "client-home"
    home.mkdir(parents=True, exist_ok=True)
    client_home.mkdir(parents=True, exist_ok=True)
    for _ in range(_PORT_ATTEMPTS):
        # The port is free when chosen but not held: another process may bind it before the
        # server does, which the server reports as "already in use" and exits; then try another.
        port = _free_loopback_port()
        process, log = _launch(root, home, port)
        server = PrefectServer(url=f"http://127.0.0.1:{port}/api", home=home, pid=process.pid, log=log,
                               client_home=client_home, _process=process)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _answers_health(server.url):
                return server
            time.sleep(0.25)
        else:
            server.stop()
            raise RuntimeError(f"prefect server did not answer {server.url}/health within "
                               f"{STARTUP_SECONDS}s:\n{_tail(log)}")
        if "already in use" not in log.read_text(errors="replace"):
            raise RuntimeError(f"prefect server exited with {process.returncode}:\n{_tail(log)}")
    raise RuntimeError(f"prefect server found no free port in {_PORT_ATTEMPTS} tries:\n{_tail(log)}")


def _post(server: PrefectServer, route: str, body: dict) -> list[dict]:
    request = urllib.request.Request(server.url + route, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def flow_runs(server: PrefectServer, deployment_name: str | None = None) -> list[dict]:
    """Flow runs as the REST API returns them (name, state_type, state_name, parameters,
    deployment_id, expected_start_time, start_time, end_time, auto_scheduled, id, ...), in order of
    expected start; only those of deployments called deployment_name when given. At most 200."""
    body: dict = {"sort": "EXPECTED_START_TIME_ASC", "limit": _API_LIMIT}
    if deployment_name is not None:
        body["deployments"] = {"name": {"any_": [deployment_name]}}
    return _post(server, "/flow_runs/filter", body)


def task_runs(server: PrefectServer, flow_run_id: str) -> list[dict]:
    """Task runs of one flow run (name, state_type, state_name, run_count, start_time, end_time,
    id, ...), in order of expected start. At most 200."""
    body = {"sort": "EXPECTED_START_TIME_ASC", "limit": _API_LIMIT,
            "task_runs": {"flow_run_id": {"any_": [str(flow_run_id)]}}}
    return _post(server, "/task_runs/filter", body)
