"""Reading and writing tensor files safely: no code runs on load, no half file is ever seen, and a
full disk is named as one.

    save_tensors({"model": state_dict, "step": 40}, folder / "replica.pt")
    state = load_tensors(folder / "replica.pt", map_location=device)
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import fsync


class CheckpointDiskFull(OSError):
    """No space left where a checkpoint was being written (torch.save says only 'iostream error')."""


def save_tensors(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, fsynced, then renamed; a full disk is reported as one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        fsync(tmp)
    except (OSError, RuntimeError) as e:
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from e
    os.replace(tmp, path)


def disk_full(error: BaseException, path: Path) -> CheckpointDiskFull | None:
    """The error to raise instead of `error` when it was the disk (or a quota) filling up while
    writing `path`: ENOSPC / EDQUOT, or torch's bare RuntimeError with under 1 MiB left."""
    code = getattr(error, "errno", None)
    try:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
    except OSError:
        free = None
    # torch.save reports ENOSPC as a bare RuntimeError ("iostream error", "unexpected pos"): read
    # a RuntimeError as disk full only when the disk is in fact (nearly) full.
    if code not in (errno.ENOSPC, errno.EDQUOT) and not (isinstance(error, RuntimeError) and free is not None and free < 1 << 20):
        return None
    left = f"{free:,} bytes free" if free is not None else "free space unknown"
    return CheckpointDiskFull(errno.ENOSPC, f"no space left on the device while writing checkpoint file {path} "
                              f"({left}); free some space and rerun to resume")


def load_tensors(path: Path, map_location: Any = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)
