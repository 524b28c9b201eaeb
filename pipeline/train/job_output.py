"""Inputs and outputs of a training job that the train stage does not run in its own process tree.

A Slurm job, a hand-started multi-node run or a Kubernetes pod writes its model where the train
stage (perhaps a later one, on another machine) will find it: with `--commit-output`, rank 0
writes into a staging folder and commits it under OUTPUT with a manifest (sha256 of every file)
written last, exactly like a stage output (artifacts.py). The train stage adopts only a committed
folder, so a job killed while saving never passes for a finished one. `--tokenized` may be a URL
(a committed tokenize output on S3): it is downloaded once per machine and checked.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.leftovers import make_private_folder, release

JOB_STAGE = "train-job"


class JobOutputMissing(RuntimeError):
    """A job ended (completed, by its own account) without committing a model."""


def local_input(where: str) -> Path:
    """A local folder with the committed stage output at `where` (a path, or a URL downloaded and verified)."""
    if not artifacts.is_remote(where):
        return Path(where)
    manifest = artifacts.read_json(artifacts.join(where, artifacts.MANIFEST))
    return artifacts.Artifact(manifest["stage"], manifest["fingerprint"], where).local_path()


class JobOutput:
    """Where rank 0 writes the model: OUTPUT itself, or (`commit`) a staging folder committed onto OUTPUT at the end."""

    def __init__(self, where: str, commit: bool, is_main: bool):
        self.where, self.commit_at_end, self.is_main = where, commit, is_main
        if not commit:
            self.path = Path(where)
        elif not is_main:
            self.path = Path(tempfile.gettempdir()) / "tunepipe-unused-output"  # only rank 0 writes
        elif artifacts.is_remote(where):
            self.path = Path(tempfile.mkdtemp(prefix="tunepipe-job-output-"))
        else:
            parent = Path(where).parent
            # Claimed while this rank lives: a killed job's folder is removed by the next job on this host.
            self.path = make_private_folder(parent, ".staging-output-")

    def commit(self, stats: dict[str, Any]) -> None:
        if not (self.commit_at_end and self.is_main):
            return
        manifest = {"stage": JOB_STAGE, "fingerprint": Path(self.where.rstrip("/")).parent.name, "stats": stats}
        try:
            if artifacts.is_remote(self.where):
                artifacts.commit_upload(self.path, self.where, manifest)
            else:
                artifacts.commit_staged(self.path, Path(self.where), manifest)
        finally:
            release(self.path)

    def abandon(self) -> None:
        if self.commit_at_end and self.is_main:
            release(self.path)  # a local staging folder with its claim, or a temporary one without


def committed(where: str) -> dict[str, Any] | None:
    """The manifest of a committed job output at `where`, or None."""
    url = artifacts.join(where, artifacts.MANIFEST)
    return artifacts.read_json(url) if artifacts.exists(url) else None


def adopt(where: str, out: Path) -> dict[str, Any]:
    """Put the committed job output's files into the stage's staging folder `out`; return its stats.
    Local: hard links (instant; the job's copy stays for any other adopter). Remote: a verified download."""
    if committed(where) is None:
        raise JobOutputMissing(f"the training job ended without committing a model at {where}")
    source = local_input(where) if artifacts.is_remote(where) else Path(where)
    manifest = artifacts.read_json(str(source / artifacts.MANIFEST))
    artifacts.check_files(str(source), manifest, full=True)  # a job's files, checked once before they are ours
    for rel in manifest["files"]:
        target = artifacts.inside(out, rel, f"{where}/{artifacts.MANIFEST}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(source / rel)
        except OSError:
            shutil.copy2(source / rel, target)
    return manifest["stats"]
