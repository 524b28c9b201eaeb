"""What a run with nothing to do costs against the first run: `make run` twice, and the same
against a running Prefect server (a scheduled run on unchanged data is exactly this).

    python bench/cached_run.py                       # the quickstart as `make run` runs it
    python bench/cached_run.py --set train.max_steps=400

Four runs of `tunepipe run examples/quickstart.yaml`, each a fresh process, from one fresh
workdir and PREFECT_HOME: (1) the first run, every stage runs, on Prefect's embedded server;
(2) the same again, all cached, no server configured; (3) a `prefect server start` on a free
loopback port, then the same run with PREFECT_API_URL set: a real flow run recorded on the
server, all cached. Its server's start is not counted: it is already running for a scheduled
run. Prints each wall time, and as the last line one JSON object:
{"first_s", "cached_s", "cached_on_server_s", "cached_over_first", "cached_on_server_over_first"}.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running this file puts bench/ first on sys.path, where a sibling script named like a stdlib
# module (bench/tokenize.py) would shadow it for everything imported after this line.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import subprocess
import tempfile
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from prefect_server import start_prefect_server  # noqa: E402


def run(root: Path, env: dict, sets: list[str]) -> tuple[float, list[str]]:
    argv = [sys.executable, "-m", "pipeline.cli", "run", "examples/quickstart.yaml", "--workdir", str(root / "runs"),
            "--set", f"registry.url={root / 'registry'}", *[a for s in sets for a in ("--set", s)]]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    return seconds, [s["status"] for s in summary["stages"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="a config override for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunepipe-cached-run-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        first, statuses = run(root, env, args.set)
        print(f"first run:          {first:6.1f} s  {statuses}", flush=True)
        cached, statuses = run(root, env, args.set)
        assert set(statuses) == {"cached"}, statuses
        print(f"cached run:         {cached:6.1f} s  (no server configured: answered from the cache)", flush=True)
        server = start_prefect_server(root / "server")
        try:
            run(root, server.env(), args.set)  # the client's first contact with a fresh database
            on_server, statuses = run(root, server.env(), args.set)
            assert set(statuses) == {"cached"}, statuses
        finally:
            server.stop()
        print(f"cached on a server: {on_server:6.1f} s  (a flow run recorded at PREFECT_API_URL)", flush=True)
        print(json.dumps({
            "first_s": round(first, 2), "cached_s": round(cached, 2), "cached_on_server_s": round(on_server, 2),
            "cached_over_first": round(cached / first, 3), "cached_on_server_over_first": round(on_server / first, 3),
        }))


if __name__ == "__main__":
    main()
