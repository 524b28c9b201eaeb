"""Publish the tuned model as an immutable registry version, behind the evaluation gate.

Every publish moves the model's `latest` alias to the version it published (registry/aliases.py).
The version holds `model/`, `tokenizer/`, `metrics.json`, `config.yaml` (the resolved config
of every stage that led here) and `lineage.json` (each ancestor stage's fingerprint, config,
stats and content hashes, down to the sha256 of the raw data files), plus `manifest.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline import artifacts
from pipeline.artifacts import MANIFEST, Artifact
from pipeline.config import EvaluateConfig, ModelConfig, RegistryConfig
from pipeline.registry import aliases
from pipeline.registry.base_records import BASE_JSON, adapter_base_name, describe_base, point_adapter_at, publish_base
from pipeline.registry.bases import TRAINED_JSON
from pipeline.registry.card import write_card
from pipeline.registry.store import publish_version


class GateFailed(RuntimeError):
    pass


def lineage(start: list[Path]) -> dict[str, dict[str, Any]]:
    """Walk parent links from the given committed folders up to ingest: stage -> manifest summary."""
    found: dict[str, dict[str, Any]] = {}
    queue = [artifacts.read_json(str(p / MANIFEST)) for p in start]
    while queue:
        manifest = queue.pop()
        if manifest["stage"] in found:
            continue
        found[manifest["stage"]] = {
            "fingerprint": manifest["fingerprint"],
            "config": manifest.get("config", {}),
            "content": manifest.get("content"),
            "stats": manifest.get("stats", {}),
        }
        for parent in manifest.get("parents", {}).values():
            queue.append(artifacts.read_json(artifacts.join(parent["url"], MANIFEST)))
    return found


def run(registry: RegistryConfig, evaluate: EvaluateConfig, model: ModelConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    metrics = json.loads((inputs["evaluate"] / "metrics.json").read_text())
    gate = metrics["gate"]
    if not gate["passed"]:
        # evaluate wrote one line per missed threshold, naming the metric, its value and the setting.
        reasons = "; ".join(gate.get("failed") or [f"thresholds {gate.get('thresholds')}"])
        raise GateFailed(f"evaluation gate ({metrics.get('task', 'causal_lm')}): {reasons}; not publishing")
    stages = lineage([inputs["evaluate"], inputs["train"]])
    source = {name: stages[name]["fingerprint"] for name in ("tokenize", "train", "evaluate")}
    version = registry.version or artifacts.hash_json({"source": source, "registry": registry.model_name})[:12]

    # A folder of this run's own: two runs publishing one fingerprint at once (every node of a
    # run started by hand publishes) share the scratch, and one must not delete the other's bundle.
    scratch.mkdir(parents=True, exist_ok=True)
    bundle = Path(tempfile.mkdtemp(prefix="bundle-", dir=scratch))
    shutil.copytree(inputs["train"] / "model", bundle / "model")
    shutil.copytree(inputs["train"] / "tokenizer", bundle / "tokenizer")
    shutil.copy(inputs["evaluate"] / "metrics.json", bundle / "metrics.json")
    resolved = {}
    for stage in stages.values():
        resolved.update(stage["config"])
    (bundle / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=True))
    (bundle / "lineage.json").write_text(json.dumps(stages, indent=2, sort_keys=True, default=str))
    trained = json.loads((inputs["train"] / "model" / TRAINED_JSON).read_text())
    trained_from = (stages["train"].get("content") or {}).get("base")
    base = base_reference(inputs["train"], trained, model, registry, metrics.get("task", "causal_lm"), scratch, trained_from)
    if base is not None:
        (bundle / BASE_JSON).write_text(json.dumps(base, indent=2, sort_keys=True))
        if (bundle / "model" / "adapter_config.json").is_file():
            point_adapter_at(bundle / "model" / "adapter_config.json", *adapter_base_name(base))
    write_card(
        bundle, model_name=registry.model_name, version=version, metrics=metrics, lineage=stages, config={**resolved, "registry": registry.model_dump(mode="json")},
        train_log=_read_jsonl(inputs["train"] / "train_log.jsonl"), train_stats=_read_json(inputs["train"] / "train_stats.json"),
        base=base, method=trained.get("trained_with") or trained.get("method", "full"),
    )

    url, written = publish_version(bundle, registry.url, registry.model_name, version, source)
    shutil.rmtree(bundle, ignore_errors=True)
    if aliases.target(registry.url, registry.model_name, aliases.LATEST) != version:
        aliases.move(registry.url, registry.model_name, aliases.LATEST, version, reason="publish")
    (out / "published.json").write_text(json.dumps({"url": url, "version": version}, indent=2))
    scores = {k: metrics[k] for k in ("perplexity", "accuracy", "macro_f1", "rouge_l", "rewards/accuracies") if k in metrics}
    return {"version": version, "url": url, "newly_published": written, **scores}


def base_reference(train: Path, trained: dict, model: ModelConfig, registry: RegistryConfig, task: str, scratch: Path,
                   trained_from: dict | None = None) -> dict | None:
    """What base.json records. An adapters-only model whose base exists nowhere else (a scratch
    initialisation, a local folder) gets that base published first, so the version loads from
    the registry alone."""
    base = describe_base(model, trained_from)
    adapters_only = trained.get("method") != "full"
    if adapters_only and (base is None or "path" in base):
        folder = train / "base" if base is None else Path(base["path"])
        tokenizer = train / "tokenizer"
        return publish_base(folder, tokenizer, registry.url, registry.model_name, task, scratch)
    if base is not None and base.get("url") == registry.url:
        del base["url"]  # the same registry: the reference stays valid when the registry is copied or moved
    return base


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def still_valid(done: Artifact) -> bool:
    """A cached publish counts only while its registry version still exists."""
    published = artifacts.read_json(artifacts.join(done.url, "published.json"))
    return artifacts.exists(artifacts.join(published["url"], MANIFEST))
