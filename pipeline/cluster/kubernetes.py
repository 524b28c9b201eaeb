"""The manifests `kubectl apply -f` takes to run the train stage on `train.nnodes` pods.

An Indexed Job (one pod per node, each with a stable hostname `<job>-<index>`) plus a headless
Service that makes those hostnames resolvable, so every pod's torchrun meets at the c10d
rendezvous on pod 0: `<job>-0.<job>:<rdzv_port>`. Chosen over Kubeflow Trainer's TrainJob
because it needs nothing installed in the cluster (no operator, no CRDs) and is what TrainJob
itself creates underneath; the train config travels in a ConfigMap. Pods read the tokenized
shards from the S3 workdir, checkpoint to it (a rescheduled pod resumes) and commit the model
under the stage's scratch there, where the next `tunepipe run` adopts it.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.cluster.torchrun import torchrun_command
from pipeline.config import KubernetesConfig, TrainConfig

CONFIG_MOUNT = "/etc/tunepipe"


def render_manifest(train: TrainConfig, k8s: KubernetesConfig, *, name: str, worker_args: list[str], config_json: str,
                    rdzv_id: str, env: dict[str, str] | None = None) -> str:
    """A YAML stream: ConfigMap, headless Service, Indexed Job."""
    labels = {"app.kubernetes.io/name": "tunepipe", "app.kubernetes.io/instance": name}
    meta = lambda: {"name": name, "namespace": k8s.namespace, "labels": dict(labels)}  # noqa: E731 (fresh dicts: no YAML anchors)
    endpoint = f"{name}-0.{name}:{train.rdzv_port}"
    command = torchrun_command(train, worker_args, python="python", rdzv_endpoint=endpoint, rdzv_id=rdzv_id)
    gpus = train.nproc_per_node if k8s.gpus is None else k8s.gpus
    limits: dict[str, Any] = {}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    if k8s.cpu:
        limits["cpu"] = k8s.cpu
    if k8s.memory:
        limits["memory"] = k8s.memory
    container = {
        "name": "train",
        "image": k8s.image,
        "command": command,
        "ports": [{"name": "rendezvous", "containerPort": train.rdzv_port}],
        "env": [{"name": k, "value": v} for k, v in {"PYTHONUNBUFFERED": "1", "TUNEPIPE_CACHE": "/cache", **(env or {})}.items()],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": "/cache"},
        ],
    }
    if limits:
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    if k8s.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": k8s.s3_secret}}]
    pod: dict[str, Any] = {
        "subdomain": name,  # with the headless Service: <job>-<index>.<job> resolves to each pod
        "restartPolicy": "OnFailure",  # a restarted pod resumes from the newest checkpoint on S3
        # Kubernetes sends SIGTERM on eviction: the ranks checkpoint at the next step boundary.
        "terminationGracePeriodSeconds": 300,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if k8s.service_account:
        pod["serviceAccountName"] = k8s.service_account
    if k8s.node_selector:
        pod["nodeSelector"] = dict(k8s.node_selector)
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(), "data": {"train_config.json": config_json}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(),
         "spec": {"clusterIP": "None", "selector": dict(labels), "publishNotReadyAddresses": True,
                  "ports": [{"name": "rendezvous", "port": train.rdzv_port}]}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(),
         "spec": {"completionMode": "Indexed", "completions": train.nnodes, "parallelism": train.nnodes,
                  "backoffLimit": k8s.backoff_limit, "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)
