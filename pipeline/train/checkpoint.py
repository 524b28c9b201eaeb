"""Resumable training checkpoints: written to a temporary folder, fsynced, renamed, then marked complete.

Layout: `<root>/step_00000040/` holding `trainer.pt` (TrainState as plain numbers and lists;
written by rank 0), whatever the replica writes for model and optimizer (`replica.pt` for DDP,
DeepSpeed's per-rank shards for ZeRO), `rng_rank<R>.pt` (each rank's own RNG states, as tensors)
and `COMPLETE` (JSON, written last: step, world size and the sha256 of every file). A folder
without `COMPLETE` is a save that was killed part-way: it is never loaded and is deleted on the
next save. A complete one is checked against its sha256s before it is loaded; a corrupt newest
checkpoint is reported by path and the run resumes from the one before it. Only the newest
`keep_last` complete checkpoints are kept; the newest complete one is never deleted.

Everything is read with `torch.load(weights_only=True)`: a checkpoint is data, and a planted
pickle in the folder must not run code on resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.train.parallel.dist import DistInfo, barrier
from pipeline.artifacts import fsync, sha256_file
from pipeline.train.tensor_files import disk_full, load_tensors, save_tensors

MARKER = "COMPLETE"
PREFIX = "step_"


class CheckpointsInUse(RuntimeError):
    """Another trainer holds the checkpoint folder: two writers would interleave their saves."""


LOCK = ".lock"


def lock_checkpoints(root: str | Path) -> int:
    """Hold an exclusive lock on the checkpoint folder for as long as this process lives (rank 0).

    flock is released by the kernel when its holder dies, however it dies, so a stale lock cannot
    outlive a killed run; a live one (an orphaned worker, a second run of the same config) stops
    this trainer before it writes anything, naming the holder. Returns the lock's descriptor."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise CheckpointsInUse(f"{root} is in use by another trainer ({holder}); wait for it to end or stop it, "
                               "then rerun to resume") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    return fd


@contextmanager
def exclusive_checkpoints(root: Path, hold: bool) -> Iterator[None]:
    """`lock_checkpoints` for the duration of the block (when `hold`; only rank 0 locks)."""
    fd = lock_checkpoints(root) if hold else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def newest_complete_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def step_of(folder: Path) -> int:
    return int(Path(folder).name[len(PREFIX):])


def problems(folder: Path) -> list[str]:
    """What is wrong with a complete checkpoint's files against the sha256s in its marker ([] if nothing)."""
    try:
        recorded = json.loads((folder / MARKER).read_text())["files"]
        if not isinstance(recorded, dict) or not recorded:
            raise ValueError("it lists no files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{folder / MARKER}: unreadable ({type(e).__name__}: {e})"]
    found = []
    for rel, digest in recorded.items():
        path = folder / rel
        if ".." in Path(rel).parts or not path.is_file():
            found.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            found.append(f"{path}: sha256 does not match the one recorded at save time")
    return found


def newest_intact(candidates: Iterable[tuple[str, Callable[[], Path]]], where: str, log: Callable[[str], None]) -> Path | None:
    """The first of `candidates` (newest first: a label, and how to get its local folder) whose
    files match their recorded sha256s; each one before it that does not is named, with what is
    wrong, and passed over (left where it is, for a look)."""
    passed_over = 0
    for label, local_folder in candidates:
        folder = local_folder()
        wrong = problems(folder)
        if not wrong:
            return folder
        passed_over += 1
        log(f"checkpoint {label} is corrupt ({'; '.join(wrong[:3])}); trying the one before it")
    if passed_over:
        log(f"no intact checkpoint in {where}: training starts again from step 0")
    return None


def newest_loadable_checkpoint(root: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint under `root` that is intact (`newest_intact`)."""
    found = reversed(complete_checkpoints(root))
    return newest_intact(((str(f), lambda f=f: f) for f in found), str(root), log)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain numbers (loadable with weights_only)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor(words, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
        "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_parts(folder: Path, trainer_state: dict[str, Any], replica, info: DistInfo) -> None:
    """This rank's part of a checkpoint: its RNG, what its replica writes, and (rank 0) the trainer state."""
    save_tensors(rng_state(), folder / f"rng_rank{info.rank}.pt")
    try:
        replica.save(folder)  # DeepSpeed writes its shards itself: its ENOSPC reads "iostream error"
    except (OSError, RuntimeError) as e:
        full = disk_full(e, folder)
        if full is None:
            raise
        raise full from e
    if info.is_main:
        save_tensors(trainer_state, folder / "trainer.pt")


def save_checkpoint(root: str | Path, step: int, trainer_state: dict[str, Any], replica, info: DistInfo, keep_last: int) -> Path:
    """Collective: every rank calls it. Rank 0 owns the folder; every rank writes its own part.
    `root` is one folder every rank sees (a shared filesystem across nodes)."""
    root = Path(root)
    final = step_dir(root, step)
    staging = root / f".tmp_{final.name}"
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(info)
    write_parts(staging, trainer_state, replica, info)
    barrier(info)
    if info.is_main:
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        digests = {p.relative_to(staging).as_posix(): sha256_file(p) for p in files}
        for path in [*files, *sorted({p.parent for p in files}, reverse=True)]:
            fsync(path)  # every byte durable before the marker says so
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder of the same step
        os.replace(staging, final)
        marker_tmp = final / (MARKER + ".tmp")
        marker_tmp.write_text(json.dumps(marker(step, info.world_size, digests)))
        fsync(marker_tmp)
        os.replace(marker_tmp, final / MARKER)
        fsync(final)
        fsync(root)
        _prune(root, keep_last)
    barrier(info)
    return final


def marker(step: int, world_size: int, digests: dict[str, str]) -> dict[str, Any]:
    return {"step": step, "world_size": world_size, "files": digests}


def _prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    keep = set(complete[-keep_last:])
    for partial in root.glob(f"{PREFIX}*"):
        if partial not in keep and not (partial / MARKER).exists():
            shutil.rmtree(partial, ignore_errors=True)
    for staging in root.glob(f".tmp_{PREFIX}*"):
        shutil.rmtree(staging, ignore_errors=True)


def checkpoint_world_size(folder: Path) -> int:
    return json.loads((Path(folder) / MARKER).read_text())["world_size"]


def load_checkpoint(folder: Path, replica, info: DistInfo) -> dict[str, Any]:
    """Restore model and optimizer into `replica`; return the trainer state.

    This rank's RNG is restored when the world size matches (at another world size there is no
    "own" state to take; the trainer reseeds every step from (seed, step, rank) anyway).
    """
    replica.load(folder)
    state = load_tensors(folder / "trainer.pt")
    rng_file = folder / f"rng_rank{info.rank}.pt"
    if checkpoint_world_size(folder) == info.world_size and rng_file.exists():
        set_rng_state(load_tensors(rng_file))
    return state
