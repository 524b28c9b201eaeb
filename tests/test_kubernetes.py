"""`tunepipe k8s manifest`: the YAML `kubectl apply -f -` takes to train on `train.nnodes` pods.

No Kubernetes here, so: the rendered documents are checked for what the cluster relies on (an
Indexed Job whose pods find pod 0 through a headless Service, the config mounted where the
command reads it, GPUs, /dev/shm, the S3 secret); then the pods' own command, taken from the
manifest the CLI prints, runs as two local processes at once (one per pod, each with its own
cache, HOME, TMPDIR and working directory, only the rendezvous host and the config path made
local), trains for real against the moto S3 server, and the next `tunepipe run` adopts what they
committed and publishes weights bit-identical to a local run at the same world size.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import QUICKSTART, cli_command, published_weights, sha256, tiny_overrides

from pipeline.cluster.kubernetes import CONFIG_MOUNT, render_manifest
from pipeline.config import KubernetesConfig, TrainConfig, load_config

RDZV = "--rdzv-endpoint="


# ---------------------------------------------------------------- reading a manifest


def parse(text: str) -> tuple[dict, dict, dict]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert [d["apiVersion"] for d in docs] == ["v1", "v1", "batch/v1"]
    return docs[0], docs[1], docs[2]


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    containers = pod_spec(job)["containers"]
    assert len(containers) == 1, containers
    return containers[0]


def option(command: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in `command` (exactly one occurrence)."""
    found = [a.split("=", 1)[1] for a in command if a.startswith(name + "=")]
    found += [command[i + 1] for i, a in enumerate(command[:-1]) if a == name]
    assert len(found) == 1, (name, command)
    return found[0]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def volume_at(job: dict, mount_path: str) -> dict:
    """The pod volume mounted at `mount_path` in the container."""
    mounts = [m for m in container(job)["volumeMounts"] if m["mountPath"] == mount_path]
    assert len(mounts) == 1, (mount_path, container(job)["volumeMounts"])
    volumes = [v for v in pod_spec(job)["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, (mounts[0], pod_spec(job)["volumes"])
    return volumes[0]


def config_key_behind(config_map: dict, job: dict) -> str:
    """`--config` points into a mount of this ConfigMap, at one of its keys: that key."""
    where = Path(option(container(job)["command"], "--config"))
    volume = volume_at(job, str(where.parent))
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert where.name in config_map["data"], (where.name, list(config_map["data"]))
    return where.name


# ---------------------------------------------------------------- 1. the documents themselves

WORKER_ARGS = ["--tokenized", "s3://bucket/runs/tokenize/abc", "--config", f"{CONFIG_MOUNT}/train_config.json",
               "--output", "s3://bucket/runs/scratch/train/abc/output", "--commit-output",
               "--checkpoints", "s3://bucket/runs/scratch/train/abc/checkpoints"]


def render(train: TrainConfig | None = None, **k8s) -> str:
    train = train or TrainConfig(nnodes=3, nproc_per_node=2, rdzv_port=29611)
    return render_manifest(train, KubernetesConfig(**k8s), name="tp-job", worker_args=WORKER_ARGS,
                           config_json='{"model": {}, "train": {}}', rdzv_id="tunepipe-abc")


def test_an_indexed_job_of_nnodes_pods_that_meet_at_pod_0_through_a_headless_service():
    text = render(namespace="ml")
    config_map, service, job = parse(text)
    name = job["metadata"]["name"]
    assert name == "tp-job"
    assert {d["metadata"]["namespace"] for d in (config_map, service, job)} == {"ml"}

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 3
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "OnFailure"

    # <job>-<index>.<subdomain> resolves only through a headless Service of that name selecting the pods.
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] and service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("publishNotReadyAddresses") is True  # rendezvous happens before any readiness
    assert [p["port"] for p in service["spec"]["ports"]] == [29611]
    assert [p["containerPort"] for p in container(job)["ports"]] == [29611]

    # One template: every pod runs this same command; nothing in it depends on the pod's index.
    command = container(job)["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert not any("JOB_COMPLETION_INDEX" in a or a.startswith("--node-rank") or a.startswith("--node_rank") for a in command)
    host, port = option(command, "--rdzv-endpoint").rsplit(":", 1)
    assert host == f"{name}-0.{service['metadata']['name']}"
    assert int(port) == 29611
    assert option(command, "--nnodes") == "3"
    assert option(command, "--nproc-per-node") == "2"
    assert option(command, "--rdzv-backend") == "c10d"
    assert option(command, "--rdzv-id") == "tunepipe-abc"
    assert command[command.index("-m", 3):] == ["-m", "pipeline.train", *WORKER_ARGS]


def test_gpus_default_to_nproc_per_node_and_zero_removes_them():
    limits = container(parse(render())[2])["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": 2}
    assert container(parse(render())[2])["resources"]["requests"] == limits

    cpu_only = container(parse(render(gpus=0))[2])
    assert "nvidia.com/gpu" not in cpu_only.get("resources", {}).get("limits", {})
    assert "nvidia.com/gpu" not in cpu_only.get("resources", {}).get("requests", {})

    sized = container(parse(render(gpus=8, cpu="16", memory="64Gi"))[2])["resources"]
    assert sized["limits"] == sized["requests"] == {"nvidia.com/gpu": 8, "cpu": "16", "memory": "64Gi"}


def test_volumes_secret_service_account_and_node_selector():
    config_map, _, job = parse(render(s3_secret="s3-creds", service_account="trainer", shm_size="8Gi",
                                      node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, backoff_limit=5))
    c, pod = container(job), pod_spec(job)

    assert config_key_behind(config_map, job) == "train_config.json"
    assert config_map["data"]["train_config.json"] == '{"model": {}, "train": {}}'

    shm = volume_at(job, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"
    # The download cache (TUNEPIPE_CACHE) is a volume of the pod, not the container's own layer.
    assert "emptyDir" in volume_at(job, env_of(c)["TUNEPIPE_CACHE"])

    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert pod["serviceAccountName"] == "trainer"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert job["spec"]["backoffLimit"] == 5


def test_without_optional_settings_nothing_optional_is_rendered():
    _, _, job = parse(render(gpus=0))
    c, pod = container(job), pod_spec(job)
    assert "envFrom" not in c and "resources" not in c
    assert "serviceAccountName" not in pod and "nodeSelector" not in pod
    assert c["image"] == "tunepipe:latest"


def test_a_single_node_job_still_meets_at_pod_0_not_standalone():
    """nnodes=1: the same shape, a c10d rendezvous at pod 0 (not --standalone), one completion."""
    _, service, job = parse(render(TrainConfig(nnodes=1, nproc_per_node=4)))
    command = container(job)["command"]
    assert "--standalone" not in command
    assert option(command, "--rdzv-endpoint") == f"tp-job-0.{service['metadata']['name']}:29500"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1


# ---------------------------------------------------------------- 2. through the CLI, on S3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tunepipe:
    """`tunepipe` as a user runs it: from its own folder (an s3:// workdir writes its history under
    ./runs), with HOME (the stage scratch of an s3:// workdir) and TUNEPIPE_CACHE inside tmp_path."""

    def __init__(self, tmp_path: Path, endpoint: str, bucket: str):
        self.cwd = tmp_path / "shell"
        self.cwd.mkdir()
        self.registry = tmp_path / "registry"
        self.workdir = f"s3://{bucket}/runs"
        self.endpoint = endpoint
        prefect_home = os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect"))  # its migrated database
        self.env = {**os.environ, "HOME": str(tmp_path / "home"), "PREFECT_HOME": prefect_home,
                    "TUNEPIPE_CACHE": str(tmp_path / "cli-cache"), "OMP_NUM_THREADS": "1"}

    def overrides(self, *extra: str, registry: Path | None = None) -> list[str]:
        sets = [*tiny_overrides(registry or self.registry), f"data.s3_endpoint_url={self.endpoint}", "train.nnodes=2", *extra]
        return [a for s in sets for a in ("--set", s)]

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cli_command(*args), cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=600)
        if ok:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    def manifest(self) -> subprocess.CompletedProcess:
        return self("k8s", "manifest", str(QUICKSTART), "--workdir", self.workdir, *self.overrides())

    def run(self, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
        # `tunepipe stage publish`: the train stage adopts the same way under `tunepipe run` (Prefect
        # only sequences the stages), without an embedded server to start twice per test.
        return self("stage", "publish", str(QUICKSTART), "--workdir", self.workdir,
                    *self.overrides("train.launcher=kubernetes", *extra), ok=ok)


def summary(proc: subprocess.CompletedProcess, cwd: Path) -> dict:
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("summary.json"), proc.stdout[-2000:]
    return json.loads((cwd / last).read_text())


def statuses(s: dict) -> dict[str, str]:
    return {stage["name"]: stage["status"] for stage in s["stages"]}


def stats_of(s: dict, name: str) -> dict:
    return next(stage["stats"] for stage in s["stages"] if stage["name"] == name)


def committed_manifest(url: str) -> dict | None:
    from pipeline.train import job_output

    return job_output.committed(url)


def check_cli_manifest(tp: Tunepipe, proc: subprocess.CompletedProcess) -> tuple[dict, dict, dict]:
    config_map, service, job = parse(proc.stdout)  # stdout is the YAML alone
    assert "[tokenize]" in proc.stderr  # the stage chatter went to stderr
    c = container(job)
    command = c["command"]

    assert env_of(c)["AWS_ENDPOINT_URL"] == tp.endpoint
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert option(command, "--nnodes") == "2" and option(command, "--nproc-per-node") == "1"
    assert option(command, "--rdzv-endpoint") == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500"

    tokenized, output, checkpoints = (option(command, o) for o in ("--tokenized", "--output", "--checkpoints"))
    for url in (tokenized, output, checkpoints):
        assert url.startswith(tp.workdir + "/"), url
    assert "--commit-output" in command
    # --tokenized is the committed tokenize output; the job's output and checkpoints live in the
    # train stage's shared scratch of one fingerprint, which also names the Job.
    assert tokenized.startswith(f"{tp.workdir}/tokenize/")
    from pipeline import artifacts

    assert artifacts.read_json(artifacts.join(tokenized, artifacts.MANIFEST))["stage"] == "tokenize"
    fp = output.rsplit("/", 2)[-2]
    assert output == f"{tp.workdir}/scratch/train/{fp}/output"
    assert checkpoints == f"{tp.workdir}/scratch/train/{fp}/checkpoints"
    assert job["metadata"]["name"] == f"tunepipe-train-{fp[:12]}"

    # The ConfigMap holds the model and train sections of this very config, mounted where --config reads.
    key = config_key_behind(config_map, job)
    cfg = load_config(QUICKSTART, ["train.launcher=kubernetes", *tp.overrides()[1::2]])
    assert json.loads(config_map["data"][key]) == {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json")}
    return config_map, service, job


@pytest.mark.integration
def test_cli_manifest_reads_and_writes_the_s3_workdir(tmp_path, s3_endpoint, s3_bucket):
    tp = Tunepipe(tmp_path, s3_endpoint, s3_bucket)
    check_cli_manifest(tp, tp.manifest())


def test_cli_manifest_refuses_a_local_workdir_in_one_line(tmp_path):
    workdir = tmp_path / "runs"
    proc = subprocess.run(cli_command("k8s", "manifest", str(QUICKSTART), "--workdir", str(workdir), "--set", "train.nnodes=2"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stdout == ""  # nothing for kubectl to apply
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tunepipe: ") and "--workdir" in lines[0] and "s3://" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists(), "stages ran before the workdir was refused"


# ---------------------------------------------------------------- 3. the pods, for real


def pod_command(job: dict, config_file: Path, port: int) -> list[str]:
    """The container's command, made runnable here: the image's `python` is this one, pod 0's DNS
    name is loopback, the ConfigMap mount is a file. Nothing else changes."""
    command = container(job)["command"]
    name, subdomain = job["metadata"]["name"], pod_spec(job)["subdomain"]
    local = [sys.executable if i == 0 else a for i, a in enumerate(command)]
    local = [f"{RDZV}127.0.0.1:{port}" if a.startswith(RDZV) else a for a in local]
    local = [str(config_file) if a == option(command, "--config") else a for a in local]
    changed = [(a, b) for a, b in zip(command, local) if a != b]
    assert changed == [("python", sys.executable), (f"{RDZV}{name}-0.{subdomain}:29500", f"{RDZV}127.0.0.1:{port}"),
                       (option(command, "--config"), str(config_file))]
    return local


def pod_env(job: dict, root: Path) -> dict[str, str]:
    """A pod's environment: what the manifest sets (its emptyDir cache becoming a folder of this
    pod's), the credentials its s3_secret would bring (here: the moto fixture's), and no AWS or
    tunepipe setting inherited from this process, so AWS_ENDPOINT_URL comes from the manifest."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TUNEPIPE_", "PREFECT_"))}
    secret = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                        "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}
    env = {**keep, **secret, **env_of(container(job))}
    for folder in ("cache", "home", "tmp", "workspace"):
        (root / folder).mkdir(parents=True)
    env.update(TUNEPIPE_CACHE=str(root / "cache"), HOME=str(root / "home"), TMPDIR=str(root / "tmp"))
    # torchrun sets OMP_NUM_THREADS=1 for workers when nproc_per_node > 1 (the local run below),
    # not for these pods of one process each; CPU matmuls reduce in a thread-count-dependent order.
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_pods(job: dict, config_file: Path, root: Path, timeout: int = 300) -> list[str]:
    port = free_port()
    pods = []
    try:
        for index in range(job["spec"]["completions"]):
            folder = root / f"pod-{index}"
            env = pod_env(job, folder)
            env["JOB_COMPLETION_INDEX"] = str(index)  # what an Indexed Job sets (the command ignores it)
            log = (root / f"pod-{index}.log").open("w")
            pods.append((subprocess.Popen(pod_command(job, config_file, port), cwd=folder / "workspace", env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
        for proc, _ in pods:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in pods:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    logs = [(root / f"pod-{i}.log").read_text() for i in range(len(pods))]
    assert [p.returncode for p, _ in pods] == [0] * len(pods), "\n\n".join(f"pod {i}:\n{t[-3000:]}" for i, t in enumerate(logs))
    return logs


@pytest.mark.integration
@pytest.mark.slow
def test_the_pods_train_for_real_and_the_next_run_adopts_and_publishes_their_model(tmp_path, s3_endpoint, s3_bucket, local_two_rank_weights):
    tp = Tunepipe(tmp_path, s3_endpoint, s3_bucket)
    config_map, _, job = check_cli_manifest(tp, tp.manifest())
    output = option(container(job)["command"], "--output")
    tokenized = option(container(job)["command"], "--tokenized")

    # Before the Job ran: the train stage cannot train itself and says what to do, in one line.
    early = tp.run(ok=False)
    assert early.returncode == 1
    assert "Traceback" not in early.stderr
    last = early.stderr.strip().splitlines()[-1]
    assert last.startswith("tunepipe: train stage failed: ") and "kubectl apply" in last, last
    assert statuses(summary(early, tp.cwd))["train"] == "failed"
    assert committed_manifest(output) is None

    # The pods: the manifest's command, twice at once, each its own "pod".
    config_file = tmp_path / "configmap" / config_key_behind(config_map, job)
    config_file.parent.mkdir()
    config_file.write_text(config_map["data"][config_file.name])
    logs = run_pods(job, config_file, tmp_path / "pods")
    assert "world size 2" in "".join(logs)
    committed = committed_manifest(output)
    assert committed is not None, "the pods exited 0 but committed no model at --output"
    assert committed["stats"]["world_size"] == 2 and committed["stats"]["steps"] == 40
    for index in range(2):  # each pod read the tokenized shards from S3 through its own cache
        assert (tmp_path / "pods" / f"pod-{index}" / "cache" / "artifacts" / "tokenize" / tokenized.rsplit("/", 1)[-1]).is_dir()

    # The next run adopts the Job's model; evaluate and publish run on it.
    adopted = tp.run()
    s = summary(adopted, tp.cwd)
    assert statuses(s) == {"ingest": "cached", "sample": "cached", "preprocess": "cached", "tokenize": "cached",
                           "train": "ran", "evaluate": "ran", "publish": "ran"}
    assert f"adopting the model a job already committed at {output}" in adopted.stdout + adopted.stderr
    assert stats_of(s, "train")["world_size"] == 2

    # Bit-identical to the same config trained on this machine at the same world size (1 node x 2).
    assert sha256(published_weights(tp.registry)) == local_two_rank_weights
