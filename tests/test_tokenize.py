import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline import stages, tokenize
from pipeline.artifacts import Artifact
from pipeline.config import build_config
from pipeline.text_tokenizer import EOS, build_tokenizer, train_byte_level_bpe

TRAIN = [
    (f"### Question:\nHow do I reset router {i}?\n### Answer:\n", f"Hold the reset button for {i % 7 + 3} seconds, then wait.")
    for i in range(30)
] + [("### Question:\nOù est mon colis?\n### Answer:\n", "Il arrive demain, 日本 aussi.")]
VALIDATION = [("### Question:\nRefund?\n### Answer:\n", "Within 30 days.")]
SMALL = {"tokenize": {"vocab_size": 300, "block_size": 16, "batch_size": 7}}


def write_preprocessed(folder: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A preprocess-stage folder, written directly so these tests do not depend on preprocess."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        prompts, responses = [p for p, _ in rows], [r for _, r in rows]
        table = pa.table(
            {
                "prompt": pa.array(prompts, pa.string()),
                "response": pa.array(responses, pa.string()),
                "text": pa.array([p + r for p, r in rows], pa.string()),
                "prompt_chars": pa.array([len(p) for p in prompts], pa.int64()),
            }
        )
        pq.write_table(table, folder / f"{split}.parquet")
    return folder


def run_tokenize(tmp_path: Path, raw: dict = SMALL, splits=None, name="out") -> tuple[Path, dict]:
    cfg = build_config(raw)
    source = write_preprocessed(tmp_path / "preprocess", splits or {"train": TRAIN, "validation": VALIDATION})
    out = tmp_path / name
    out.mkdir()
    stats = tokenize.run(cfg.tokenize, cfg.model, inputs={"preprocess": source}, out=out, scratch=tmp_path / "scratch")
    return out, stats


def load_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(out / split / "input_ids.npy", mmap_mode="r"), np.load(out / split / "labels.npy", mmap_mode="r")


def test_scratch_tokenizer_is_deterministic(tmp_path):
    cfg = build_config(SMALL)
    texts = [p + r for p, r in TRAIN]
    for name, corpus in [("a", texts), ("b", list(texts)), ("other", texts[:5])]:
        build_tokenizer(cfg.model, cfg.tokenize, iter(corpus)).save_pretrained(tmp_path / name)
    a, b, other = ((tmp_path / n / "tokenizer.json").read_bytes() for n in ("a", "b", "other"))
    assert a == b
    assert a != other  # the comparison can fail: the vocabulary depends on the texts


def test_labels_mask_exactly_the_prompt(tmp_path):
    out, stats = run_tokenize(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = meta["eos_id"]
    assert eos == meta["pad_id"] == tokenizer.convert_tokens_to_ids(EOS)

    for split, rows in [("train", TRAIN), ("validation", VALIDATION)]:
        ids, labels = (a.reshape(-1) for a in load_split(out, split))
        tokens = meta["splits"][split]["tokens"]
        assert (ids[tokens:] == meta["pad_id"]).all() and (labels[tokens:] == -100).all()
        ends = np.flatnonzero(ids[:tokens] == eos)
        assert len(ends) == len(rows) == meta["splits"][split]["examples"]
        assert ends[-1] == tokens - 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        for (prompt, response), start, end in zip(rows, starts, ends):
            seq_ids, seq_labels = ids[start : end + 1], labels[start : end + 1]
            masked = seq_labels == -100
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            assert masked.tolist() == [True] * n_prompt + [False] * (len(seq_ids) - n_prompt)
            assert tokenizer.decode(seq_ids[masked]) == prompt
            assert tokenizer.decode(seq_labels[~masked][:-1]) == response
            assert seq_labels[-1] == eos
        assert meta["splits"][split]["label_tokens"] == int((labels != -100).sum())


def test_unmasked_labels_equal_inputs(tmp_path):
    out, _ = run_tokenize(tmp_path, {"tokenize": {**SMALL["tokenize"], "mask_prompt": False}})
    meta = json.loads((out / "meta.json").read_text())
    ids, labels = (a.reshape(-1) for a in load_split(out, "train"))
    tokens = meta["splits"]["train"]["tokens"]
    assert (labels[:tokens] == ids[:tokens]).all()
    assert meta["splits"]["train"]["label_tokens"] == tokens


def test_blocks_shapes_meta_and_stats(tmp_path):
    out, stats = run_tokenize(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["block_size"] == 16 and meta["vocab_size"] == 300
    for split in ("train", "validation"):
        ids, labels = load_split(out, split)
        info = meta["splits"][split]
        assert ids.dtype == labels.dtype == np.int32
        assert ids.shape == labels.shape == (info["blocks"], 16)
        assert info["blocks"] == -(-info["tokens"] // 16)
    train, validation = meta["splits"]["train"], meta["splits"]["validation"]
    tokens = train["tokens"] + validation["tokens"]
    assert stats == {
        "tokens": tokens,
        "train_blocks": train["blocks"],
        "validation_blocks": validation["blocks"],
        "utilisation": round(tokens / ((train["blocks"] + validation["blocks"]) * 16), 4),
        "examples": len(TRAIN) + 1,
        "truncated": 0,
    }
    assert 0 < stats["utilisation"] <= 1


def test_short_validation_split_gets_one_padded_block(tmp_path):
    out, stats = run_tokenize(tmp_path, splits={"train": TRAIN, "validation": [("Q?", "A.")]})
    meta = json.loads((out / "meta.json").read_text())
    ids, labels = load_split(out, "validation")
    tokens = meta["splits"]["validation"]["tokens"]
    assert stats["validation_blocks"] == 1 and ids.shape == (1, 16) and 0 < tokens < 16
    assert (ids[0, tokens:] == meta["pad_id"]).all() and (labels[0, tokens:] == -100).all()
    assert labels[0, tokens - 1] == meta["eos_id"]


def test_empty_splits(tmp_path):
    out, stats = run_tokenize(tmp_path, splits={"train": TRAIN, "validation": []})
    assert stats["validation_blocks"] == 0
    assert np.load(out / "validation" / "input_ids.npy").shape == (0, 16)
    with pytest.raises(ValueError, match="train split has no tokens"):
        run_tokenize(tmp_path / "again", splits={"train": [], "validation": VALIDATION})


@pytest.fixture
def tokenizer_folder(tmp_path) -> Path:
    """A local 'pretrained' tokenizer without a pad token, trained on the same texts as scratch."""
    folder = tmp_path / "pretrained"
    bpe = train_byte_level_bpe([p + r for p, r in TRAIN], 300)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(folder)
    return folder


def test_pretrained_local_folder_matches_scratch(tmp_path, tokenizer_folder):
    scratch_out, scratch_stats = run_tokenize(tmp_path, name="scratch")
    raw = {**SMALL, "model": {"init": "pretrained", "name": str(tokenizer_folder)}}
    out, stats = run_tokenize(tmp_path, raw, name="from_folder")

    assert stats == scratch_stats
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pad_id"] == meta["eos_id"]  # no pad in the folder: eos stands in
    for split in ("train", "validation"):
        for a, b in zip(load_split(out, split), load_split(scratch_out, split)):
            assert np.array_equal(a, b)


def test_fingerprint_follows_tokenizer_files(tmp_path, tokenizer_folder):
    scratch = build_config(SMALL)
    assert tokenize.content_fingerprint(scratch.tokenize, scratch.model) is None

    cfg = build_config({**SMALL, "model": {"init": "pretrained", "name": str(tokenizer_folder)}})
    parents = {"preprocess": Artifact("preprocess", "fp", str(tmp_path))}
    before = tokenize.content_fingerprint(cfg.tokenize, cfg.model)
    stage_before = stages.compute_fingerprint("tokenize", cfg, parents)
    assert sorted(before) == ["tokenizer.json", "tokenizer_config.json"]

    path = tokenizer_folder / "tokenizer.json"
    path.write_text(path.read_text() + "\n")  # any byte change counts, even a harmless one
    after = tokenize.content_fingerprint(cfg.tokenize, cfg.model)
    assert after["tokenizer.json"] != before["tokenizer.json"]
    assert after["tokenizer_config.json"] == before["tokenizer_config.json"]
    assert stages.compute_fingerprint("tokenize", cfg, parents) != stage_before
