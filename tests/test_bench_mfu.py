"""`bench/mfu.py` in its CPU mode, tiny: it runs both trainers on both data kinds and ends with the
JSON line a reader (and the GPU run of issue 17) relies on. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import REPO

pytestmark = pytest.mark.slow


def test_the_cpu_mode_prints_both_trainers_on_both_data_kinds_as_json():
    proc = subprocess.run([sys.executable, "bench/mfu.py", "--device", "cpu", "--data", "all", "--steps", "12",
                           "--warmup-steps", "2", "--window-steps", "5"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu"
    for kind in ("packed", "padded_sft"):
        run = result[kind]
        assert run["ours_tokens_per_s"] > 0 and run["hf_tokens_per_s"] > 0
        assert run["vs_hf"] == pytest.approx(run["ours_tokens_per_s"] / run["hf_tokens_per_s"], rel=1e-2)
        assert run["ours_mfu"] is None and run["peak_flops"] is None  # no peak FLOP/s is known for a CPU
        assert run["flops_per_token"] > 0
    assert result["padded_sft"]["attention"] == "sdpa"
