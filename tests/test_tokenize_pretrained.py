"""The tokenize stage with pretrained tokenizers: a local folder gives what scratch gives, its
files are in the fingerprint, and the special tokens BERT and T5-style tokenizers add are kept as
the tokenizer itself would add them (classification, seq2seq)."""

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import (
    MINILM, SMALL, load_split, meta_of, needs_minilm, run_stage, run_tokenize, write_labelled, write_pairs, write_pretrained_tokenizer,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline import stages
from pipeline.artifacts import Artifact
from pipeline.config import build_config
from pipeline.data import tokenize


@pytest.fixture
def tokenizer_folder(tmp_path) -> Path:
    return write_pretrained_tokenizer(tmp_path / "pretrained")


def test_pretrained_local_folder_matches_scratch(tmp_path, tokenizer_folder):
    scratch_out, scratch_stats = run_tokenize(tmp_path, name="scratch")
    raw = {**SMALL, "model": {"init": "pretrained", "name": str(tokenizer_folder)}}
    out, stats = run_tokenize(tmp_path, raw, name="from_folder")

    assert stats == scratch_stats
    meta = meta_of(out)
    assert meta["pad_id"] == meta["eos_id"]  # no pad in the folder: eos stands in
    for split in ("train", "validation"):
        for a, b in zip(load_split(out, split), load_split(scratch_out, split)):
            assert np.array_equal(a, b)


def test_pretrained_truncation_settings_in_tokenizer_json_are_ignored(tmp_path, tokenizer_folder):
    """tokenizer.json can carry truncation; the HF wrapper resets it per call, and so must we."""
    path = tokenizer_folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    path.write_text(json.dumps(data))
    scratch_out, _ = run_tokenize(tmp_path, name="scratch")
    out, _ = run_tokenize(tmp_path, {**SMALL, "model": {"init": "pretrained", "name": str(tokenizer_folder)}}, name="from_folder")
    assert np.array_equal(load_split(out, "train")[0], load_split(scratch_out, "train")[0])


def test_fingerprint_follows_tokenizer_files(tmp_path, tokenizer_folder):
    scratch = build_config(SMALL)
    assert tokenize.content_fingerprint(scratch.tokenize, scratch.model, scratch.row_spec) is None

    cfg = build_config({**SMALL, "model": {"init": "pretrained", "name": str(tokenizer_folder)}})
    parents = {"preprocess": Artifact("preprocess", "fp", str(tmp_path))}
    before = tokenize.content_fingerprint(cfg.tokenize, cfg.model, cfg.row_spec)
    stage_before = stages.compute_fingerprint("tokenize", cfg, parents)
    assert sorted(before) == ["tokenizer.json", "tokenizer_config.json"]

    path = tokenizer_folder / "tokenizer.json"
    path.write_text(path.read_text() + "\n")  # any byte change counts, even a harmless one
    after = tokenize.content_fingerprint(cfg.tokenize, cfg.model, cfg.row_spec)
    assert after["tokenizer.json"] != before["tokenizer.json"]
    assert after["tokenizer_config.json"] == before["tokenizer_config.json"]
    assert stages.compute_fingerprint("tokenize", cfg, parents) != stage_before


# ---------------------------------------------------------------- pretrained special tokens (classification, seq2seq)

TEXTS = [("The router is broken", "support"), ("pay my bill twice, please now or never again", "billing"), ("thanks", "other")]


def pretrained(name: Path, **tokenize) -> dict:
    return {"model": {"init": "pretrained", "name": str(name)}, "tokenize": {"block_size": 8, **tokenize}}


@needs_minilm
@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_classification_gets_cls_and_sep_as_the_tokenizer_would(tmp_path, side):
    source = write_labelled(tmp_path / "pre", {"train": TEXTS})
    out, _ = run_stage(tmp_path, {"task": "classification", **pretrained(MINILM, truncation=side)}, source)
    meta = meta_of(out)
    tokenizer = AutoTokenizer.from_pretrained(MINILM, truncation_side=side)
    assert meta["eos_id"] is None and meta["pad_id"] == tokenizer.pad_token_id == 0  # BERT has no eos: fine here
    assert meta["vocab_size"] == 30522
    ids, offsets = load_split(out, "train", "input_ids", "offsets")
    found = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert found == [tokenizer(t, truncation=True, max_length=8)["input_ids"] for t, _ in TEXTS]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert all(e[0] == cls and e[-1] == sep for e in found)
    assert len(found[1]) == 8 and meta["splits"]["train"]["truncated"] == 1  # the long one, still ending in [SEP]
    assert tokenizer.decode(found[0], skip_special_tokens=True) == "the router is broken"


@needs_minilm
def test_bert_classification_drop_counts_the_special_tokens(tmp_path):
    # 6 words + [CLS] + [SEP] = 8 fits a block of 8; 7 words do not.
    rows = [("one two three four five six", "a"), ("one two three four five six seven", "b"), ("ok", "b")]
    source = write_labelled(tmp_path / "pre", {"train": rows})
    out, _ = run_stage(tmp_path, {"task": "classification", **pretrained(MINILM, truncation="drop")}, source)
    ids, offsets, class_ids = load_split(out, "train", "input_ids", "offsets", "class_ids")
    assert np.diff(offsets).tolist() == [8, 3] and class_ids.tolist() == [0, 1]
    assert meta_of(out)["splits"]["train"]["dropped"] == 1


@needs_minilm
def test_bert_tokenizer_for_causal_lm_still_needs_eos(tmp_path):
    with pytest.raises(ValueError, match="has no eos token"):
        run_tokenize(tmp_path, pretrained(MINILM))


@pytest.fixture
def t5_style_folder(tmp_path) -> Path:
    """A tokenizer whose post-processor appends </s>, as T5's does (word level, to stay tiny)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    words = sorted(set("translate good morning thank you very much bonjour merci beaucoup".split()))
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    folder = tmp_path / "t5ish"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return folder


def test_seq2seq_t5_style_tokenizer_ends_source_and_target_with_one_eos(tmp_path, t5_style_folder):
    rows = [("translate good morning", "bonjour"), ("translate thank you very much " * 3, "merci beaucoup " * 5)]
    out, _ = run_stage(tmp_path, {"task": "seq2seq", **pretrained(t5_style_folder)}, write_pairs(tmp_path / "pre", rows))
    tokenizer = AutoTokenizer.from_pretrained(t5_style_folder)
    eos = tokenizer.eos_token_id
    ids, offsets, target_ids, target_offsets = load_split(out, "train", "input_ids", "offsets", "target_ids", "target_offsets")
    sources = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    targets = [target_ids[a:b].tolist() for a, b in zip(target_offsets[:-1], target_offsets[1:])]
    assert sources == [tokenizer(s, truncation=True, max_length=8)["input_ids"] for s, _ in rows]
    assert targets == [tokenizer(text_target=t, truncation=True, max_length=8)["input_ids"] for _, t in rows]
    assert targets[0] == tokenizer("bonjour", add_special_tokens=False)["input_ids"] + [eos]  # one </s>, not two
    assert len(sources[1]) == len(targets[1]) == 8 and sources[1][-1] == targets[1][-1] == eos
    assert meta_of(out)["splits"]["train"]["truncated"] == 1
