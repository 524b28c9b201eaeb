"""Tokenize stage: tokenize the preprocessed splits and lay them out for the trainer.

Run through the pipeline (`tunepipe stage tokenize examples/quickstart.yaml`) or directly:

    run(cfg.tokenize, cfg.model, cfg.row_spec, inputs={"preprocess": Path("runs/preprocess/<fp>")}, out=out, scratch=tmp)

Writes `tokenizer/` (AutoTokenizer-loadable, with its chat template for chat data), `meta.json`
(block_size, packing, task, vocab_size, pad_id, eos_id, per-split stats, label_names) and, per
split (train, validation, test; a missing split file is an empty split):

    causal_lm, packing concat   input_ids.npy, labels.npy              int32 [rows, block_size]
    causal_lm, packing bins     + position_ids.npy                     int32 [rows, block_size]
    causal_lm, packing none     input_ids.npy, labels.npy flat int32, offsets.npy int64 [examples + 1]
    classification              input_ids.npy flat, offsets.npy, class_ids.npy int64 [examples]
    seq2seq                     input_ids.npy, offsets.npy (source), target_ids.npy, target_offsets.npy
    preference                  input_ids.npy, labels.npy flat, offsets.npy [2 x pairs + 1] (data/preference.py)

Labels are aligned with input_ids (the model shifts them, as in HF); -100 takes no loss.
A causal example is prompt + response + eos, the prompt labelled -100 with `mask_prompt`; a chat
example is the conversation rendered by the chat template (no eos added: the template's own
end-of-turn marker ends it), only assistant turns and their end markers labelled.
A classification text or seq2seq source carries the tokenizer's own special tokens, as
`tokenizer(text)` would add them: [CLS] text [SEP] for BERT, text </s> for T5, none for GPT-2 or a
scratch tokenizer. A seq2seq target gets them too, or eos where the tokenizer adds nothing at the
end (the model must learn where to stop). Truncation cuts the text and keeps those markers.

Speed: texts go to the Rust tokenizer in large batches (`text_tokenizer.encode_flat`), which
encodes them on all cores; everything after that is whole-array numpy, no per-token Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from pipeline.artifacts import sha256_file
from pipeline.config import ModelConfig, RowSpec, TokenizeConfig
from pipeline.data import preference_tokens
from pipeline.data.packing import IGNORE_INDEX, Ragged, concatenate, interleave, offsets_of, pack_bins, pack_concat, select, split_stats, truncate
from pipeline.data.text_tokenizer import (
    build_tokenizer,
    chat_examples,
    encode_flat,
    fast_encoder,
    set_tokenizer_threads,
    special_affixes,
    tokenizer_source_files,
)

SPLITS = ("train", "validation", "test")
NO_SPECIALS: tuple[list[int], list[int]] = ([], [])
"""(ids before, ids after) each text: what a tokenizer without a post-processor adds."""
ENCODE_ROWS = 8192
"""Rows read and encoded per batch at least: large batches keep the Rust thread pool busy and
amortise the per-call cost; memory per batch stays a few MB."""


def content_fingerprint(cfg: TokenizeConfig, model: ModelConfig, spec: RowSpec) -> Any:
    # A pretrained tokenizer is outside our inputs: hash its files so an edited or re-downloaded
    # tokenizer (or its chat template) never reuses tokens made by the old one. A scratch tokenizer
    # is a function of the preprocess output, which the parent fingerprint already covers.
    files = tokenizer_source_files(model)
    if files is None:
        return None
    return {f.name: sha256_file(f) for f in files}


# ---------------------------------------------------------------- reading


def iter_columns(path: Path, columns: list[str], rows: int) -> Iterator[tuple[int, list[list]]]:
    """(first row, [column values]) batches of a split file; a missing file is an empty split."""
    if not path.exists():
        return
    file = pq.ParquetFile(path)
    missing = [c for c in columns if c not in file.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {file.schema_arrow.names}")
    first = 0
    for batch in file.iter_batches(batch_size=rows, columns=columns):
        yield first, [batch.column(c).to_pylist() for c in columns]
        first += batch.num_rows


def read_column(path: Path, column: str) -> list:
    return [v for _, (values,) in iter_columns(path, [column], 1 << 16) for v in values]


# ---------------------------------------------------------------- tokenizing, per task


def causal_examples(path: Path, encoder, eos_id: int, cfg: TokenizeConfig) -> Ragged:
    """prompt + response + eos per row; prompt labels -100 when cfg.mask_prompt."""
    pieces = []
    for _, (prompts, responses) in iter_columns(path, ["prompt", "response"], max(cfg.batch_size, ENCODE_ROWS)):
        prompt = encode_flat(encoder, prompts)
        response = encode_flat(encoder, responses)
        ends = (np.full(len(prompts), eos_id, np.int32), np.ones(len(prompts), np.int64))
        ids, offsets, part = interleave([prompt, response, ends])
        labels = np.where(part == 0, IGNORE_INDEX, ids).astype(np.int32) if cfg.mask_prompt else ids.copy()
        pieces.append(Ragged(ids, labels, offsets))
    return concatenate(pieces)


def chat_split(path: Path, tokenizer, encoder, cfg: TokenizeConfig) -> Ragged:
    pieces = []
    for first, (messages,) in iter_columns(path, ["messages"], cfg.batch_size):
        conversations = [json.loads(m) for m in messages]
        ids, labels, lengths = chat_examples(tokenizer, encoder, conversations, cfg.mask_prompt, first)
        pieces.append(Ragged(ids, labels, offsets_of(lengths)))
    return concatenate(pieces)


def text_examples(path: Path, column: str, encoder, cfg: TokenizeConfig) -> Ragged:
    """One column's texts, no special tokens. Labels are the ids: these tasks carry no token labels."""
    pieces = []
    for _, (texts,) in iter_columns(path, [column], max(cfg.batch_size, ENCODE_ROWS)):
        ids, lengths = encode_flat(encoder, texts)
        pieces.append(Ragged(ids, ids, offsets_of(lengths)))
    return concatenate(pieces)


def with_specials(examples: Ragged, specials: tuple[list[int], list[int]]) -> Ragged:
    """Each example wrapped in (ids before, ids after)."""
    before, after = specials
    if not before and not after:
        return examples
    n = len(examples)
    fixed = lambda ids: (np.tile(np.asarray(ids, np.int32), n), np.full(n, len(ids), np.int64))  # noqa: E731
    ids, offsets, _ = interleave([fixed(before), (examples.ids, examples.lengths), fixed(after)])
    return Ragged(ids, ids, offsets)


def label_names_of(source: Path) -> list[str]:
    """Sorted labels of the train split; a validation/test label missing from train is an error
    (the model would have no output for it), raised before any tokenizing."""
    names = sorted(set(read_column(source / "train.parquet", "label")))
    for split in SPLITS[1:]:
        unseen = sorted(set(read_column(source / f"{split}.parquet", "label")) - set(names))
        if unseen:
            raise ValueError(f"{split} split has label(s) never seen in train: {unseen}; train has {names}")
    return names


# ---------------------------------------------------------------- writing, per layout


def _learned(examples: Ragged) -> int:
    return int(np.count_nonzero(examples.labels != IGNORE_INDEX))


def write_causal(folder: Path, examples: Ragged, cfg: TokenizeConfig, pad_id: int) -> dict:
    if cfg.packing == "concat":  # nothing truncated: long examples just span rows
        ids, labels = pack_concat(examples, cfg.block_size, pad_id)
        np.save(folder / "input_ids.npy", ids)
        np.save(folder / "labels.npy", labels)
        return split_stats(len(examples), len(examples.ids), _learned(examples), len(ids), ids.size)
    cut = truncate(examples, cfg.block_size, cfg.truncation)
    kept = cut.kept
    if cfg.packing == "bins":
        ids, labels, positions = pack_bins(kept, cfg.block_size, pad_id)
        np.save(folder / "input_ids.npy", ids)
        np.save(folder / "labels.npy", labels)
        np.save(folder / "position_ids.npy", positions)
        return split_stats(len(kept), len(kept.ids), _learned(kept), len(ids), ids.size, cut.truncated, cut.dropped)
    np.save(folder / "input_ids.npy", kept.ids)
    np.save(folder / "labels.npy", kept.labels)
    np.save(folder / "offsets.npy", kept.offsets)
    slots = len(kept) * cfg.block_size
    return split_stats(len(kept), len(kept.ids), _learned(kept), len(kept), slots, cut.truncated, cut.dropped, "examples x block_size")


def _room(cfg: TokenizeConfig, specials: tuple[list[int], list[int]]) -> int:
    return cfg.block_size - len(specials[0]) - len(specials[1])


def _fit(examples: Ragged, specials: tuple[list[int], list[int]], too_long: np.ndarray, cfg: TokenizeConfig) -> Ragged:
    """Truncate the texts to leave room for the special tokens, or with `drop` remove the examples
    flagged too_long (a decision that can span several columns: a seq2seq pair goes as a whole);
    then add the special tokens, so truncation never cuts off a final [SEP] or </s>."""
    if cfg.truncation == "drop":
        kept = select(examples, ~too_long)
    else:
        kept = truncate(examples, _room(cfg, specials), cfg.truncation).kept
    return with_specials(kept, specials)


def _cut_counts(too_long: np.ndarray, cfg: TokenizeConfig) -> tuple[int, int]:
    count = int(too_long.sum())
    return (0, count) if cfg.truncation == "drop" else (count, 0)


def write_classification(folder: Path, texts: Ragged, class_ids: np.ndarray, cfg: TokenizeConfig, specials=NO_SPECIALS) -> dict:
    too_long = texts.lengths > _room(cfg, specials)
    kept = _fit(texts, specials, too_long, cfg)
    if cfg.truncation == "drop":
        class_ids = class_ids[~too_long]
    np.save(folder / "input_ids.npy", kept.ids)
    np.save(folder / "offsets.npy", kept.offsets)
    np.save(folder / "class_ids.npy", class_ids.astype(np.int64))
    n = len(kept)  # label_tokens: one label per example
    return split_stats(n, len(kept.ids), n, n, n * cfg.block_size, *_cut_counts(too_long, cfg), "examples x block_size")


def write_seq2seq(
    folder: Path, source: Ragged, target: Ragged, cfg: TokenizeConfig, source_specials=NO_SPECIALS, target_specials=NO_SPECIALS
) -> dict:
    too_long = (source.lengths > _room(cfg, source_specials)) | (target.lengths > _room(cfg, target_specials))
    source, target = _fit(source, source_specials, too_long, cfg), _fit(target, target_specials, too_long, cfg)
    np.save(folder / "input_ids.npy", source.ids)
    np.save(folder / "offsets.npy", source.offsets)
    np.save(folder / "target_ids.npy", target.ids)
    np.save(folder / "target_offsets.npy", target.offsets)
    n, tokens = len(source), len(source.ids) + len(target.ids)
    # label_tokens: the target tokens, the ones a seq2seq loss is taken on.
    return split_stats(n, tokens, len(target.ids), n, 2 * n * cfg.block_size, *_cut_counts(too_long, cfg), "examples x 2 x block_size")


# ---------------------------------------------------------------- the stage


def tokenize_split(path: Path, folder: Path, cfg: TokenizeConfig, spec: RowSpec, tokenizer, encoder, label_names) -> dict:
    """Tokenize one split file (missing: empty) into `folder` in the task's layout; its stats."""
    if spec.task == "classification":
        class_of = {name: i for i, name in enumerate(label_names)}
        class_ids = np.array([class_of[v] for v in read_column(path, "label")], np.int64).reshape(-1)
        return write_classification(folder, text_examples(path, "text", encoder, cfg), class_ids, cfg, special_affixes(encoder))
    if spec.task == "seq2seq":
        source = text_examples(path, "source", encoder, cfg)
        target = text_examples(path, "target", encoder, cfg)
        before, after = special_affixes(encoder)
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return write_seq2seq(folder, source, target, cfg, (before, after), (before, after or eos))
    if spec.task == "preference":
        chat = spec.template == "preference_chat"
        batches = iter_columns(path, preference_tokens.columns(chat), max(cfg.batch_size, ENCODE_ROWS))
        return preference_tokens.write_pairs(folder, preference_tokens.tokenize_pairs(batches, tokenizer, encoder, chat), cfg)
    if spec.template == "chat":
        examples = chat_split(path, tokenizer, encoder, cfg)
    else:  # prompt_response, instruction and text all arrive as prompt + response
        examples = causal_examples(path, encoder, tokenizer.eos_token_id, cfg)
    return write_causal(folder, examples, cfg, tokenizer.pad_token_id)


def train_texts(path: Path, rows: int) -> Iterator[str]:
    for _, (texts,) in iter_columns(path, ["text"], rows):
        yield from texts


def run(cfg: TokenizeConfig, model: ModelConfig, spec: RowSpec, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    source = Path(inputs["preprocess"])
    set_tokenizer_threads(cfg.num_threads)
    chat = (spec.task, spec.template) in (("causal_lm", "chat"), ("preference", "preference_chat"))
    label_names = label_names_of(source) if spec.task == "classification" else None
    # Scratch tokenizers learn from the train split only, so validation stays unseen.
    tokenizer = build_tokenizer(model, cfg, train_texts(source / "train.parquet", cfg.batch_size), chat=chat,
                                task="causal_lm" if spec.task == "preference" else spec.task)
    tokenizer.save_pretrained(out / "tokenizer")
    encoder = fast_encoder(tokenizer)

    splits = {}
    for split in SPLITS:
        path = source / f"{split}.parquet"
        (out / split).mkdir()
        splits[split] = tokenize_split(path, out / split, cfg, spec, tokenizer, encoder, label_names)
        if split == "train" and splits[split]["tokens"] == 0:
            raise ValueError(f"{path}: the train split has no tokens (no rows survived sampling?)")

    packing = cfg.packing if spec.task == "causal_lm" else "none"  # classification, seq2seq and pairs are never packed
    meta = {
        "task": spec.task,
        "packing": packing,
        "block_size": cfg.block_size,
        "vocab_size": len(tokenizer),
        "pad_id": tokenizer.pad_token_id,
        "eos_id": tokenizer.eos_token_id,
        "splits": splits,
    }
    if label_names is not None:
        meta["label_names"] = label_names
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return summarise(splits, packing)


def summarise(splits: dict[str, dict], packing: str) -> dict:
    total = lambda key: sum(s[key] for s in splits.values())  # noqa: E731
    slots = total("slots")
    stats = {"packing": packing, **{k: total(k) for k in ("examples", "tokens", "label_tokens", "truncated", "dropped")}}
    stats.update({f"{split}_rows": s["rows"] for split, s in splits.items()})
    stats["utilisation"] = round(stats["tokens"] / slots, 4) if slots else 0.0
    stats["splits"] = splits
    return stats
