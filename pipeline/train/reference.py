"""The reference stage (task `preference`): the frozen reference model's log-probability of every
answer, computed once and committed like any stage output.

DPO compares the policy's log-probabilities of each pair's answers with a reference model's
(the model training starts from). Peers run the reference forward inside the training job, every
run; here it is a stage keyed by the model section, the data (the tokenize parent) and
`reference_spec` (a scratch model's seed and positions, the precision), never by the training
hyperparameters: a second DPO run with another beta or learning rate reuses it.

    run(cfg.model, cfg.reference_spec, inputs={"tokenize": Path("runs/tokenize/<fp>")}, out=out, scratch=tmp)

Writes `<split>/reference_logps.npy` (float64 [pairs, 2]: chosen, rejected) for train, validation
and test, read by data/loader.py's `PreferencePairs`. It runs in this process, on the GPU when
there is one, in eval mode (no dropout), in batches of 8 pairs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import ModelConfig
from pipeline.config.pipeline import ReferenceSpec
from pipeline.data.loader import REFERENCE_LOGPS, open_split
from pipeline.train.fingerprint import library_versions, pretrained_base_content, registry_base_content

SPLITS = ("train", "validation", "test")
PAIRS_PER_BATCH = 8


def content_fingerprint(model: ModelConfig, spec: ReferenceSpec) -> dict:
    """As train's: library versions (they move the last digits) and the base's exact bytes."""
    return {**library_versions(), **registry_base_content(model), **pretrained_base_content(model)}


def run(model: ModelConfig, spec: ReferenceSpec, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    import torch

    from pipeline.train.modeling import build_model
    from pipeline.train.objectives import sequence_logps, split_batch
    from pipeline.train.precision import autocast_for

    tokenized = Path(inputs["tokenize"])
    meta = json.loads((tokenized / "meta.json").read_text())
    if meta.get("task") != "preference":
        raise ValueError(f"{tokenized}: the reference stage reads preference pairs; this tokenize output is {meta.get('task')!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The model train starts from: same weights (a scratch one from the same seed and positions).
    net = build_model(model, "causal_lm", dict(meta, block_size=meta["block_size"] + spec.extra_positions), spec.seed or 0)
    net = net.to(device).eval()
    started, stats = time.perf_counter(), {}
    for split in SPLITS:
        pairs = open_split(tokenized / split)
        logps = np.zeros((len(pairs), 2), np.float64)
        for first in range(0, len(pairs), PAIRS_PER_BATCH):
            ids = list(range(first, min(first + PAIRS_PER_BATCH, len(pairs))))
            batch = split_batch(pairs.batch(ids), "preference", device)
            with torch.no_grad(), autocast_for(spec.precision, device):  # the policy's own precision
                logits = net(**batch.inputs).logits
            row = sequence_logps(logits, batch.labels, batch.targets).double().cpu().numpy()
            logps[ids] = row.reshape(2, -1).T  # rows are the batch's chosen, then its rejected
        (out / split).mkdir()
        np.save(out / split / REFERENCE_LOGPS, logps)
        stats[split] = {
            "pairs": len(pairs),
            "mean_chosen_logp": round(float(logps[:, 0].mean()), 4) if len(pairs) else None,
            "mean_rejected_logp": round(float(logps[:, 1].mean()), 4) if len(pairs) else None,
            # How often the reference already ranks the pair right: where DPO's accuracy starts from.
            "reference_prefers_chosen": round(float((logps[:, 0] > logps[:, 1]).mean()), 4) if len(pairs) else None,
        }
        print(f"[reference] {split}: {len(pairs)} pairs scored", flush=True)
    return {"pairs": sum(s["pairs"] for s in stats.values()), "seconds": round(time.perf_counter() - started, 2),
            "device": device.type, "splits": stats}
