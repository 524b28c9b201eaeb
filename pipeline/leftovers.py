"""Private folders whose leftovers the next writer clears, once their writer is provably gone.

Every writer stages under a private name and renames into place (artifacts.StageOutput, the
registry's local copies), so a killed writer never leaves a half-made output, but it does leave its
private folder: gigabytes of tokenized shards, a half-saved model, a half-pulled copy. Nothing read
those folders and nothing removed them, so every kill cost disk for good.

Each private folder gets a claim file beside it, `<folder>.claim`, created before the folder and
held with `flock` by its writer for the folder's whole life; it names the writer's host and pid.
The kernel drops the lock when the writer dies, however it dies. The next writer into the same
parent removes the leftovers whose claim nobody holds and that were made on this host, so a live
writer's folder is never touched, and neither is one on a shared file system made by another
host (whose flock this host may not see). A folder without a claim (made before claims existed,
or by hand) is never touched either.

    folder = make_private_folder(parent, ".staging-3f2a-")   # clears dead writers' leftovers first
    ...                                                       # write, then rename it into place
    release(folder)                                           # drop the claim (and the folder, if still there)
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, TextIO

CLAIM = ".claim"
# Open claims of this process, by folder: closing one would drop its lock.
_HELD: dict[Path, TextIO] = {}


def make_private_folder(parent: Path, prefix: str, log: Callable[[str], None] | None = None) -> Path:
    """A new, empty folder `parent/<prefix><random>`, claimed by this process; leftovers of dead
    writers with the same prefix are removed first (each said through `log`)."""
    parent.mkdir(parents=True, exist_ok=True)
    for gone, size in sweep(parent, prefix):
        if log is not None:
            log(f"removed {gone}, left by a writer that was killed ({size / 1e6:,.1f} MB)")
    folder = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    claim = open(_claim_of(folder), "x")  # exclusive create: the name is ours alone
    fcntl.flock(claim, fcntl.LOCK_EX)
    claim.write(f"{socket.gethostname()} {os.getpid()}\n")
    claim.flush()
    _HELD[folder] = claim
    folder.mkdir()
    return folder


def release(folder: Path) -> None:
    """Remove this process's private folder if it is still there (not renamed into place), then
    its claim; the lock goes with the claim's last close. A folder made without a claim (a
    temporary one) is just removed."""
    shutil.rmtree(folder, ignore_errors=True)
    claim = _HELD.pop(folder, None)
    try:
        os.unlink(_claim_of(folder))
    except FileNotFoundError:
        pass
    if claim is not None:
        claim.close()


def sweep(parent: Path, prefix: str) -> list[tuple[Path, int]]:
    """Remove `parent/<prefix>*` folders whose claim is free and names this host; returns each
    removed folder with its size in bytes."""
    removed = []
    host = socket.gethostname()
    for claim_path in sorted(parent.glob(f"{prefix}*{CLAIM}")):
        folder = claim_path.with_name(claim_path.name[: -len(CLAIM)])
        if folder in _HELD:
            continue
        try:
            claim = open(claim_path, "r")
        except FileNotFoundError:
            continue  # another sweeper got there first
        with claim:
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer lives
            # Empty: the writer was killed between creating its claim and writing it, or is there
            # now (it locks before writing, and this probe may have beaten it): left alone.
            if claim.read().split(" ")[0] != host:
                continue
            size = _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                try:
                    os.unlink(claim_path)
                except FileNotFoundError:
                    pass
                removed.append((folder, size))
    return removed


def _claim_of(folder: Path) -> Path:
    return folder.with_name(folder.name + CLAIM)


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
