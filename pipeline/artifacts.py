"""Content-addressed stage outputs: fingerprints, the commit protocol and verification.

A stage writes into `<root>/<stage>/<fingerprint>/` and commits by writing `manifest.json`
last. The manifest lists the sha256 of every file plus the stage's stats, config and parents.
A folder without a manifest is an interrupted write: it is never read, and the next run
deletes it before writing again (levanter's cache ledger, torchtitan's "a checkpoint is valid
once its metadata exists").

Roots may be local folders or fsspec URLs (s3://bucket/prefix). Remote stage outputs are
written to a local staging folder and uploaded file by file, manifest last, so the rule
"no manifest, not committed" holds on object stores that have no atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """A committed artifact is missing, corrupt, or conflicts with what would be written."""


# ---------------------------------------------------------------- URLs and file systems


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def join(url: str, *parts: str) -> str:
    url = str(url)
    if is_remote(url):
        return "/".join([url.rstrip("/"), *parts])
    return str(Path(url).joinpath(*parts))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system for `url` and the path within it."""
    return fsspec.core.url_to_fs(str(url))


def use_s3_endpoint(url: str | None) -> None:
    """Point every s3:// access of this process (and of the torchrun job it starts) at `url`.

    Through the standard AWS_ENDPOINT_URL variable, which botocore and so s3fs honour, rather
    than through arguments: data sources, stage outputs and the registry then agree, and the
    subprocesses inherit it. s3fs caches clients per arguments, so a cached one is dropped.
    """
    if not url or os.environ.get("AWS_ENDPOINT_URL") == url:
        return
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "r") as f:
        return json.load(f)


# ---------------------------------------------------------------- hashing


def sha256_file(path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> str:
    digest = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def hash_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def fingerprint(stage: str, config: Any, parents: dict[str, str], code: str, content: Any = None) -> str:
    """The identity of a stage output: what it was asked to do, from what, by which code."""
    return hash_json(
        {"stage": stage, "config": config, "parents": parents, "code": code, "content": content}
    )


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifact:
    """A committed stage output."""

    stage: str
    fingerprint: str
    url: str
    stats: dict[str, Any] = field(default_factory=dict)

    def local_path(self) -> Path:
        """A local folder with this artifact's files; remote artifacts are downloaded once and verified."""
        if not is_remote(self.url):
            return Path(self.url)
        cache = Path(os.environ.get("TUNEPIPE_CACHE", Path.home() / ".cache" / "tunepipe"))
        local = cache / "artifacts" / self.stage / self.fingerprint
        if (local / MANIFEST).exists():
            return local
        fs, path = filesystem(self.url)
        manifest = json.loads(fs.cat_file(join(path, MANIFEST)))
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        for rel, entry in manifest["files"].items():
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(join(path, rel), str(target))
            if sha256_file(target) != entry["sha256"]:
                raise ArtifactError(f"{self.url}/{rel}: sha256 does not match its manifest")
        (local / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return local


def load_committed(url: str) -> Artifact | None:
    """The artifact at `url` if its manifest exists, else None. Never reads an uncommitted folder."""
    manifest_url = join(url, MANIFEST)
    if not exists(manifest_url):
        return None
    manifest = read_json(manifest_url)
    return Artifact(manifest["stage"], manifest["fingerprint"], str(url), manifest.get("stats", {}))


def list_files(root: Path) -> list[str]:
    # Only the top-level manifest is ours; a file of that name deeper down is content to hash.
    return sorted(
        rel for p in root.rglob("*") if p.is_file() and (rel := p.relative_to(root).as_posix()) != MANIFEST
    )


def verify(url: str) -> list[str]:
    """Problems with a committed folder: missing manifest, missing files, sha256 mismatches, extras."""
    fs, path = filesystem(url)
    manifest_path = join(path, MANIFEST)
    if not fs.exists(manifest_path):
        return [f"{url}: no {MANIFEST} (not committed)"]
    manifest = json.loads(fs.cat_file(manifest_path))
    problems = []
    for rel, entry in manifest["files"].items():
        file_path = join(path, rel)
        if not fs.exists(file_path):
            problems.append(f"{rel}: missing")
        elif sha256_file(file_path, fs) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    present = {p[len(path.rstrip("/")) + 1 :] for p in fs.find(path)} - {MANIFEST}
    for extra in sorted(present - set(manifest["files"])):
        problems.append(f"{extra}: not in manifest")
    return problems


class StageOutput:
    """The folder a stage run writes into, committed by `commit()`.

    Local roots: the stage writes straight into `<root>/<stage>/<fingerprint>/`.
    Remote roots: it writes into a local staging folder that `commit()` uploads.
    """

    def __init__(self, root: str, stage: str, fp: str):
        self.stage = stage
        self.fingerprint = fp
        self.url = join(root, stage, fp)
        self._staging: Path | None = None
        # Remote: the staging folder is made by prepare(), so that the runner's mere
        # `committed()` check on every cached stage leaves no empty temp folder behind.
        self.path: Path | None = None if is_remote(root) else Path(self.url)

    def committed(self) -> Artifact | None:
        return load_committed(self.url)

    def clear_uncommitted(self) -> bool:
        """Delete an interrupted, uncommitted write. Returns whether there was one."""
        fs, path = filesystem(self.url)
        if fs.exists(path) and not fs.exists(join(path, MANIFEST)):
            fs.rm(path, recursive=True)
            return True
        return False

    def prepare(self) -> Path:
        self.clear_uncommitted()
        if self.path is None:
            self._staging = self.path = Path(tempfile.mkdtemp(prefix=f"tunepipe-{self.stage}-"))
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def commit(self, stats: dict[str, Any], record: dict[str, Any]) -> Artifact:
        manifest = {"stage": self.stage, "fingerprint": self.fingerprint, "stats": stats, **record}
        commit_folder(self.path, self.url, manifest)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        return Artifact(self.stage, self.fingerprint, self.url, stats)


def commit_folder(local: Path, url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Record the sha256 of every file under `local` and commit it at `url`, manifest last.

    When `url` is `local` itself the files stay put; otherwise (another folder, or a remote
    URL) they are copied there first. Returns the manifest written.
    """
    files = {
        rel: {"sha256": sha256_file(local / rel), "bytes": (local / rel).stat().st_size}
        for rel in list_files(local)
    }
    manifest = {**manifest, "created_unix": round(time.time(), 3), "files": files}
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    same_place = not is_remote(url) and Path(url).resolve() == Path(local).resolve()
    if same_place:
        tmp = local / (MANIFEST + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, local / MANIFEST)  # atomic: the folder is committed or it is not
        return manifest
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)
    for rel in files:
        if "/" in rel:
            fs.makedirs(join(path, rel.rsplit("/", 1)[0]), exist_ok=True)
        fs.put_file(str(local / rel), join(path, rel))
    fs.pipe_file(join(path, MANIFEST), text.encode())
    return manifest
