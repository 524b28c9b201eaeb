"""Where checkpoints live: a folder every rank sees (`LocalCheckpoints`, checkpoint.py's protocol)
or shared object storage (`RemoteCheckpoints`, s3://...) with the same guarantees.

A job requeued onto another node, or a Kubernetes pod rescheduled elsewhere, finds no local disk
of the run before it: its checkpoints must live where every node reads them. Layout under the
URL is the local one (checkpoint.py): `step_00000040/` with every rank's files and `COMPLETE`,
written last, listing the sha256 of each file.

Saving: each rank writes its own part into a private local folder (no two ranks, even two
"nodes" on one machine, share it), uploads it under `step_N/`, and writes `step_N/.parts/rank<R>.json`
with its files' sha256s; after a barrier rank 0 joins the parts into `COMPLETE`. A save killed
part-way leaves a folder without `COMPLETE`: never loaded, removed by the next save.

Resuming: rank 0 picks the newest complete checkpoint whose download matches its sha256s (a
corrupt one is named and passed over), every rank is told its step, and each downloads it (once
per machine: into a cache folder made visible by a rename) before loading it like a local one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline import artifacts
from pipeline.artifacts import sha256_file
from pipeline.train.checkpoint import (
    MARKER, PREFIX, exclusive_checkpoints, marker, newest_complete_checkpoint, newest_intact, newest_loadable_checkpoint, problems,
    save_checkpoint, step_dir, step_of, write_parts,
)
from pipeline.train.parallel.dist import DistInfo, barrier, from_main

_PARTS = ".parts"


class LocalCheckpoints:
    """A folder on a filesystem every rank sees (one machine, or NFS/Lustre across nodes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)

    def save(self, step: int, trainer_state: dict[str, Any], replica, info: DistInfo, keep_last: int) -> str:
        return str(save_checkpoint(self.root, step, trainer_state, replica, info, keep_last))

    def choose(self, info: DistInfo, log: Callable[[str], None]) -> Path | None:
        """Collective: the checkpoint rank 0 chose (checked against its sha256s), on every rank."""
        step = -1
        if info.is_main:
            found = newest_loadable_checkpoint(self.root, log)
            step = -1 if found is None else step_of(found)
        step = from_main(step, info)
        return None if step < 0 else step_dir(self.root, step)

    def newest(self) -> str:
        return str(newest_complete_checkpoint(self.root) or "none")

    def lock(self, hold: bool):
        return exclusive_checkpoints(self.root, hold)


def open_checkpoints(where: str) -> "LocalCheckpoints | RemoteCheckpoints":
    return RemoteCheckpoints(where) if artifacts.is_remote(where) else LocalCheckpoints(where)


def default_cache(url: str) -> Path:
    base = Path(os.environ.get("TUNEPIPE_CACHE", Path.home() / ".cache" / "tunepipe"))
    return base / "checkpoints" / hashlib.sha256(url.encode()).hexdigest()[:24]


class RemoteCheckpoints:
    def __init__(self, url: str, cache: Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.path = artifacts.filesystem(self.url)
        self.cache = cache or default_cache(self.url)

    def _step_url(self, step: int) -> str:
        return artifacts.join(self.path, f"{PREFIX}{step:08d}")

    def newest(self) -> str:
        steps = self.complete_steps()
        return self._step_url(steps[-1]) if steps else "none"

    def lock(self, hold: bool):
        # Guards this machine's cache; across machines only one job per fingerprint runs (the
        # train stage follows its own job and never submits a second one beside it).
        return exclusive_checkpoints(self.cache, hold)

    def complete_steps(self) -> list[int]:
        self.fs.invalidate_cache(self.path)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False, refresh=True)]
        except FileNotFoundError:
            return []
        steps = [int(n[len(PREFIX):]) for n in names if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
        return sorted(s for s in steps if self.fs.exists(artifacts.join(self._step_url(s), MARKER)))

    # ------------------------------------------------------------ save

    def save(self, step: int, trainer_state: dict[str, Any], replica, info: DistInfo, keep_last: int) -> str:
        """Collective: every rank calls it."""
        self.cache.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=f".save-{step:08d}-rank{info.rank}-", dir=self.cache))
        try:
            write_parts(private, trainer_state, replica, info)
            barrier(info)  # DeepSpeed's shards are complete only when every rank returned
            digests = {}
            for path in sorted(p for p in private.rglob("*") if p.is_file()):
                rel = path.relative_to(private).as_posix()
                digests[rel] = sha256_file(path)
                self.fs.put_file(str(path), artifacts.join(self._step_url(step), rel))
            part = json.dumps({"rank": info.rank, "files": digests}).encode()
            self.fs.pipe_file(artifacts.join(self._step_url(step), _PARTS, f"rank{info.rank}.json"), part)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        barrier(info)
        if info.is_main:
            files: dict[str, str] = {}
            for rank in range(info.world_size):
                files.update(json.loads(self.fs.cat_file(artifacts.join(self._step_url(step), _PARTS, f"rank{rank}.json")))["files"])
            self.fs.pipe_file(artifacts.join(self._step_url(step), MARKER), json.dumps(marker(step, info.world_size, files)).encode())
            self._prune(keep_last, newest=step)
        barrier(info)
        return self._step_url(step)

    def _prune(self, keep_last: int, newest: int) -> None:
        complete = self.complete_steps()
        keep = set(complete[-keep_last:])
        for name in self.fs.ls(self.path, detail=False, refresh=True):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if not base.startswith(PREFIX) or not base[len(PREFIX):].isdigit():
                continue
            step = int(base[len(PREFIX):])
            # Old complete ones beyond keep_last, and incomplete ones older than this save (a
            # killed save); never a newer incomplete one (another writer's save in progress).
            if step not in keep and step <= newest:
                self.fs.rm(name, recursive=True)

    # ------------------------------------------------------------ resume

    def fetch(self, step: int) -> Path:
        """The checkpoint of `step` in a local folder (downloaded once per machine)."""
        local = self.cache / f"{PREFIX}{step:08d}"
        if (local / MARKER).is_file() and not problems(local):
            return local
        self.cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".fetch-{step:08d}-", dir=self.cache))
        try:
            remote = self._step_url(step)
            recorded = json.loads(self.fs.cat_file(artifacts.join(remote, MARKER)))
            for rel in recorded["files"]:
                target = artifacts.inside(partial, rel, f"{remote}/{MARKER}")
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(artifacts.join(remote, rel), str(target))
            (partial / MARKER).write_text(json.dumps(recorded))
            shutil.rmtree(local, ignore_errors=True)  # a stale or corrupt copy of our own cache
            try:
                os.rename(partial, local)
            except OSError:  # another rank on this machine renamed its copy first
                pass
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return local

    def newest_loadable(self, log: Callable[[str], None]) -> int | None:
        found = reversed(self.complete_steps())
        folder = newest_intact(((self._step_url(s), lambda s=s: self.fetch(s)) for s in found), self.url, log)
        return None if folder is None else step_of(folder)

    def choose(self, info: DistInfo, log: Callable[[str], None]) -> Path | None:
        """Collective: the local folder of the checkpoint rank 0 chose, on every rank (None: start fresh)."""
        step = -1
        if info.is_main:
            found = self.newest_loadable(log)
            step = -1 if found is None else found
        step = from_main(step, info)
        return None if step < 0 else self.fetch(step)
