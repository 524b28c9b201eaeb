"""Multi-node from the config, by hand: the same `tunepipe stage publish` started on two "nodes" with
`train.nnodes=2` and one rendezvous endpoint forms one world of two; the job's model is committed
once and both nodes' stages adopt it; the weights equal a local 2-process run's."""

from __future__ import annotations

import os
import subprocess

import pytest
from test_train_distributed import free_port
from tiny import REPO, cli_args, cli_command, published_weights, sha256, stage_status, summary_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_nodes_started_by_hand_from_the_config_train_one_model(tmp_path, local_two_rank_weights):
    on_two_nodes = {"train.nnodes": 2, "train.nproc_per_node": 1, "train.rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    # One intra-op thread per rank, as torchrun gives each of the local run's two workers.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(cli_command(*cli_args("stage", tmp_path / "shared", tmp_path / "reg", "publish", **on_two_nodes)),
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    joined = "".join(outs)
    assert "--nnodes=2" in joined and "--rdzv-backend=c10d" in joined
    assert "world size 2 (backend gloo" in joined
    assert "global batch = 4 micro x 1 accum x 2 ranks = 8 rows" in joined  # every rank counted
    statuses = [stage_status(summary_of(subprocess.CompletedProcess([], 0, out, ""))) for out in outs]
    assert all(s["publish"] in ("ran", "cached") for s in statuses)
    assert sha256(published_weights(tmp_path / "reg")) == local_two_rank_weights
