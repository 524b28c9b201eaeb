"""The Slurm launcher's cost against a local run of the same world size, on a real two-node Slurm
cluster on loopback (tests/slurm_cluster.py; needs root and Debian's slurmctld, slurmd, munge).

    python bench/slurm_vs_local.py                      # the quickstart, 2 nodes x 1 vs 1 node x 2
    python bench/slurm_vs_local.py --set train.max_steps=400

Both are `tunepipe run examples/quickstart.yaml` from a fresh workdir (every stage runs), the
first with `--set train.launcher=slurm --set train.nnodes=2 --set train.nproc_per_node=1`, the
second with `--set train.nproc_per_node=2`. The two "nodes" share this machine's cores, and the
job gets the one CPU per node the test cluster has, as the local run's workers get one thread
each. Prints both wall times, the train stage's seconds, and as the last line one JSON object:
{"slurm_s", "local_s", "slurm_over_local", "same_weights"}.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running this file puts bench/ first on sys.path, where a sibling script named like a stdlib
# module (bench/tokenize.py) would shadow it for everything imported after this line.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import hashlib
import json
import os
import subprocess
import tempfile
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from slurm_cluster import slurm_available, start_cluster  # noqa: E402


def run(root: Path, env: dict, sets: list[str]) -> tuple[float, float, str]:
    started = time.perf_counter()
    argv = [sys.executable, "-m", "pipeline.cli", "run", "examples/quickstart.yaml", "--workdir", str(root / "runs"),
            "--set", f"registry.url={root / 'registry'}", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    summary = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    train = next(s for s in summary["stages"] if s["name"] == "train")
    weights = next((root / "registry").glob("*/*/model/model.safetensors"))
    return seconds, train["seconds"], hashlib.sha256(weights.read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], help="more overrides for both runs")
    args = p.parse_args()
    reason = slurm_available()
    if reason:
        sys.exit(f"cannot start the loopback cluster: {reason}")
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-slurm-") as tmp:
        root = Path(tmp)
        cluster = start_cluster(root / "cluster")
        try:
            env = {k: v for k, v in cluster.env.items() if k != "OMP_NUM_THREADS"}
            slurm = run(root / "slurm", env, ["train.launcher=slurm", "train.nnodes=2", "train.nproc_per_node=1", *args.set])
            local = run(root / "local", {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, ["train.nproc_per_node=2", *args.set])
        finally:
            cluster.stop()
    print(f"{'run':<28}{'wall s':>8}{'train s':>9}")
    print(f"{'slurm, 2 nodes x 1':<28}{slurm[0]:>8.1f}{slurm[1]:>9.1f}")
    print(f"{'local, 1 node x 2':<28}{local[0]:>8.1f}{local[1]:>9.1f}")
    print(json.dumps({"slurm_s": round(slurm[0], 1), "local_s": round(local[0], 1),
                      "slurm_over_local": round(slurm[0] / local[0], 3), "same_weights": slurm[2] == local[2]}))


if __name__ == "__main__":
    main()
