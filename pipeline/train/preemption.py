"""Stop requests from a cluster, honoured at a step boundary by every rank together.

Slurm sends SIGUSR1 `slurm.signal_lead_s` before a job's time limit (`--signal=USR1@<lead>`) and
SIGTERM when it preempts, cancels or requeues a job (then SIGKILL after its KillWait); Kubernetes
sends SIGTERM before evicting a pod. A rank that gets either finishes the step it is in; at the
next step boundary the ranks agree (one all-reduce), write a checkpoint together and exit with
`STOPPED_EXIT_CODE`. The requeued job resumes from that checkpoint exactly (same data position,
same RNG), so its final weights equal an uninterrupted run's.

When the stop came from SIGUSR1 (the time limit, which Slurm does not requeue by itself), rank 0
writes the file named by $TUNEPIPE_STOP_FILE; the sbatch script (cluster/slurm.py) then requeues
the job with `scontrol requeue`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from pipeline.train.parallel.dist import DistInfo, any_rank

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later (the job is requeued and resumes)
STOP_FILE_ENV = "TUNEPIPE_STOP_FILE"


class StopRequests:
    """Remembers the first stop signal; `agreed()` is the collective check at a step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> "StopRequests":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._remember)
        return self

    def _remember(self, signum: int, frame) -> None:
        # Only a flag: the step in flight (a collective) must finish on every rank first.
        if self.signal is None:
            self.signal = signum

    def agreed(self, info: DistInfo) -> bool:
        """Collective: every rank calls it once per step and gets the same answer."""
        return any_rank(self.signal is not None, info)


def announce_stop(info: DistInfo, step: int, requests: StopRequests) -> None:
    """After the checkpoint: say why the run stopped, and ask the batch script to requeue it."""
    if not info.is_main:
        return
    name = signal.Signals(requests.signal).name if requests.signal else "a signal on another rank"
    print(f"stop requested ({name}): checkpoint at step {step} written; exiting to be requeued", flush=True)
    stop_file = os.environ.get(STOP_FILE_ENV)
    # Only the time-limit warning asks for a requeue: after SIGTERM Slurm requeues the job itself
    # (preemption, scontrol requeue), or the user cancelled it and it must stay cancelled.
    if stop_file and requests.signal == signal.SIGUSR1:
        Path(stop_file).write_text(json.dumps({"step": step, "signal": name}))
