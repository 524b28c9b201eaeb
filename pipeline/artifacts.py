"""Content-addressed stage outputs: fingerprints, the commit protocol and verification.

A stage's output lives at `<root>/<stage>/<fingerprint>/` and exists once its `manifest.json`
(the sha256 of every file, the stage's stats, config and parents) does. It is written elsewhere
first and made visible in one atomic, exclusive step (`StageOutput`: a rename on a folder, a
conditional put of the manifest on an object store), so a reader never sees half an output, two
writers never mix, and nobody deletes a folder it did not create (levanter's cache ledger,
torchtitan's "a checkpoint is valid once its metadata exists", git's object store).

Before an output is reused its files are checked against the manifest (`check_files`); names in a
manifest are data and are validated before they touch a path (`safe_relative`, `inside`).
Roots may be local folders or fsspec URLs (s3://bucket/prefix).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from pipeline.leftovers import make_private_folder, release

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


def safe_relative(rel: str, where: str = "a manifest") -> str:
    """`rel` if it is a plain relative path; raises on an absolute path, `..`, a backslash or an empty
    part. Manifests come from storage another party may write: a name in one must never reach
    outside the folder it describes."""
    parts = str(rel).split("/")
    if not rel or str(rel).startswith(("/", "~")) or "\\" in str(rel) or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise ArtifactError(f"unsafe path {rel!r} in {where}: only plain relative paths are allowed")
    return str(rel)


def inside(root: Path, rel: str, where: str = "a manifest") -> Path:
    """`root / rel`, refused unless it stays inside `root` (symbolic links resolved)."""
    target = Path(root) / safe_relative(rel, where)
    if not target.resolve().is_relative_to(Path(root).resolve()):
        raise ArtifactError(f"{rel!r} in {where} resolves outside {root}")
    return target


def file_url(url: str, rel: str) -> str:
    """Where file `rel` of the committed folder at `url` is stored (under the manifest's root)."""
    root = manifest_root(read_json(join(url, MANIFEST)))
    return join(url, root, safe_relative(rel)) if root else join(url, safe_relative(rel))


def manifest_root(manifest: dict) -> str:
    """Where a committed folder's files sit under it: '' (beside the manifest), or the upload
    folder an object-store publish wrote them to (registry/store.py)."""
    root = manifest.get("root", "")
    return safe_relative(root, "a manifest's root") if root else ""


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
            check_files(str(local), json.loads((local / MANIFEST).read_text()), full=verify_requested())
            return local
        fs, path = filesystem(self.url)
        manifest = json.loads(fs.cat_file(join(path, MANIFEST)))
        local.parent.mkdir(parents=True, exist_ok=True)
        # Downloaded beside its place and renamed onto it: two runs sharing the cache never delete
        # each other's download, and a killed one leaves no half-made copy where a reader looks.
        partial = Path(tempfile.mkdtemp(prefix=f".{self.fingerprint[:16]}-", dir=local.parent))
        try:
            for rel, entry in manifest["files"].items():
                target = inside(partial, rel, f"{self.url}/{MANIFEST}")
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(join(path, manifest_root(manifest), rel), str(target))
                if sha256_file(target) != entry["sha256"]:
                    raise ArtifactError(f"{self.url}/{rel}: sha256 does not match its manifest")
            copy = {k: v for k, v in manifest.items() if k not in ("root", "files")}  # files: recorded anew, with times
            commit_staged(partial, local, copy, mtimes=True)  # False: another run's copy got there first
        finally:
            shutil.rmtree(partial, ignore_errors=True)
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
    """Problems with a committed folder: missing manifest, unsafe names, missing files, sha256
    mismatches, extras among its files (under the manifest's root)."""
    fs, path = filesystem(url)
    manifest_path = join(path, MANIFEST)
    if not fs.exists(manifest_path):
        return [f"{url}: no {MANIFEST} (not committed)"]
    try:
        manifest = json.loads(fs.cat_file(manifest_path))
        files = {safe_relative(rel, f"{url}/{MANIFEST}"): entry for rel, entry in manifest["files"].items()}
        base = join(path, manifest_root(manifest)) if manifest_root(manifest) else path
    except (ValueError, KeyError, TypeError, AttributeError, ArtifactError) as e:
        return [f"{url}/{MANIFEST}: unreadable ({e})"]
    problems = []
    for rel, entry in files.items():
        file_path = join(base, rel)
        if not fs.exists(file_path):
            problems.append(f"{rel}: missing")
        elif sha256_file(file_path, fs) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    present = {p[len(base.rstrip("/")) + 1 :] for p in fs.find(base)} - {MANIFEST}
    if base == path:  # other publishers' uploads (registry/store.py) are not this folder's files
        present = {p for p in present if not p.startswith(".uploads/")}
    for extra in sorted(present - set(files)):
        problems.append(f"{extra}: not in manifest")
    return problems


VERIFY_ENV = "TUNEPIPE_VERIFY"
"""Set (by `tunepipe run --verify`) to hash every file of every reused output, not only changed ones."""


def verify_requested() -> bool:
    return os.environ.get(VERIFY_ENV) == "1"


def check_files(url: str, manifest: dict[str, Any], full: bool = False) -> None:
    """Raise ArtifactError naming the first file of a committed folder that no longer matches its
    manifest: missing, another size, or (when its modification time moved, or `full`) other bytes.

    Run before a committed output is reused: a truncated, deleted or substituted file must never
    reach a downstream stage. Size and mtime are a stat per file; sha256 only where they differ."""
    fs, path = filesystem(url)
    base = join(path, manifest_root(manifest)) if manifest.get("root") else path
    advice = f"the output at {url} was changed after it was committed; delete that folder to rebuild it"
    for rel, entry in manifest["files"].items():
        file_path = join(base, safe_relative(rel, f"{url}/{MANIFEST}"))
        try:
            info = fs.info(file_path)
        except FileNotFoundError:
            raise ArtifactError(f"{file_path}: missing, though the manifest lists it; {advice}") from None
        if info["size"] != entry["bytes"]:
            raise ArtifactError(f"{file_path}: {info['size']:,} bytes, the manifest says {entry['bytes']:,}; {advice}")
        moved = not is_remote(url) and entry.get("mtime_ns") not in (None, os.stat(file_path).st_mtime_ns)
        if (full or moved) and sha256_file(file_path, fs) != entry["sha256"]:
            raise ArtifactError(f"{file_path}: sha256 differs from the manifest's; {advice}")


class StageOutput:
    """The folder a stage run writes into, made visible by `commit()` in one atomic, exclusive step.

    Local roots: the stage writes into its own `<root>/<stage>/.staging-<random>/`, beside its
    final place, and commit renames it onto `<root>/<stage>/<fingerprint>/` (`commit_staged`).
    Remote roots: it writes into a local temporary folder that commit uploads under a name of its
    own and then points a conditionally created manifest at (`commit_upload`). Either way, of two
    runs writing the same output at once, one commits and the other removes only its own files
    and reads the winner's; a killed run leaves its staging folder behind, never a half-made
    output, and a local one is removed by the next run of the stage once provably dead (its claim
    is free: pipeline/leftovers.py); no run deletes a live run's folder.
    """

    def __init__(self, root: str, stage: str, fp: str):
        self.root, self.stage, self.fingerprint = str(root), stage, fp
        self.url = join(root, stage, fp)
        self.path: Path | None = None  # made by prepare(): a cached stage's check leaves nothing behind

    def committed(self) -> Artifact | None:
        return load_committed(self.url)

    def verified(self, full: bool | None = None) -> Artifact | None:
        """The committed output, after checking its files against its manifest (`check_files`)."""
        done = self.committed()
        if done is not None:
            check_files(self.url, read_json(join(self.url, MANIFEST)), full=verify_requested() if full is None else full)
        return done

    def prepare(self) -> Path:
        if is_remote(self.root):
            self.path = Path(tempfile.mkdtemp(prefix=f"tunepipe-{self.stage}-"))
        else:
            parent = Path(self.root) / self.stage
            # Claimed while this run lives; a killed run's staging folders of this stage are
            # removed here by the next run (pipeline/leftovers.py), whatever their fingerprint.
            self.path = make_private_folder(parent, ".staging-", log=lambda line: print(f"[{self.stage}] {line}", flush=True))
        return self.path

    def abandon(self) -> None:
        """Remove this run's own staging folder (the run failed, or it was renamed into place)."""
        if self.path is not None:
            release(self.path)  # a remote root's local temporary folder has no claim: removed all the same

    def commit(self, stats: dict[str, Any], record: dict[str, Any]) -> Artifact:
        """Commit, or find that a concurrent run committed this output first; returns the committed artifact."""
        manifest = {"stage": self.stage, "fingerprint": self.fingerprint, "stats": stats, **record}
        try:
            if is_remote(self.url):
                commit_upload(self.path, self.url, manifest)
            else:
                commit_staged(self.path, Path(self.url), manifest, mtimes=True)
        finally:
            self.abandon()  # after a won rename there is nothing left to remove
        return load_committed(self.url)


def file_entries(local: Path, mtimes: bool = False) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `local` (and its modification time: the fast path of
    `check_files`, only meaningful where the files stay)."""
    files = {}
    for rel in list_files(local):
        stat = (local / rel).stat()
        files[rel] = {"sha256": sha256_file(local / rel), "bytes": stat.st_size, **({"mtime_ns": stat.st_mtime_ns} if mtimes else {})}
    return files


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') bytes to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_staged(staging: Path, final: Path, manifest: dict[str, Any], mtimes: bool = False) -> bool:
    """Write the manifest into `staging` (a folder beside `final`), make it durable, and rename it
    onto `final`. rename(2) onto a non-empty folder fails, so exactly one of several writers wins:
    False for the others (their staging folder is theirs to remove). A folder at `final` without a
    manifest is not ours to replace: refused, naming it."""
    manifest = {**manifest, "created_unix": round(time.time(), 3), "files": file_entries(staging, mtimes)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    for path in sorted(staging.rglob("*"), reverse=True):  # files, then their folders: durable before visible
        fsync(path)
    fsync(staging)
    try:
        os.rename(staging, final)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not (final / MANIFEST).exists():
            raise ArtifactError(
                f"{final} exists but holds no {MANIFEST}: not a committed folder (left by an older tunepipe, "
                "or made by hand). Nothing was deleted; remove it yourself to let it be written"
            ) from None
        return False
    fsync(final.parent)
    return True


def commit_upload(local: Path, url: str, manifest: dict[str, Any]) -> bool:
    """Upload `local` to `<url>/.uploads/<random>/`, then create `<url>/manifest.json`, naming that
    upload as its `root`, only if none exists (If-None-Match: *, s3fs's mode="create"). False when
    another writer's manifest was there first; the upload is then removed (it is ours, and no
    manifest will ever name it). Exclusive only where the store honours conditional writes (AWS
    S3, MinIO, moto); elsewhere the last manifest wins."""
    fs, path = filesystem(url)
    root = f".uploads/{uuid.uuid4().hex}"
    upload = join(path, root)
    committed = False
    try:
        files = file_entries(local)
        for rel in files:
            fs.put_file(str(local / rel), join(upload, rel))
        full = {**manifest, "root": root, "files": files, "created_unix": round(time.time(), 3)}
        try:
            fs.pipe_file(join(path, MANIFEST), json.dumps(full, indent=2, sort_keys=True, default=str).encode(), mode="create")
        except OSError as e:  # PreconditionFailed arrives as an OSError (FileExistsError, or s3fs's own)
            if not fs.exists(join(path, MANIFEST)):
                raise ArtifactError(f"could not commit {url}/{MANIFEST}: {e}") from e
            return False
        committed = True
        return True
    finally:
        if not committed:
            try:
                fs.rm(upload, recursive=True)
            except FileNotFoundError:
                pass
