"""Tokenize throughput: our stage against bare HF tokenizer calls and `datasets.map`.

    .venv/bin/python -m bench.tokenize            # ~120k rows; add --rows 20000 for a quick look

Generates prompt/response pairs offline (seeded pseudo-words with Zipf frequencies, lognormal
lengths: prompts ~30 words, responses ~90, long tail), trains an 8k byte-level BPE on them, saves
it as a "pretrained" tokenizer folder, and writes a preprocess-like train.parquet. Then, on the
same texts and the same tokenizer, measures tokens/s of:

  ours          tokenize.run(...) end to end: parquet in, prompt masking, EOS, concat packing,
                .npy files out (model.init=pretrained, so no tokenizer training is timed)
  bare          tokenizer(prompts[i:i+1000]) and tokenizer(responses[i:i+1000]) with the
                PreTrainedTokenizerFast __call__, texts already in memory, nothing else
  datasets.map  Dataset.map(tokenize_fn, batched=True, num_proc=2) building input_ids + masked
                labels per example, as an HF fine-tuning script would

All three count the same tokens (prompt + response + one EOS per example). Each run is a fresh
process; the methods take turns, `--repeats` rounds, and each one's best wall time is reported
(the least disturbed by other work on the machine) with the CPU seconds of that run, worker
processes included. Parallelism: ours and bare use the Rust tokenizer's thread pool (all cores),
datasets.map its 2 worker processes (with the tokenizer single-threaded in each, as datasets sets).
The last line printed is one JSON object: {"tokens_per_s", "vs_datasets_map", "vs_bare_tokenizer"}.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, this folder would come first on sys.path and this very file would shadow the
# standard library's `tokenize` module for everything imported below.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

PROMPT_TEMPLATE = "### Question:\n{}\n### Answer:\n"


def pseudo_words(rng: np.random.Generator, count: int) -> np.ndarray:
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "da", "en", "or", "al", "is", "um", "ver", "con", "pre", "ing", "ed", "ly"]
    sizes = rng.integers(1, 6, size=count)
    words = {"".join(rng.choice(syllables, size=n)) for n in sizes}
    return np.array(sorted(words))


def make_texts(rows: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, responses): Zipf-distributed pseudo-words, lognormal lengths, some punctuation."""
    rng = np.random.default_rng(seed)
    vocab = pseudo_words(rng, 30000)  # more words than the 8k vocabulary: rarer ones split into pieces, as in English
    vocab = np.concatenate([vocab, np.array([",", ".", "?", "the", "a", "of", "to", "and", "1", "42", "2024"])])
    freq = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    freq = rng.permutation(freq)
    freq /= freq.sum()
    prompt_words = np.clip(rng.lognormal(np.log(30), 0.6, rows), 3, 400).astype(np.int64)
    response_words = np.clip(rng.lognormal(np.log(90), 0.8, rows), 1, 1200).astype(np.int64)
    lengths = np.stack([prompt_words, response_words], axis=1).reshape(-1)
    words = vocab[rng.choice(len(vocab), size=int(lengths.sum()), p=freq)].tolist()
    texts, at = [], 0
    for n in lengths.tolist():
        texts.append(" ".join(words[at : at + n]))
        at += n
    return [PROMPT_TEMPLATE.format(t) for t in texts[0::2]], texts[1::2]


def prepare(work: Path, rows: int) -> None:
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.text_tokenizer import EOS, train_byte_level_bpe

    prompts, responses = make_texts(rows)
    source = work / "preprocess"
    source.mkdir()
    table = pa.table({"prompt": prompts, "response": responses, "text": [p + r for p, r in zip(prompts, responses)]})
    pq.write_table(table, source / "train.parquet")
    t0 = time.perf_counter()
    bpe = train_byte_level_bpe(table.column("text").to_pylist(), 8000)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(work / "tokenizer")
    print(f"generated {rows:,} rows; trained an 8k BPE in {time.perf_counter() - t0:.1f}s", flush=True)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (datasets.map's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def ours(source: Path, tokenizer_dir: Path, work: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401  untimed, as for the others (the stage imports lazily)

    from pipeline.data import tokenize
    from pipeline.config import build_config

    cfg = build_config({"model": {"init": "pretrained", "name": str(tokenizer_dir)}, "tokenize": {"block_size": 2048}})

    def once() -> int:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        stats = tokenize.run(cfg.tokenize, cfg.model, cfg.row_spec, inputs={"preprocess": source}, out=out, scratch=work / "scratch")
        return stats["tokens"]

    return once


def bare(tokenizer_dir: Path, prompts: list[str], responses: list[str]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def once() -> int:
        tokens = 0
        for i in range(0, len(prompts), 1000):
            p = tokenizer(prompts[i : i + 1000], add_special_tokens=False)["input_ids"]
            r = tokenizer(responses[i : i + 1000], add_special_tokens=False)["input_ids"]
            tokens += sum(map(len, p)) + sum(map(len, r)) + len(p)  # + one EOS each, as the others count
        return tokens

    return once


def datasets_map(source: Path, tokenizer_dir: Path, work: Path):
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    dataset = datasets.Dataset.from_parquet(str(source / "train.parquet"), cache_dir=str(work / "hf-cache"))

    def tokenize_fn(batch):
        p = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        r = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        ids = [a + b + [eos] for a, b in zip(p, r)]
        labels = [[-100] * len(a) + b + [eos] for a, b in zip(p, r)]
        return {"input_ids": ids, "labels": labels}

    def once() -> int:
        mapped = dataset.map(tokenize_fn, batched=True, num_proc=2, remove_columns=dataset.column_names, load_from_cache_file=False)
        return int(sum(len(x) for x in mapped["input_ids"]))

    return once


METHODS = {"ours (tokenize.run)": "ours", "bare tokenizer(batch)": "bare", "datasets.map num_proc=2": "map"}


def measure_one(method: str, work: Path) -> dict:
    """Set up one method (untimed), run it once (timed). Called in a fresh process per run: a
    process that ran datasets.map(num_proc=...) keeps TOKENIZERS_PARALLELISM=false in its C
    environment (datasets restores only Python's os.environ), which would leave every later
    tokenizer call in it single-threaded."""
    source, tokenizer_dir = work / "preprocess", work / "tokenizer"
    if method == "ours":
        once = ours(source, tokenizer_dir, work)
    elif method == "bare":
        table = pq.read_table(source / "train.parquet", columns=["prompt", "response"])
        once = bare(tokenizer_dir, table.column("prompt").to_pylist(), table.column("response").to_pylist())
    else:
        once = datasets_map(source, tokenizer_dir, work)
    cpu, t0 = cpu_seconds(), time.perf_counter()
    tokens = once()
    return {"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu, "tokens": tokens}


def measure(work: Path, repeats: int) -> dict[str, tuple[float, float, int]]:
    """name -> (best wall seconds, CPU seconds of that run, tokens). The methods take turns, so a
    burst of other work on the machine hits all of them rather than one."""
    best: dict[str, tuple[float, float, int]] = {}
    for _ in range(repeats):
        for name, method in METHODS.items():
            command = [sys.executable, "-m", "bench.tokenize", "--measure", method, "--work", str(work)]
            done = subprocess.run(command, cwd=_HERE.parent, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            if name not in best or run["wall"] < best[name][0]:
                best[name] = (run["wall"], run["cpu"], run["tokens"])
            print(f"  {name}: {run['wall']:.2f}s wall, {run['cpu']:.2f}s CPU", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=120_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", choices=sorted(METHODS.values()), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_one(args.measure, args.work)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.rows)
        results = measure(work, args.repeats)
    counts = {tokens for _, _, tokens in results.values()}
    if len(counts) != 1:
        raise SystemExit(f"token counts differ between methods: {results}")
    tokens = counts.pop()
    rate = {name: tokens / wall for name, (wall, _, _) in results.items()}
    ours_rate = rate["ours (tokenize.run)"]
    print(f"\n{args.rows:,} examples, {tokens:,} tokens, best of {args.repeats}, {os.cpu_count()} cores")
    print(f"{'method':<26}{'wall s':>8}{'CPU s':>8}{'tokens/s':>12}{'ours vs it':>12}")
    for name, (wall, cpu, _) in results.items():
        print(f"{name:<26}{wall:>8.2f}{cpu:>8.2f}{rate[name]:>12,.0f}{ours_rate / rate[name]:>11.2f}x")
    summary = {
        "tokens_per_s": round(ours_rate),
        "vs_datasets_map": round(ours_rate / rate["datasets.map num_proc=2"], 3),
        "vs_bare_tokenizer": round(ours_rate / rate["bare tokenizer(batch)"], 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
