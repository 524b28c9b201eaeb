"""The model registry: immutable, hash-verified versions at `<registry>/<model>/<version>/`.

A version is committed when its `manifest.json` (sha256 of every file) exists. Versions are
never overwritten: publishing different content under an existing version is refused.
Works on a local folder or any fsspec URL (s3://bucket/prefix).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.artifacts import MANIFEST


class RegistryError(RuntimeError):
    pass


def version_url(registry: str, model_name: str, version: str) -> str:
    return artifacts.join(registry, model_name, version)


def publish_version(local: Path, registry: str, model_name: str, version: str, source: dict[str, Any]) -> tuple[str, bool]:
    """Commit the files under `local` as `model_name/version`. Returns (url, newly_written).

    `source` identifies what was published (the fingerprints it came from): publishing the
    same source again is a no-op, a different source under the same version is refused.
    """
    url = version_url(registry, model_name, version)
    if artifacts.exists(artifacts.join(url, MANIFEST)):
        existing = artifacts.read_json(artifacts.join(url, MANIFEST))
        if existing.get("source") == source:
            return url, False
        raise RegistryError(
            f"{model_name} version {version} already exists at {url} with different content; "
            "versions are immutable: set registry.version to a new label"
        )
    fs, path = artifacts.filesystem(url)
    if fs.exists(path):  # an interrupted publish: nothing reads it, so it is safe to replace
        fs.rm(path, recursive=True)
    artifacts.commit_folder(local, url, {"model_name": model_name, "version": version, "source": source})
    return url, True


def list_versions(registry: str) -> list[dict[str, Any]]:
    """Every committed version under `registry`, oldest first within each model."""
    fs, root = artifacts.filesystem(registry)
    if not fs.exists(root):
        return []
    rows = []
    for manifest_path in sorted(fs.glob(artifacts.join(root, "*", "*", MANIFEST))):
        manifest = json.loads(fs.cat_file(manifest_path))
        folder = manifest_path[: -len(MANIFEST) - 1]
        metrics_path = artifacts.join(folder, "metrics.json")
        metrics = json.loads(fs.cat_file(metrics_path)) if fs.exists(metrics_path) else {}
        rows.append(
            {
                "model": manifest.get("model_name"),
                "version": manifest.get("version"),
                "created_unix": manifest.get("created_unix"),
                "files": len(manifest.get("files", {})),
                "bytes": sum(f["bytes"] for f in manifest.get("files", {}).values()),
                "perplexity": metrics.get("perplexity"),
                # The headline number of the version's task, for listings.
                "metric": next((f"{k} {metrics[k]:.4g}" for k in ("perplexity", "accuracy", "rouge_l") if metrics.get(k) is not None), ""),
                "url": folder if not artifacts.is_remote(registry) else registry.split("://")[0] + "://" + folder,
            }
        )
    return sorted(rows, key=lambda r: (r["model"] or "", r["created_unix"] or 0))


def pull_version(registry: str, model_name: str, version: str, dest: Path) -> Path:
    """Copy a version to `dest` and verify every file against its manifest."""
    url = version_url(registry, model_name, version)
    problems = artifacts.verify(url)
    if problems:
        raise RegistryError(f"{url} does not verify: " + "; ".join(problems[:5]))
    fs, path = artifacts.filesystem(url)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    local_problems = artifacts.verify(str(dest))
    if local_problems:
        raise RegistryError(f"copy at {dest} does not verify: " + "; ".join(local_problems[:5]))
    return dest
