"""Our trainer against Hugging Face `Trainer`: real tokens per second and validation loss.

    .venv/bin/python -m bench.train_vs_hf                      # ~4 min on 2 cores
    .venv/bin/python -m bench.train_vs_hf --steps 100 --packing none --skip-max-length

Same model (the quickstart's 2-layer GPT-2, built by pipeline.train.modeling with the same seed), same
data (the quickstart's preprocessed train split, block/maximum length 256), same optimiser
(AdamW betas 0.9/0.95, weight decay off for biases and norms, clipping at 1.0, linear warmup then
cosine to lr x min_lr_ratio), batch of 8 sequences, same number of steps:

  ours             the pipeline's data stages (`run_stages` up to tokenize, cached under --workdir),
                   then `python -m pipeline.train` as a subprocess; tokens/s from its train_stats.json
  hf dynamic       transformers.Trainer, one example per row, DataCollatorForSeq2Seq padding to the
                   longest in the batch (prompt labels -100, as ours)
  hf max_length    the same, every example padded to 256

Ours runs with the opt-in `train.fast_cpu_dropout` and its defaults, among them `train.fused_activation`
(GPT-2's GELU as one kernel) and `train.cpu_matmul: auto` (oneDNN's linear layers on a non-Intel CPU with
AVX-512, where MKL runs AVX2 kernels); the data line says which matmul library ran. HF runs plain torch.

Real tokens are non-padding tokens (ours: its own count; HF: the sum of attention_mask over the
batches it trained on), over the seconds of the train loop (ours) or of the `train()` call (HF).
With `--packing concat` (default, as the quickstart) or `bins` our 8 rows each hold several whole examples, so one step sees
more examples than HF's; `--packing none` feeds ours one example per row, padded to the longest
in the batch, which is HF dynamic's exact workload. Validation loss is the per-token mean over
the label tokens of the same unpacked validation examples for every model.

Timings on a shared machine are noisy: compare runs taken at the same time. The last line printed
is one JSON object {"tokens_per_s", "vs_hf_dynamic", "vs_hf_max_length", "eval_loss", "eval_loss_hf"}.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # keep this folder off sys.path: bench/tokenize.py would shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.train import cpu_matmul  # noqa: E402
from pipeline.train.modeling import build_model  # noqa: E402
from pipeline.stages import run_stages  # noqa: E402

REPO = _HERE.parent
IGNORE_INDEX = -100


def overrides(steps: int, packing: str, block: int, batch: int) -> list[str]:
    return [
        f"tokenize.block_size={block}",
        f"tokenize.packing={packing}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={batch}",
        "train.grad_accum_steps=1",
        "train.nproc_per_node=1",
        # Only the final checkpoint, and no TensorBoard: HF runs with save_strategy="no", report_to=[].
        f"train.save_every_steps={steps}",
        "train.tensorboard=false",
        f"train.log_every_steps={max(1, steps // 5)}",
        # The opt-in CPU dropout (train/cpu_dropout.py): this bench measures the CPU recipe at its best.
        "train.fast_cpu_dropout=true",
    ]


# ---------------------------------------------------------------- examples, built like pipeline/data/tokenize.py


def causal_examples(parquet: Path, tokenizer, block: int) -> list[dict]:
    """prompt + response + eos per row, prompt labelled -100, cut to `block` keeping the start:
    what the tokenize stage builds (it also encodes prompt and response separately)."""
    table = pq.read_table(parquet, columns=["prompt", "response"])
    prompts = tokenizer(table.column("prompt").to_pylist(), add_special_tokens=False)["input_ids"]
    responses = tokenizer(table.column("response").to_pylist(), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for p, r in zip(prompts, responses):
        ids = (p + r + [eos])[:block]
        labels = ([IGNORE_INDEX] * len(p) + r + [eos])[:block]
        out.append({"input_ids": ids, "labels": labels})
    return out


@torch.no_grad()
def eval_loss(model, examples: list[dict], pad_id: int, batch: int = 16) -> float:
    """Per-token mean cross-entropy over the label tokens of unpacked examples (right-padded, masked)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in chunk])
        labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in chunk])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count


# ---------------------------------------------------------------- ours


def train_ours(config: str, sets: list[str], tokenized: Path, work: Path) -> dict:
    out, ckpt = work / "ours", work / "ours_ckpt"
    cmd = [sys.executable, "-m", "pipeline.train", "--tokenized", str(tokenized), "--config", config, "--output", str(out), "--checkpoints", str(ckpt)]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"pipeline.train.recipe failed (exit {proc.returncode}): {' '.join(cmd)}")
    stats = json.loads((out / "train_stats.json").read_text())
    stats["process_seconds"] = round(wall, 1)
    return stats


# ---------------------------------------------------------------- Hugging Face Trainer


def hf_arguments(t, output_dir: Path, **extra):
    """HF `TrainingArguments` with our train section's optimizer and schedule: AdamW betas 0.9/0.95,
    eps 1e-8, clipping, linear warmup then cosine to lr x min_lr_ratio; no checkpoints, no reports."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **extra,
    )


def train_hf(cfg, meta: dict, examples: list[dict], tokenizer, padding: str, block: int, work: Path):
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer

    class CountingTrainer(Trainer):
        real_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.real_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    t = cfg.train
    model = build_model(cfg.model, "causal_lm", meta, t.seed)  # the very weights ours starts from
    args = hf_arguments(t, work / f"hf_{padding}", logging_steps=max(1, t.max_steps // 5), use_cpu=True)
    if padding == "max_length":
        collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=block, label_pad_token_id=IGNORE_INDEX)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    trainer = CountingTrainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # its per-log print would interleave with our table
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    return model, {
        "tokens": trainer.real_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(trainer.real_tokens / seconds, 1),
        "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None,
        "train_loss": result.training_loss,
    }


# ---------------------------------------------------------------- main


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps for every trainer (default 300)")
    parser.add_argument("--packing", choices=["bins", "concat", "none"], default="concat", help="our tokenize.packing (default concat, as the quickstart)")
    parser.add_argument("--config", default="examples/quickstart.yaml")
    parser.add_argument("--workdir", default="runs", help="stage cache for the data stages (default runs)")
    parser.add_argument("--block", type=int, default=256, help="block size / HF maximum length")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--skip-max-length", action="store_true", help="leave out the slow HF max_length run")
    args = parser.parse_args()
    os.chdir(REPO)

    sets = overrides(args.steps, args.packing, args.block, args.batch)
    cfg = load_config(args.config, sets)
    results = {r.name: r for r in run_stages(cfg, args.workdir, until="tokenize", log=lambda m: None)}
    tokenized, preprocessed = Path(results["tokenize"].output), Path(results["preprocess"].output)
    meta = json.loads((tokenized / "meta.json").read_text())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenized / "tokenizer")
    tokenizer.padding_side = "right"
    train = causal_examples(preprocessed / "train.parquet", tokenizer, args.block)
    validation = causal_examples(preprocessed / "validation.parquet", tokenizer, args.block)
    # The HF side must see exactly the tokens the tokenize stage wrote, or the comparison is off.
    ours_tokens = meta["splits"]["train"]["tokens"]
    hf_tokens = sum(len(e["input_ids"]) for e in train)
    if hf_tokens != ours_tokens:
        print(f"warning: HF examples hold {hf_tokens} train tokens, the tokenize stage wrote {ours_tokens}", file=sys.stderr)
    print(f"data: {len(train)} train / {len(validation)} validation examples, {hf_tokens:,} train tokens; "
          f"ours: packing {args.packing}, {meta['splits']['train']['rows']} rows of {args.block}; {args.steps} steps x {args.batch}; "
          f"torch threads {torch.get_num_threads()}; ours' CPU matmuls: {cpu_matmul.choose(cfg.train.cpu_matmul)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="train_vs_hf_") as tmp:
        work = Path(tmp)
        ours = train_ours(args.config, sets, tokenized, work)
        ours_model = AutoModelForCausalLM.from_pretrained(work / "ours" / "model")
        ours["eval_loss"] = eval_loss(ours_model, validation, tokenizer.pad_token_id)
        print(f"ours: {ours['tokens_per_s']:,.0f} tok/s over {ours['seconds']} s", flush=True)

        runs = {}
        for padding in ["longest"] + ([] if args.skip_max_length else ["max_length"]):
            model, stats = train_hf(cfg, meta, train, tokenizer, padding, args.block, work)
            stats["eval_loss"] = eval_loss(model, validation, tokenizer.pad_token_id)
            runs[padding] = stats
            print(f"hf {padding}: {stats['tokens_per_s']:,.0f} tok/s over {stats['seconds']} s", flush=True)

    dyn, maxlen = runs["longest"], runs.get("max_length")
    rows = [
        [f"ours (packing {args.packing})", f"{ours['tokens_this_run']:,}", f"{ours['seconds']:.1f}", f"{ours['tokens_per_s']:,.0f}", "1.00", f"{ours['final_loss']:.4f}", f"{ours['eval_loss']:.4f}"],
        ["hf Trainer, dynamic padding", f"{dyn['tokens']:,}", f"{dyn['seconds']:.1f}", f"{dyn['tokens_per_s']:,.0f}", f"{ours['tokens_per_s'] / dyn['tokens_per_s']:.2f}", f"{dyn['final_loss'] or float('nan'):.4f}", f"{dyn['eval_loss']:.4f}"],
    ]
    if maxlen:
        rows.append(["hf Trainer, max_length", f"{maxlen['tokens']:,}", f"{maxlen['seconds']:.1f}", f"{maxlen['tokens_per_s']:,.0f}", f"{ours['tokens_per_s'] / maxlen['tokens_per_s']:.2f}", f"{maxlen['final_loss'] or float('nan'):.4f}", f"{maxlen['eval_loss']:.4f}"])
    print()
    print(table(rows, ["trainer", "real tokens", "seconds", "tok/s", "ours / this", "last train loss", "eval loss"]))
    print(f"\nin {args.steps} steps of {args.batch} rows ours trained on {ours['tokens_this_run'] / dyn['tokens']:.2f}x the real tokens HF did"
          + (" (packed rows hold several examples: compare eval loss with that in mind; --packing none is the same workload)" if args.packing != "none" else ""))
    print(f"(ours ran {ours['process_seconds']} s as a process, model building and saving included; eval loss: "
          f"per-token mean over {sum(sum(1 for x in e['labels'][1:] if x != IGNORE_INDEX) for e in validation):,} label tokens "
          f"of {len(validation)} unpacked validation examples)")
    summary = {
        "tokens_per_s": ours["tokens_per_s"],
        "vs_hf_dynamic": round(ours["tokens_per_s"] / dyn["tokens_per_s"], 3),
        "vs_hf_max_length": round(ours["tokens_per_s"] / maxlen["tokens_per_s"], 3) if maxlen else None,
        "eval_loss": round(ours["eval_loss"], 4),
        "eval_loss_hf": round(dyn["eval_loss"], 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
