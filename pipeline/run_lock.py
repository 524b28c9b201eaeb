"""One process at a time for one stage output: an advisory lock file that dies with its holder.

`flock` is released by the kernel when the holder exits, however it exits (kill -9 included), so
a crashed run never leaves a lock for the next one to clear by hand. It is per machine (and per
shared file system that honours flock): two machines training one config into one s3:// workdir
are not serialised by it (docs/scheduling.md says so).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO


@contextmanager
def held(path: Path, what: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock at `path` for the block; wait (saying who holds it) while another process does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            log(f"{what}: waiting for {holder}, which runs it now; its output will be reused")
            waited = time.monotonic()
            fcntl.flock(file, fcntl.LOCK_EX)
            log(f"{what}: lock acquired after {time.monotonic() - waited:.0f}s")
        say_who_holds(file, f"pid {os.getpid()} on {socket.gethostname()}")
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def say_who_holds(file: TextIO, holder: str) -> None:
    """Replace the text of a lock file its holder has locked: what a waiter prints."""
    file.seek(0)
    file.truncate()
    file.write(holder + "\n")
    file.flush()
