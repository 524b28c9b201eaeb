"""Model FLOPs utilisation of our trainer, and its tokens/s against Hugging Face `Trainer`, in one run.

    .venv/bin/python bench/mfu.py --device cuda --data all --compare-compile   # one H100/H200, a few minutes
    .venv/bin/python bench/mfu.py --device cpu --data all                      # tiny model, ~2-3 min on 2 cores

GPU: GPT-2 small (12 layers x 768, 12 heads), block 1024, micro-batch 16, vocabulary 50,257 (50,304
after our `model.vocab_multiple` padding), bf16 autocast over fp32 weights, dropout 0, 60 steps.
CPU: a tiny GPT-2 (2 layers x 64, 2 heads), block 256, micro-batch 8, vocabulary 2,000, fp32, 40
steps; MFU is then null (no peak FLOP/s is known for a CPU), the ratio to HF is printed all the same.

Both trainers get the same model (`build_model`, same config, seed and attention kernel), the same
optimiser (fused AdamW, betas 0.9/0.95, clipping at 1.0, warmup then cosine) and the same steps.
Synthetic data, no tokenizer (`--data`):

  packed      full blocks of random tokens, every token a target: ours reads them as `concat`
              blocks, HF as one block per row. The MFU number.
  padded_sft  SFT examples of uniform random length (block/16 .. block), the first 10-50 % a prompt
              (labels -100). Ours: `bins` packing (whole examples per block, positions restarting
              at 0, attention kept inside each example). HF: one example per row, padded to the
              longest of its batch, as DataCollatorForSeq2Seq does (bench/train_vs_hf.py "hf dynamic").

Throughput counts real tokens (not padding) per second in the steady state: the log windows of
`--window-steps` steps that start at or after `--warmup-steps` (first steps, compilation and CUDA
warm-up excluded; the final checkpoint write falls outside every window). Ours: the median of the
`tok/s` its log lines report per window; HF: the median over the same windows, timed by a callback
that waits for the GPU at each window's end as our log line does. Ours runs eager by default;
`--compile` sets train.compile=true; `--compare-compile` runs both and reports the faster as ours
(named in "ours_config"; both under "ours_runs").

    MFU = flops per token x tokens/s / peak dense bf16 FLOP/s (989 TFLOP/s for H100 and H200)
    flops per token = 6 N + 12 L T d

N the parameters in matmuls (all but the input embeddings; GPT-2's output head counts though it
shares the token embedding's weight), L layers, T the block, d the width: the trainer's own
formula (pipeline.train.observe.flops_per_token), printed as "flops_per_token" (GPT-2 small:
855 MFLOP a token, so 40 % MFU is 463k tokens/s on 989 TFLOP/s). On padded_sft T is the block for
both trainers, though attention there spans only each example: compare tokens/s there, not MFU.

Targets, judged on one H100/H200: ours >= 40 % MFU (packed), and >= 3x HF Trainer's real tokens/s
on padded_sft. Timings on a shared machine are noisy: compare numbers taken in the same run. The
last line printed is one JSON object (with `--data all`, one object per data kind under "packed"
and "padded_sft").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # keep this folder off sys.path: bench/tokenize.py would shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


def _hide_gpus_for_cpu_mode(argv: list[str]) -> None:
    # The trainer picks its device itself (CUDA whenever torch sees a GPU: parallel/dist.py), so
    # CPU mode must hide the GPUs before torch is imported and initialises CUDA.
    if "--device=cpu" in argv or any(a == "--device" and b == "cpu" for a, b in zip(argv, argv[1:])):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


if __name__ == "__main__":
    _hide_gpus_for_cpu_mode(sys.argv[1:])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.train_vs_hf import hf_arguments, table  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.packing import IGNORE_INDEX, Ragged, offsets_of, pack_bins, pack_concat  # noqa: E402
from pipeline.train import recipe  # noqa: E402
from pipeline.train.modeling import attention_kernel, build_model  # noqa: E402
from pipeline.train.observe import flops_per_token, human_bytes, peak_flops  # noqa: E402

PAD_ID = 0
"""Padding id (and eos). Synthetic tokens are drawn from 1 up: the `bins` loader tells padding from
tokens by (id pad, label -100, position 0), which an unlabelled first prompt token could also be."""


@dataclass(frozen=True)
class Shape:
    """Model and run size for one device kind."""

    layers: int
    width: int
    heads: int
    block: int
    batch: int
    vocab: int
    steps: int
    warmup_steps: int
    precision: str


GPU_SHAPE = Shape(layers=12, width=768, heads=12, block=1024, batch=16, vocab=50257, steps=60, warmup_steps=10, precision="bf16")
CPU_SHAPE = Shape(layers=2, width=64, heads=2, block=256, batch=8, vocab=2000, steps=40, warmup_steps=10, precision="fp32")


# ---------------------------------------------------------------- synthetic tokenize outputs


def write_tokenized(folder: Path, packing: str, arrays: dict[str, np.ndarray], shape: Shape, tokens: int) -> dict:
    """A committed tokenize output as the trainer reads it (pipeline/data/loader.py): meta.json and
    train/*.npy. The tokenizer folder stays empty: the trainer only copies it next to the model."""
    (folder / "train").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    for name, values in arrays.items():
        np.save(folder / "train" / f"{name}.npy", values)
    rows = len(arrays["input_ids"])
    meta = {"task": "causal_lm", "packing": packing, "block_size": shape.block, "vocab_size": shape.vocab,
            "pad_id": PAD_ID, "eos_id": PAD_ID, "splits": {"train": {"tokens": tokens, "rows": rows}}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def packed_data(folder: Path, shape: Shape, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """Full blocks of random tokens, one per sample the run draws: (meta, the same blocks as HF rows)."""
    rows = shape.steps * shape.batch
    ids = rng.integers(1, shape.vocab, size=(rows, shape.block), dtype=np.int32)
    examples = Ragged(ids.reshape(-1), ids.reshape(-1), offsets_of(np.full(rows, shape.block)))
    blocks, labels = pack_concat(examples, shape.block, PAD_ID)
    meta = write_tokenized(folder, "concat", {"input_ids": blocks, "labels": labels}, shape, ids.size)
    return meta, [{"input_ids": row.astype(np.int64), "labels": row.astype(np.int64)} for row in ids]


def sft_examples(shape: Shape, rng: np.random.Generator) -> Ragged:
    """Enough random examples (lengths uniform in block/16 .. block, the first 10-50 % a prompt
    without labels) to fill every block our trainer draws, and more than HF's rows."""
    shortest = max(2, shape.block // 16)
    mean = (shortest + shape.block) / 2
    count = int(1.1 * shape.steps * shape.batch * shape.block / mean) + 1
    lengths = rng.integers(shortest, shape.block + 1, size=count)
    offsets = offsets_of(lengths)
    ids = rng.integers(1, shape.vocab, size=int(offsets[-1]), dtype=np.int32)
    labels = ids.copy()
    prompts = (lengths * rng.uniform(0.1, 0.5, size=count)).astype(np.int64)
    in_prompt = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths) < np.repeat(prompts, lengths)
    labels[in_prompt] = IGNORE_INDEX
    return Ragged(ids, labels, offsets)


def padded_sft_data(folder: Path, shape: Shape, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """The same examples as `bins` blocks for ours and one per row for HF: (meta, HF rows)."""
    examples = sft_examples(shape, rng)
    ids, labels, positions = pack_bins(examples, shape.block, PAD_ID)
    meta = write_tokenized(folder, "bins", {"input_ids": ids, "labels": labels, "position_ids": positions}, shape, len(examples.ids))
    bounds = zip(examples.offsets[:-1], examples.offsets[1:])
    rows = [{"input_ids": examples.ids[a:b].astype(np.int64), "labels": examples.labels[a:b].astype(np.int64)} for a, b in bounds]
    return meta, rows


DATA = {"packed": packed_data, "padded_sft": padded_sft_data}


# ---------------------------------------------------------------- the runs' common parts


def trainer_overrides(shape: Shape, attention: str, window: int) -> list[str]:
    """The config of both trainers, as our trainer's `--set` overrides."""
    return [
        f"model.n_layer={shape.layers}", f"model.n_embd={shape.width}", f"model.n_head={shape.heads}",
        "model.dropout=0.0", f"model.attn_implementation={attention}",
        f"train.precision={shape.precision}", f"train.max_steps={shape.steps}", f"train.micro_batch_size={shape.batch}",
        "train.grad_accum_steps=1", "train.nproc_per_node=1", "train.lr=6e-4", f"train.warmup_steps={shape.warmup_steps}",
        # One checkpoint, written after the last log window; no TensorBoard (HF: save_strategy "no", report_to []).
        f"train.save_every_steps={shape.steps}", "train.keep_last_checkpoints=1", "train.tensorboard=false",
        f"train.log_every_steps={window}",
    ]


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    # On CPU the only peak there is, ru_maxrss, is the whole process's since it started: shared by
    # every run of this bench, it cannot tell them apart.
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def steady_windows(marks: list[tuple[int, float, int]], warmup_steps: int) -> list[float]:
    """Tokens/s of each window between consecutive (step, seconds, tokens so far) marks that starts
    at or after `warmup_steps`."""
    return [(n1 - n0) / (t1 - t0) for (s0, t0, n0), (_, t1, n1) in zip(marks, marks[1:]) if s0 >= warmup_steps]


# ---------------------------------------------------------------- ours


LOG_LINE = re.compile(r"^step (\d+)/\d+ .* tok/s ([\d,]+)", re.MULTILINE)


def logged_windows(log: str, warmup_steps: int) -> list[float]:
    """Tokens/s of the log windows (train/observe.py Monitor.step: real tokens since the previous
    log line over its seconds) that start at or after `warmup_steps`."""
    rates, start = [], 0
    for match in LOG_LINE.finditer(log):
        end, rate = int(match[1]), float(match[2].replace(",", ""))
        if start >= warmup_steps:
            rates.append(rate)
        start = end
    return rates


def run_ours(tokenized: Path, work: Path, sets: list[str], shape: Shape, device: torch.device) -> dict:
    """Our trainer in this process (`pipeline.train.recipe.main`, as `python -m pipeline.train` runs it)."""
    argv = ["--tokenized", str(tokenized), "--output", str(work / "out"), "--checkpoints", str(work / "ckpt")]
    for override in sets:
        argv += ["--set", override]
    log = io.StringIO()
    # The recipe turns SIGTERM into "checkpoint and stop at the next step"; afterwards this bench
    # must stay killable as usual.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    reset_peak_memory(device)
    try:
        with contextlib.redirect_stdout(log):
            code = recipe.main(argv)
    except BaseException:
        sys.stderr.write(log.getvalue()[-4000:])
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if code != 0:
        sys.stderr.write(log.getvalue()[-4000:])
        raise SystemExit(f"our trainer exited {code}")
    memory = peak_memory(device)
    # A compiled model's cached graphs would keep its weights alive into the next run's peak memory.
    torch.compiler.reset()
    windows = logged_windows(log.getvalue(), shape.warmup_steps)
    if not windows:
        raise SystemExit(f"no 'step N/M ... tok/s' log line of our trainer after step {shape.warmup_steps}: has its log format changed?")
    return {"windows": windows, "tokens_per_s": statistics.median(windows), "peak_memory_bytes": memory}


# ---------------------------------------------------------------- Hugging Face Trainer


def pad_to_longest(rows: list[dict]) -> dict[str, torch.Tensor]:
    """What DataCollatorForSeq2Seq(padding="longest", label_pad_token_id=-100) returns, without a
    tokenizer: right-padded ids, labels -100 and attention mask 0 on padding. Plain tensor copies,
    cheaper than the tokenizer's `pad`: if anything, this flatters HF."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.from_numpy(row["input_ids"])
        labels[i, :n] = torch.from_numpy(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def window_clock(device: torch.device, window: int, max_steps: int):
    """A TrainerCallback marking (step, seconds, real tokens so far) at the end of every window of
    steps, as our trainer's log lines do. It waits for the GPU there (our log line does as well),
    so a window's seconds hold its work and not only the launching of it."""
    from transformers import TrainerCallback

    class WindowClock(TrainerCallback):
        def __init__(self):
            self.tokens = 0
            self.marks: list[tuple[int, float, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((0, time.perf_counter(), 0))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % window == 0 or state.global_step == max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.marks.append((state.global_step, time.perf_counter(), self.tokens))

    return WindowClock()


def run_hf(sets: list[str], meta: dict, rows: list[dict], shape: Shape, device: torch.device, work: Path, window: int) -> dict:
    """transformers.Trainer on the same model, optimiser settings and steps; real tokens counted per step."""
    from transformers import PrinterCallback, Trainer

    cfg = load_config(None, sets)
    t = cfg.train
    clock = window_clock(device, window, t.max_steps)

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    # The same call our trainer makes: the same weights, attention kernel and padded vocabulary
    # (50,257 -> 50,304 by model.vocab_multiple), so both models have exactly the same size.
    model = build_model(cfg.model, "causal_lm", meta, t.seed, attention=attention_kernel(cfg.model, device, t.precision))
    args = hf_arguments(
        t, work / "hf", optim="adamw_torch_fused", logging_steps=window, use_cpu=device.type == "cpu", torch_compile=False,
        bf16=shape.precision == "bf16",
        tf32=True if device.type == "cuda" else None,  # as our trainer sets it for what autocast leaves in fp32
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=rows, data_collator=pad_to_longest, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # its per-log print would interleave with the table
    reset_peak_memory(device)
    trainer.train()
    memory = peak_memory(device)
    windows = steady_windows(clock.marks, shape.warmup_steps)
    del trainer, model
    return {"windows": windows, "tokens_per_s": statistics.median(windows), "peak_memory_bytes": memory}


# ---------------------------------------------------------------- one data kind


def ours_configurations(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(label, train.compile) of each run of our trainer."""
    if args.compare_compile:
        return [("eager", False), ("compiled", True)]
    return [("compiled", True)] if args.compile else [("eager", False)]


def measure(kind: str, shape: Shape, device: torch.device, args: argparse.Namespace, work: Path) -> tuple[dict, list[list[str]]]:
    """Ours (each configuration) then HF on one data kind: (its JSON object, its table rows)."""
    tokenized = work / kind / "tokenized"
    meta, hf_rows = DATA[kind](tokenized, shape, np.random.default_rng(0))
    sets = trainer_overrides(shape, args.attn, args.window_steps)
    cfg = load_config(None, sets)
    kernel = attention_kernel(cfg.model, device, cfg.train.precision)
    ours = {}
    for label, compiled in ours_configurations(args):
        print(f"[{kind}] ours ({label}, attention {kernel}) ...", file=sys.stderr, flush=True)
        ours[label] = run_ours(tokenized, work / kind / label, sets + [f"train.compile={str(compiled).lower()}"], shape, device)
    print(f"[{kind}] hf Trainer (attention {kernel}) ...", file=sys.stderr, flush=True)
    hf = run_hf(sets, meta, hf_rows, shape, device, work / kind, args.window_steps)
    flops = flops_per_token(build_model(cfg.model, "causal_lm", meta, cfg.train.seed), shape.block)
    return summarise(kind, kernel, Rates(flops, peak_flops(device), hf["tokens_per_s"]), ours, hf)


@dataclass(frozen=True)
class Rates:
    """Turns a tokens/s into MFU and into a ratio to HF's tokens/s."""

    flops_per_token: float
    peak_flops: float | None
    hf_tokens_per_s: float

    def mfu(self, tokens_per_s: float) -> float | None:
        return round(self.flops_per_token * tokens_per_s / self.peak_flops, 4) if self.peak_flops else None

    def vs_hf(self, tokens_per_s: float) -> float:
        return round(tokens_per_s / self.hf_tokens_per_s, 3)


def summarise(kind: str, kernel: str, rates: Rates, ours: dict[str, dict], hf: dict) -> tuple[dict, list[list[str]]]:
    # With --compare-compile the faster configuration stands for ours, named in ours_config; both are in ours_runs.
    best = max(ours, key=lambda label: ours[label]["tokens_per_s"])
    result = {
        "data": kind,
        "attention": kernel,
        "ours_config": best,
        "ours_tokens_per_s": round(ours[best]["tokens_per_s"], 1),
        "ours_mfu": rates.mfu(ours[best]["tokens_per_s"]),
        "hf_tokens_per_s": round(hf["tokens_per_s"], 1),
        "hf_mfu": rates.mfu(hf["tokens_per_s"]),
        "vs_hf": rates.vs_hf(ours[best]["tokens_per_s"]),
        "flops_per_token": rates.flops_per_token,
        "peak_flops": rates.peak_flops,
        "ours_peak_memory_bytes": ours[best]["peak_memory_bytes"],
        "hf_peak_memory_bytes": hf["peak_memory_bytes"],
        "timed_windows": len(hf["windows"]),
    }
    if len(ours) > 1:
        result["ours_runs"] = {label: {"tokens_per_s": round(run["tokens_per_s"], 1), "mfu": rates.mfu(run["tokens_per_s"]),
                                       "vs_hf": rates.vs_hf(run["tokens_per_s"]), "peak_memory_bytes": run["peak_memory_bytes"]}
                               for label, run in ours.items()}
    runs = [(f"ours ({label})", run) for label, run in ours.items()] + [("hf Trainer", hf)]
    rows = [[kind, name, f"{run['tokens_per_s']:,.0f}", percent(rates.mfu(run["tokens_per_s"])),
             memory_text(run["peak_memory_bytes"]), f"{rates.vs_hf(run['tokens_per_s']):.2f}x"] for name, run in runs]
    return result, rows


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def memory_text(value: int | None) -> str:
    return "-" if value is None else human_bytes(value)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if available")
    parser.add_argument("--data", choices=["packed", "padded_sft", "all"], default="packed")
    parser.add_argument("--steps", type=int, help="optimizer steps of every run (default 60 on GPU, 40 on CPU)")
    parser.add_argument("--warmup-steps", type=int, help="steps left out of the timing (default 10)")
    parser.add_argument("--window-steps", type=int, default=10, help="steps per timed window (our train.log_every_steps)")
    parser.add_argument("--batch", type=int, help="micro-batch rows (default 16 on GPU, 8 on CPU)")
    parser.add_argument("--attn", choices=["auto", "sdpa", "eager", "flash_attention_2"], default="auto",
                        help="model.attn_implementation of both trainers (auto: flash_attention_2 where installed on a GPU, else sdpa)")
    parser.add_argument("--compile", action="store_true", help="our trainer with train.compile=true")
    parser.add_argument("--compare-compile", action="store_true", help="run ours eager and compiled; the faster is reported as ours")
    return parser.parse_args()


def chosen_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def shape_for(device: torch.device, args: argparse.Namespace) -> Shape:
    shape = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    chosen = {"steps": args.steps, "warmup_steps": args.warmup_steps, "batch": args.batch}
    shape = replace(shape, **{k: v for k, v in chosen.items() if v is not None})
    if shape.steps < shape.warmup_steps + args.window_steps:
        raise SystemExit(f"--steps {shape.steps}: no timed window after {shape.warmup_steps} warm-up steps of windows of {args.window_steps}")
    return shape


def main() -> None:
    args = parse_args()
    device = chosen_device(args.device)
    shape = shape_for(device, args)
    kinds = list(DATA) if args.data == "all" else [args.data]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; GPT-2 {shape.layers} x {shape.width} ({shape.heads} heads), block {shape.block}, "
          f"micro-batch {shape.batch}, vocabulary {shape.vocab}, {shape.precision}; {shape.steps} steps, "
          f"timed from step {shape.warmup_steps} in windows of {args.window_steps}; torch threads {torch.get_num_threads()}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_mfu_") as tmp:
        measured = {kind: measure(kind, shape, device, args, Path(tmp)) for kind in kinds}
    results = {kind: result for kind, (result, _) in measured.items()}
    rows = [row for _, kind_rows in measured.values() for row in kind_rows]
    print()
    print(table(rows, ["data", "run", "real tok/s", "MFU", "peak memory", "vs HF"]))
    print(f"\n(steady state: median of {next(iter(results.values()))['timed_windows']} windows per run; "
          f"{time.perf_counter() - start:.0f} s in all)")
    header = {"device": device.type, "device_name": name, "steps": shape.steps, "warmup_steps": shape.warmup_steps}
    if len(results) == 1:
        print(json.dumps({**header, **results[kinds[0]]}))
    else:
        print(json.dumps({**header, **results}))


if __name__ == "__main__":
    main()
