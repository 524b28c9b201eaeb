"""Resumable training checkpoints: written to a temporary folder, renamed, then marked complete.

Layout: `<root>/step_00000040/` holding `trainer.pt` (step, samples_seen, loss history,
early-stopping state; written by rank 0), whatever the replica writes for model and optimizer
(`replica.pt` for DDP, DeepSpeed's per-rank shards for ZeRO), `rng_rank<R>.pt` (each rank's own
RNG states) and `COMPLETE` (JSON, written last). A folder without `COMPLETE` is a save that was
killed part-way: it is never loaded and is deleted on the next save. Only the newest
`keep_last` complete checkpoints are kept; the newest complete one is never deleted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.train.parallel.dist import DistInfo, barrier

MARKER = "COMPLETE"
_PREFIX = "step_"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def newest_complete_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, trainer_state: dict[str, Any], replica, info: DistInfo, keep_last: int) -> Path:
    """Collective: every rank calls it. Rank 0 owns the folder; every rank writes its own part."""
    root = Path(root)
    final = _step_dir(root, step)
    staging = root / f".tmp_{final.name}"
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(info)
    _atomic_torch_save(rng_state(), staging / f"rng_rank{info.rank}.pt")
    replica.save(staging)
    if info.is_main:
        _atomic_torch_save(trainer_state, staging / "trainer.pt")
    barrier(info)
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder of the same step
        os.replace(staging, final)
        marker_tmp = final / (MARKER + ".tmp")
        marker_tmp.write_text(json.dumps({"step": step, "world_size": info.world_size}))
        os.replace(marker_tmp, final / MARKER)
        _prune(root, keep_last)
    barrier(info)
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root)
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    keep = set(complete[-keep_last:])
    for partial in root.glob(f"{_PREFIX}*"):
        if partial not in keep and not (partial / MARKER).exists():
            shutil.rmtree(partial, ignore_errors=True)
    for staging in root.glob(f".tmp_{_PREFIX}*"):
        shutil.rmtree(staging, ignore_errors=True)


def checkpoint_world_size(folder: Path) -> int:
    return json.loads((Path(folder) / MARKER).read_text())["world_size"]


def load_checkpoint(folder: Path, replica, info: DistInfo) -> dict[str, Any]:
    """Restore model and optimizer into `replica`; return the trainer state.

    This rank's RNG is restored when the world size matches (at another world size there is no
    "own" state to take; the trainer reseeds every step from (seed, step, rank) anyway).
    """
    replica.load(folder)
    state = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=False)
    rng_file = folder / f"rng_rank{info.rank}.pt"
    if checkpoint_world_size(folder) == info.world_size and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
