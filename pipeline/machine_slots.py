"""At most N holders at once on one machine: slots that free themselves when their holder dies.

The train stages of `tunepipe run`s on one machine queue for `train.max_concurrent` slots. With a
Prefect server, a global concurrency limit does this across machines. Without one, every run
starts its own temporary server over the SQLite database in PREFECT_HOME, and that server keeps
its leases in memory and never runs the service that expires them: a run killed while training
(kill -9, the OOM killer, a closed laptop) left its slot taken in the database for good, and every
later run queued behind it forever. Here each slot is a file held with `flock`, which the kernel
releases when its holder exits, however it exits.

    with take_slot(Path("~/.prefect/tunepipe/train-slots/tunepipe").expanduser(), 1, "run tiny-3f2a"):
        train()
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, TextIO

from pipeline.run_lock import say_who_holds

POLL_S = 1.0


@contextmanager
def take_slot(folder: Path, count: int, holder: str, log: Callable[[str], None] = print,
              poll_s: float = POLL_S) -> Iterator[None]:
    """Hold one of the slots in `folder` for the block, waiting while `count` or more are held
    (by holders whose own `count` may differ: each waits until fewer than its own are taken).
    `holder` says who this is, for the message of whoever waits behind it."""
    folder.mkdir(parents=True, exist_ok=True)
    waited, said = None, None
    while True:
        slot, holders = _try_take(folder, count)
        if slot is not None:
            break
        message = f"train slot: {len(holders)} of {count} taken, by {'; '.join(holders)}; queued until one frees"
        if message != said:  # said again only when the holders change
            log(message)
            said = message
        waited = waited or time.monotonic()
        time.sleep(poll_s)
    with slot:
        if waited is not None:
            log(f"train slot: taken after {time.monotonic() - waited:.0f}s in the queue")
        say_who_holds(slot, f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since {datetime.now():%H:%M:%S})")
        try:
            yield
        finally:
            slot.truncate(0)
            fcntl.flock(slot, fcntl.LOCK_UN)


def _try_take(folder: Path, count: int) -> tuple[TextIO | None, list[str]]:
    """Under the folder's admission lock (so two runs never both see the last free slot): the
    first free slot file, locked, if fewer than `count` are held; else None and who holds them.
    Slot files are never deleted: their number is bounded by the largest `count` ever asked for."""
    with open(folder / "admission.lock", "a+") as admission:
        fcntl.flock(admission, fcntl.LOCK_EX)
        opened: list[TextIO] = []
        free, holders, index = None, [], 0
        try:
            # Every existing slot, then a new one only if it could be taken.
            while (path := folder / f"slot-{index}.lock").exists() or (free is None and len(holders) < count):
                file = open(path, "a+")
                opened.append(file)
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.seek(0)
                    holders.append(file.read().strip() or "a process starting up")
                else:
                    free = free or file
                index += 1
        finally:
            take = free if free is not None and len(holders) < count else None
            for file in opened:
                if file is not take:
                    file.close()  # closing frees the probe's lock
        return take, holders
