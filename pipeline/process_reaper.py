"""End a helper process with this one, however this one ends (kill -9 included).

Python's exit hooks (`atexit`) run on a normal exit and on an exception, never on SIGKILL, and a
process stopped by a signal it does not handle skips them too. A helper started by such a hook's
owner (Prefect's temporary API server, say) then lives on, orphaned, holding its port and its
database. The watcher below needs no hook: it reads a pipe whose only writer is this process, and
the kernel closes that pipe when this process ends, by whatever means.

    from pipeline.process_reaper import end_with_this_process
    end_with_this_process(helper.pid)
"""

from __future__ import annotations

import subprocess
import sys

# The target is held as a pidfd (Linux 5.3+): a pid reused after the helper exits on its own is
# never signalled. SIGINT is ignored: Ctrl-C reaches the whole process group, and the watcher's
# job starts only once its parent is gone.
_WATCHER = """\
import os, select, signal, sys
target, grace_s = int(sys.argv[1]), float(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    handle = os.pidfd_open(target)
except (AttributeError, OSError):
    handle = None
try:
    while os.read(0, 4096):
        pass
except OSError:
    pass
def send(sig):
    try:
        signal.pidfd_send_signal(handle, sig) if handle is not None else os.kill(target, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
if send(signal.SIGTERM):
    if handle is None or not select.select([handle], [], [], grace_s)[0]:
        send(signal.SIGKILL)
"""


# Held for this process's life: a collected Popen closes its end of the pipe, and the watcher
# would take that for this process's end.
_WATCHERS: list[subprocess.Popen] = []


def end_with_this_process(pid: int, grace_s: float = 5.0) -> None:
    """Start a watcher that sends process `pid` SIGTERM (SIGKILL after `grace_s`) once this
    process has ended. The pipe's write end stays here only: Python opens it close-on-exec, so no
    later child inherits it and keeps the watcher waiting."""
    _WATCHERS.append(subprocess.Popen([sys.executable, "-c", _WATCHER, str(pid), str(grace_s)], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
