"""Shared fixtures: `one_thread` for tiny in-process models, S3 through a real `moto_server`
subprocess on a free port, `slurm_cluster`, a real two-node Slurm cluster on loopback
(tests/slurm_cluster.py), and `prefect_server`, a real `prefect server start` with its scheduler
on (tests/prefect_server.py). Shared helpers that are not fixtures are in tiny.py.

    python -m pytest -q -m integration      # the S3 and Slurm tests (and the rest of the integration tier)

The server is configured only through the standard AWS environment variables, exactly as a
user's shell would configure a real bucket, so the code under test gets no test-only settings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prefect_server import start_prefect_server
from slurm_cluster import slurm_available, start_cluster

_STARTUP_SECONDS = 30
# werkzeug prints the port it actually bound, which is how `-p 0` tells us the free port.
_LISTENING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")


def _moto_command() -> list[str]:
    binary = Path(sys.executable).parent / "moto_server"
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
    return [*command, "-H", "127.0.0.1", "-p", "0"]


def _wait_until_answering(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + _STARTUP_SECONDS
    endpoint = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        if endpoint is None:
            match = _LISTENING.search(log.read_text(errors="replace"))
            endpoint = match.group(1) if match else None
        if endpoint is not None:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                return endpoint
            except urllib.error.HTTPError:  # any HTTP answer means it is serving
                return endpoint
            except OSError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer within {_STARTUP_SECONDS}s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: on a busy machine a second thread only spin-waits (3
    tiny-T5 steps took 16 s with 2 threads and 0.2 s with 1 on the shared 2-core box), and one
    thread reduces in the same order on every machine, so recorded values repeat.

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """URL of a moto S3 server that every s3fs/botocore client in this process talks to."""
    s3fs = pytest.importorskip("s3fs")
    fsspec = pytest.importorskip("fsspec")
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    # Output goes to a file, not a pipe: the server logs every request, and a pipe nobody
    # drains fills up and blocks it mid-test.
    with log.open("wb") as stream:
        process = subprocess.Popen(_moto_command(), stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        endpoint = _wait_until_answering(process, log)
        with pytest.MonkeyPatch.context() as mp:
            # Nothing from the developer's own AWS setup may point these tests at a real account.
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT"):
                mp.delenv(key, raising=False)
            missing = str(log.parent / "no-such-aws-file")
            mp.setenv("AWS_CONFIG_FILE", missing)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
            mp.setenv("AWS_ENDPOINT_URL", endpoint)  # botocore >= 1.31 reads it; s3fs passes it through
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.delitem(fsspec.config.conf, "s3", raising=False)
            # s3fs caches instances (and their clients) by arguments: one made before the
            # variables were set would still point at AWS.
            s3fs.S3FileSystem.clear_instance_cache()
            try:
                yield endpoint
            finally:
                s3fs.S3FileSystem.clear_instance_cache()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new, empty bucket on the moto server; its name (no s3:// prefix)."""
    import s3fs

    name = f"tunepipe-test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    fs.invalidate_cache()
    yield name


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running Slurm cluster (`slurm_cluster.SlurmCluster`): slurmctld plus slurmd n1 and n2 on
    loopback, every file in one temporary folder. Pass `.env` (it holds SLURM_CONF) to whatever
    calls sbatch/squeue/scontrol. Skipped where it cannot run (not root, packages missing),
    except with TUNEPIPE_REQUIRE_SLURM=1 (CI), where that is a failure instead."""
    reason = slurm_available()
    if reason is not None:
        if os.environ.get("TUNEPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(f"TUNEPIPE_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A running Prefect server (`prefect_server.PrefectServer`), one per test run, with its own
    SQLite database and its scheduler polling every second. Pass `.env()` (it holds
    PREFECT_API_URL) to whatever runs the prefect CLI, a flow or a worker; read runs back with
    `prefect_server.flow_runs`. tests/test_flow.py defines its own `prefect_server` (the
    ephemeral prefect_test_harness), which wins inside that module."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        server.stop()


# The longest files (seconds on the 2-core CI machine), started first: `make test` hands whole files
# to two workers in collection order, and a long file started last keeps one worker busy alone.
LONGEST_FIRST = (
    "test_minilm.py", "test_slurm_train.py", "test_train_distributed.py", "test_scheduling.py",
    "test_readme_commands.py", "test_serve.py", "test_registry_chain.py", "test_no_orphans.py",
)


def pytest_configure(config):
    """Registry copies (pipeline/registry/local_copy.py) and remembered file digests
    (pipeline/file_digests.py) go to folders of this session, never the user's ~/.cache;
    subprocesses inherit them."""
    import tempfile

    config._session_caches = []
    for env, prefix in (("TUNEPIPE_REGISTRY_CACHE", "tunepipe-registry-cache-"), ("TUNEPIPE_DIGEST_CACHE", "tunepipe-digests-")):
        if env not in os.environ:
            os.environ[env] = tempfile.mkdtemp(prefix=prefix)
            config._session_caches.append(os.environ[env])


def pytest_unconfigure(config):
    import shutil

    for folder in getattr(config, "_session_caches", []):
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Longest files first; `gpu` tests need CUDA: skipped, with the reason shown, on machines without it."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def local_two_rank_weights(tmp_path_factory) -> str:
    """sha256 of the weights the tiny config (tests/tiny.py) publishes when trained on this machine
    with 2 processes: what every run of world size 2 elsewhere (Slurm, two nodes by hand, Kubernetes
    pods) must publish too. Made once per test session."""
    from tiny import cli_args, published_weights, run_cli, sha256

    root = tmp_path_factory.mktemp("local-two-ranks")
    run_cli(cli_args("stage", root / "w", root / "r", "publish", **{"train.nproc_per_node": 2}))
    return sha256(published_weights(root / "r"))
