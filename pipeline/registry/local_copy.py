"""Verified local copies of registry versions: what every command that loads a model reads.

    folder = local_copy("s3://bucket/registry", "support-bot", "3f9c0e1a2b4d")   # pulled once, verified

A copy lives at `$TUNEPIPE_REGISTRY_CACHE/<registry digest>/<model>/<version>/copy` (default
`~/.cache/tunepipe/registry`). It is pulled beside its place and renamed in whole once every file
matched its sha256 (`pull_version`), so a copy that exists is complete; before reuse its file
sizes are checked against its manifest (every byte hashed again under `--verify`). Versions are
immutable, so a copy never goes stale. Processes racing to make one copy (every rank of a run
whose base is `registry://...`) each pull, the first rename wins and the others use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline import artifacts
from pipeline.artifacts import MANIFEST, ArtifactError
from pipeline.leftovers import make_private_folder, release
from pipeline.registry.names import RegistryError, check_name, version_url

CACHE_ENV = "TUNEPIPE_REGISTRY_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tunepipe" / "registry")


def registry_key(registry: str) -> str:
    """A registry's cache folder name: its URL (absolute for a folder), hashed, so two registries'
    versions of one name never share a copy."""
    where = registry if artifacts.is_remote(registry) else str(Path(registry).resolve())
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def version_cache(registry: str, model: str, version: str) -> Path:
    return cache_root() / registry_key(registry) / check_name("model name", model) / check_name("version", version)


def local_copy(registry: str, model: str, version: str) -> Path:
    """A verified local copy of `model/version` (layout as in the registry: model/, tokenizer/, ...)."""
    dest = version_cache(registry, model, version) / "copy"
    if not _reusable(dest):
        # Each puller pulls into a folder of its own, then renames it onto `dest`: the first wins.
        # A killed puller's folder is removed by the next one (pipeline/leftovers.py).
        mine = make_private_folder(dest.parent, ".copy-")
        try:
            pull_version(registry, model, version, mine)
            _record_mtimes(mine)
            _rename_or_lose(mine, dest)
        finally:
            release(mine)
    return dest


def derived_folder(registry: str, model: str, version: str, kind: str, build) -> Path:
    """A folder made from a version's copy (e.g. `hf`: the plain Hugging Face folder a base model
    loads from), built once by `build(dest)` into a private folder, given a manifest of what was
    built, and renamed into place; checked against that manifest like a copy on every reuse."""
    dest = version_cache(registry, model, version) / kind
    if not _reusable(dest):
        mine = make_private_folder(dest.parent, f".{kind}-")
        try:
            build(mine)
            (mine / MANIFEST).write_text(json.dumps({"files": artifacts.file_entries(mine, mtimes=True)}, indent=1, sort_keys=True))
            _rename_or_lose(mine, dest)
        finally:
            release(mine)
    return dest


def _record_mtimes(copy: Path) -> None:
    """Note each verified file's modification time in the copy's manifest: a later edit that keeps
    the size is then hashed again on reuse (artifacts.check_files), not only under --verify."""
    manifest = json.loads((copy / MANIFEST).read_text())
    for rel, entry in manifest["files"].items():
        entry["mtime_ns"] = (copy / rel).stat().st_mtime_ns
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def _reusable(folder: Path) -> bool:
    """Whether `folder` holds a finished copy: checked and True; absent: False; anything else
    (files without their manifest, files that no longer match it) is refused, never rebuilt over."""
    if (folder / MANIFEST).is_file():
        check_copy(folder)
        return True
    if folder.exists():
        raise RegistryError(f"the local copy {folder} is damaged (no {MANIFEST}); delete it to pull the version again")
    return False


def _rename_or_lose(mine: Path, dest: Path) -> None:
    try:
        os.rename(mine, dest)
    except OSError:
        if not (dest / MANIFEST).is_file():  # not another process's finished copy
            raise RegistryError(f"the local copy {dest} could not be made (it exists, without {MANIFEST}); "
                                "delete it to pull the version again") from None


def check_copy(folder: Path) -> None:
    """Raise RegistryError when a local copy's files no longer match its manifest (sizes; every
    byte under --verify): a copy edited or truncated on disk must not be loaded as the version."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        artifacts.check_files(str(folder), manifest, full=artifacts.verify_requested())
    except (ArtifactError, ValueError, KeyError) as e:
        raise RegistryError(f"the local copy {folder} is damaged ({e}); delete it to pull the version again") from None


def pull_version(registry: str, model_name: str, version: str, dest: Path) -> Path:
    """Copy a version to `dest` (absent or an empty folder) and verify every file against its manifest.

    The copy is made beside `dest` and renamed onto it once verified, so `dest` is never half-made,
    and nothing that was there is deleted: a non-empty `dest` is refused."""
    url = version_url(registry, model_name, version)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(f"{dest} exists and is not an empty folder; pull into a new folder (nothing was changed)")
    problems = artifacts.verify(url)
    if problems:
        raise RegistryError(f"{url} does not verify: " + "; ".join(problems[:5]))
    fs, path = artifacts.filesystem(url)
    manifest = json.loads(fs.cat_file(artifacts.join(path, MANIFEST)))
    base = artifacts.join(path, artifacts.manifest_root(manifest)) if manifest.get("root") else path

    def fill(partial: Path) -> None:
        for rel in manifest["files"]:
            target = artifacts.inside(partial, rel, f"{url}/{MANIFEST}")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(artifacts.join(base, rel), str(target))
        manifest.pop("root", None)  # the copy holds its files beside its manifest
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        local_problems = artifacts.verify(str(partial))
        if local_problems:
            raise RegistryError(f"the copy of {url} does not verify: " + "; ".join(local_problems[:5]))

    return into_new_folder(dest, "pulling", fill)


def into_new_folder(dest: Path, doing: str, fill) -> Path:
    """`fill(partial)` a folder beside `dest`, then rename it onto `dest` (absent or empty, checked
    by the caller): `dest` is never half-made, and what was there is never deleted."""
    partial = make_private_folder(dest.parent, f".{dest.name}.{doing}-")
    try:
        fill(partial)
        if dest.exists():
            dest.rmdir()  # empty, checked by the caller
        os.rename(partial, dest)
    finally:
        release(partial)
    return dest
