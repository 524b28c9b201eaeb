"""Tokenize stage: tokenize the preprocessed splits and pack them into fixed-size blocks.

Run through the pipeline (`tunepipe run examples/quickstart.yaml`) or directly:

    run(cfg.tokenize, cfg.model, inputs={"preprocess": Path("runs/preprocess/<fp>")}, out=out, scratch=tmp)

Writes:
    tokenizer/                      the tokenizer, loadable with AutoTokenizer.from_pretrained
    <split>/input_ids.npy           int32 [blocks, block_size]; np.load(..., mmap_mode="r")
    <split>/labels.npy              int32 [blocks, block_size]; -100 where no loss is taken;
                                    aligned with input_ids (the model shifts them, as in HF)
    meta.json                       block size, vocab size, pad/eos ids and per-split counts

Every example becomes prompt + response + eos; a split's examples are concatenated in order
and cut into blocks ("concat" packing), so no token is truncated and only the last block pads.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from pipeline.artifacts import sha256_file
from pipeline.config import ModelConfig, TokenizeConfig
from pipeline.text_tokenizer import build_tokenizer, tokenizer_source_files

SPLITS = ("train", "validation")
IGNORE_INDEX = -100
"""The label torch's cross-entropy skips."""


def content_fingerprint(cfg: TokenizeConfig, model: ModelConfig) -> Any:
    # A pretrained tokenizer is outside our inputs: hash its files so an edited or re-downloaded
    # tokenizer never reuses tokens made by the old one. A scratch tokenizer is a function of the
    # preprocess output, which the parent fingerprint already covers.
    files = tokenizer_source_files(model)
    if files is None:
        return None
    return {f.name: sha256_file(f) for f in files}


def iter_columns(path: Path, columns: list[str], batch_size: int) -> Iterator[list[list[str]]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
        yield [batch.column(c).to_pylist() for c in columns]


def tokenize_split(path: Path, tokenizer, cfg: TokenizeConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """The split as one token stream: (input_ids, labels, examples), both arrays int32 and 1-D."""
    eos = [tokenizer.eos_token_id]
    id_parts, label_parts, examples = [], [], 0
    for prompts, responses in iter_columns(path, ["prompt", "response"], cfg.batch_size):
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        # Per example: [prompt, response, eos] lengths, flattened in stream order.
        lengths = np.array([(len(p), len(r), 1) for p, r in zip(prompt_ids, response_ids)], dtype=np.int64).reshape(-1)
        pieces = chain.from_iterable((p, r, eos) for p, r in zip(prompt_ids, response_ids))
        ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
        labels = ids.copy()
        if cfg.mask_prompt:
            is_prompt = np.repeat(np.tile([True, False, False], len(prompts)), lengths)
            labels[is_prompt] = IGNORE_INDEX
        id_parts.append(ids)
        label_parts.append(labels)
        examples += len(prompts)
    if not id_parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), 0
    return np.concatenate(id_parts), np.concatenate(label_parts), examples


def pack_into_blocks(ids: np.ndarray, labels: np.ndarray, block_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a stream into [blocks, block_size]; the last partial block is padded and its padding carries no loss."""
    blocks = -(-len(ids) // block_size)
    padding = blocks * block_size - len(ids)
    ids = np.concatenate([ids, np.full(padding, pad_id, np.int32)])
    labels = np.concatenate([labels, np.full(padding, IGNORE_INDEX, np.int32)])
    return ids.reshape(blocks, block_size), labels.reshape(blocks, block_size)


def train_texts(path: Path, batch_size: int) -> Iterator[str]:
    for (texts,) in iter_columns(path, ["text"], batch_size):
        yield from texts


def run(cfg: TokenizeConfig, model: ModelConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    source = Path(inputs["preprocess"])
    # Scratch tokenizers learn from the train split only, so validation stays unseen.
    tokenizer = build_tokenizer(model, cfg, train_texts(source / "train.parquet", cfg.batch_size))
    tokenizer.save_pretrained(out / "tokenizer")

    splits = {}
    for split in SPLITS:
        ids, labels, examples = tokenize_split(source / f"{split}.parquet", tokenizer, cfg)
        if split == "train" and len(ids) == 0:
            raise ValueError(f"{source / 'train.parquet'}: the train split has no tokens (no rows survived sampling?)")
        # Any token at all gives at least one (padded) block, so a non-empty validation split is never lost.
        block_ids, block_labels = pack_into_blocks(ids, labels, cfg.block_size, tokenizer.pad_token_id)
        (out / split).mkdir()
        np.save(out / split / "input_ids.npy", block_ids)
        np.save(out / split / "labels.npy", block_labels)
        splits[split] = {
            "blocks": len(block_ids),
            "tokens": len(ids),
            "label_tokens": int((labels != IGNORE_INDEX).sum()),
            "examples": examples,
        }

    meta = {
        "block_size": cfg.block_size,
        "vocab_size": len(tokenizer),
        "pad_id": tokenizer.pad_token_id,
        "eos_id": tokenizer.eos_token_id,
        "splits": splits,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    tokens = sum(s["tokens"] for s in splits.values())
    blocks = sum(s["blocks"] for s in splits.values())
    return {
        "tokens": tokens,
        "train_blocks": splits["train"]["blocks"],
        "validation_blocks": splits["validation"]["blocks"],
        "utilisation": round(tokens / (blocks * cfg.block_size), 4),
        "examples": sum(s["examples"] for s in splits.values()),
        "truncated": 0,  # concat packing never truncates; the key stays for other packing modes
    }
