"""The model registry: immutable, hash-verified versions at `<registry>/<model>/<version>/`.

A version exists once its `manifest.json` (sha256 of every file) exists, and it appears whole or
not at all. The commit is one atomic, exclusive step, so of N publishers racing for a version
exactly one wins and the others are told (or, publishing the same content, find it done):

- a folder: the files and the manifest are written to `<model>/.staging-<random>/` beside the
  version, fsynced, and renamed onto `<model>/<version>`. rename(2) of a directory onto a
  non-empty one fails, so the first rename wins and a reader never sees a half-made version.
- an object store (s3://): there is no rename. The files go to `<version>/.uploads/<random>/`,
  then the manifest, naming that upload as its `root`, is put with If-None-Match: * (s3fs's
  mode="create"); the store accepts one such put per key.

A publisher removes only what it wrote itself (its staging folder or upload, after losing or
failing); a folder it did not create is never deleted, except a killed publisher's staging
folder on this host, which the next publisher of that model removes (pipeline/leftovers.py).
Works on a local folder or an s3:// URL.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.artifacts import MANIFEST, ArtifactError
from pipeline.leftovers import make_private_folder, release
from pipeline.registry.aliases import aliases_of
from pipeline.registry.local_copy import pull_version  # noqa: F401 (the registry's API; lives beside the copies it makes)
from pipeline.registry.names import NAME_RULE, RegistryError, VersionExists, check_name, version_url  # noqa: F401 (the registry's API)

def publish_version(local: Path, registry: str, model_name: str, version: str, source: dict[str, Any]) -> tuple[str, bool]:
    """Commit the files under `local` as `model_name/version`. Returns (url, newly_written).

    `source` identifies what was published (the fingerprints it came from): publishing the same
    source again is a no-op, a different source under an existing version raises VersionExists.
    """
    url = version_url(registry, model_name, version)
    existing = _committed_manifest(url)
    if existing is not None:
        return url, _same_or_refuse(existing, source, model_name, version, url)
    manifest = {"model_name": model_name, "version": version, "source": source}
    won = _commit_remote(local, url, manifest) if artifacts.is_remote(url) else _commit_local(local, Path(url), manifest)
    if won:
        return url, True
    return url, _same_or_refuse(_committed_manifest(url), source, model_name, version, url)


def push_folder(folder: Path, registry: str, model_name: str, version: str) -> tuple[str, bool]:
    """Publish a folder made anywhere with the same commit protocol; its identity is its content
    (every file's sha256), so pushing the same bytes twice is a no-op."""
    folder = Path(folder)
    if not folder.is_dir() or not artifacts.list_files(folder):
        raise RegistryError(f"{folder}: not a folder with files to publish")
    digests = {rel: artifacts.sha256_file(folder / rel) for rel in artifacts.list_files(folder)}
    return publish_version(folder, registry, model_name, version, {"pushed_files_sha256": artifacts.hash_json(digests)})


def _same_or_refuse(existing: dict | None, source: dict, model_name: str, version: str, url: str) -> bool:
    if existing is not None and existing.get("source") == source:
        return False
    raise VersionExists(
        f"{model_name} version {version} already exists at {url} with different content; "
        "versions are immutable: publish under a new version (registry.version)"
    )


def _committed_manifest(url: str) -> dict | None:
    try:
        return artifacts.read_json(artifacts.join(url, MANIFEST))
    except FileNotFoundError:
        return None


def _commit_local(local: Path, final: Path, manifest: dict) -> bool:
    """Copy into a staging folder beside the version, then rename it onto the version."""
    # Claimed while this publisher lives: a killed publisher's copy is removed by the next one.
    staging = make_private_folder(final.parent, ".staging-")  # any version's leftovers, not only this one's
    try:
        shutil.copytree(local, staging, dirs_exist_ok=True)
        return artifacts.commit_staged(staging, final, manifest)
    except ArtifactError as e:
        raise RegistryError(str(e)) from None
    finally:
        release(staging)  # ours; gone already after a won rename


def _commit_remote(local: Path, url: str, manifest: dict) -> bool:
    try:
        return artifacts.commit_upload(local, url, manifest)
    except ArtifactError as e:
        raise RegistryError(str(e)) from None


def list_versions(registry: str) -> list[dict[str, Any]]:
    """Every committed version under `registry`, oldest first within each model. A version whose
    manifest cannot be read is left out with a warning; it never hides the others."""
    fs, root = artifacts.filesystem(registry)
    if not fs.exists(root):
        return []
    rows = []
    for manifest_path in sorted(fs.glob(artifacts.join(root, "*", "*", MANIFEST))):
        folder = manifest_path[: -len(MANIFEST) - 1]
        if any(part.startswith(".") for part in folder.split("/")[-2:]):
            continue  # a publisher's staging folder
        try:
            manifest = json.loads(fs.cat_file(manifest_path))
            files = manifest["files"]
            base = artifacts.join(folder, artifacts.manifest_root(manifest)) if manifest.get("root") else folder
            metrics_path = artifacts.join(base, "metrics.json")
            metrics = json.loads(fs.cat_file(metrics_path)) if "metrics.json" in files else {}
            row = {
                "model": manifest.get("model_name"),
                "version": manifest.get("version"),
                "created_unix": manifest.get("created_unix"),
                "files": len(files),
                "bytes": sum(f["bytes"] for f in files.values()),
                "perplexity": metrics.get("perplexity"),
                # The headline number of the version's task, for listings.
                "metric": next((f"{k} {metrics[k]:.4g}" for k in ("perplexity", "accuracy", "rouge_l") if isinstance(metrics.get(k), (int, float))), ""),
                "url": folder if not artifacts.is_remote(registry) else registry.split("://")[0] + "://" + folder,
            }
        except (ValueError, KeyError, TypeError, AttributeError, OSError, ArtifactError) as e:
            print(f"tunepipe: warning: skipping {manifest_path}: unreadable manifest ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        rows.append(row)
    pointing: dict[tuple[str, str], list[str]] = {}
    for model in {r["model"] for r in rows if r["model"]}:
        for alias, version in aliases_of(registry, model).items():
            pointing.setdefault((model, version), []).append(alias)
    for row in rows:
        row["aliases"] = sorted(pointing.get((row["model"], row["version"]), []))
    return sorted(rows, key=lambda r: (r["model"] or "", r["created_unix"] or 0))
