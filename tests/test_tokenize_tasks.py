"""The tokenize stage for chat, classification and seq2seq rows with scratch tokenizers, on
preprocess-like parquet files written here (not by preprocess): what is masked, labels, sources and targets."""

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import examples_of, load_split, meta_of, run_stage, write_labelled, write_pairs, write_pretrained_tokenizer, write_table
from transformers import AutoTokenizer

from pipeline.data.text_tokenizer import CHATML_TOKENS, ChatTemplateError


# ---------------------------------------------------------------- chat

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How do I reset my router?"},
        {"role": "assistant", "content": "Hold reset for 10 seconds."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Wait for the light: 日本 aussi, où?"},  # offsets count characters, not bytes
    ],
    [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "user"}],  # contents equal to role names
]
CHAT = {"preprocess": {"template": "chat"}, "tokenize": {"vocab_size": 300, "block_size": 32, "packing": "none"}}


def write_chats(folder: Path, conversations) -> Path:
    texts = ["\n".join(m["content"] for m in c) for c in conversations]
    write_table(folder, "train", {"messages": [json.dumps(c) for c in conversations], "text": texts})
    return folder


def test_chat_masks_all_but_assistant_turns_and_their_end_marker(tmp_path):
    out, _ = run_stage(tmp_path, {**CHAT, "tokenize": {**CHAT["tokenize"], "block_size": 256}}, write_chats(tmp_path / "pre", CONVERSATIONS))
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template  # saved with the tokenizer
    im_start, im_end = tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS))
    ids, labels, offsets = load_split(out, "train", "input_ids", "labels", "offsets")
    for conv, (seq, lab) in zip(CONVERSATIONS, examples_of(ids, labels, offsets)):
        assert tokenizer.decode(seq) == tokenizer.apply_chat_template(conv, tokenize=False)
        assert seq.count(im_start) == len(conv)  # the markers are single tokens
        learned = [t for t in lab if t != -100]
        expected = []
        for m in conv:
            if m["role"] == "assistant":
                expected += tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [im_end]
        assert learned == expected
    assert meta_of(out)["splits"]["train"]["label_tokens"] == int((labels != -100).sum())


def test_chat_with_a_custom_template_and_unmasked(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    raw = {**CHAT, "tokenize": {**CHAT["tokenize"], "block_size": 256, "chat_template": template, "mask_prompt": False}}
    out, _ = run_stage(tmp_path, raw, write_chats(tmp_path / "pre", CONVERSATIONS[:1]))
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids, labels = load_split(out, "train")
    assert tokenizer.decode(ids).startswith("[system] You are terse.\n[user] How")
    assert (ids == labels).all()


def test_chat_template_that_is_not_prefix_stable_is_refused(tmp_path):
    # Numbers turns by how many messages there are in total: rendering a prefix changes earlier text.
    template = "{% for m in messages %}{{ messages|length }} {{ m['content'] }}\n{% endfor %}"
    raw = {**CHAT, "tokenize": {**CHAT["tokenize"], "chat_template": template}}
    with pytest.raises(ChatTemplateError, match="row 0: rendering the first 1 messages is not a prefix"):
        run_stage(tmp_path, raw, write_chats(tmp_path / "pre", CONVERSATIONS[:1]))


def test_pretrained_tokenizer_without_chat_template_fails_before_work(tmp_path):
    raw = {**CHAT, "model": {"init": "pretrained", "name": str(write_pretrained_tokenizer(tmp_path / "pretrained"))}}
    with pytest.raises(ValueError, match="has no chat template and tokenize.chat_template is not set"):
        run_stage(tmp_path, raw, write_chats(tmp_path / "pre", CONVERSATIONS))
    assert not (tmp_path / "out" / "train").exists()


# ---------------------------------------------------------------- classification and seq2seq

CLS = {"task": "classification", "tokenize": {"vocab_size": 300, "block_size": 8}}


def test_classification_maps_labels_in_sorted_order(tmp_path):
    train = [("router is broken", "support"), ("pay my bill", "billing"), ("thanks a lot " * 6, "other"), ("bill me", "billing")]
    source = write_labelled(tmp_path / "pre", {"train": train, "validation": [("broken again", "support")]})
    out, stats = run_stage(tmp_path, CLS, source)
    meta = meta_of(out)
    assert meta["label_names"] == ["billing", "other", "support"] and meta["packing"] == "none"
    ids, offsets, class_ids = load_split(out, "train", "input_ids", "offsets", "class_ids")
    assert class_ids.tolist() == [2, 0, 1, 0] and class_ids.dtype == np.int64
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    texts = [tokenizer.decode(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    assert texts[0] == "router is broken" and texts[3] == "bill me"
    assert offsets[3] - offsets[2] == 8 and meta["splits"]["train"]["truncated"] == 1  # the long text, cut to 8
    assert load_split(out, "validation", "class_ids")[0].tolist() == [2]


def test_classification_drop_keeps_labels_aligned(tmp_path):
    train = [("short one", "a"), ("long text " * 8, "b"), ("short two", "c")]
    out, _ = run_stage(tmp_path, {**CLS, "tokenize": {**CLS["tokenize"], "truncation": "drop"}}, write_labelled(tmp_path / "pre", {"train": train}))
    ids, offsets, class_ids = load_split(out, "train", "input_ids", "offsets", "class_ids")
    assert class_ids.tolist() == [0, 2] and len(offsets) == 3
    assert meta_of(out)["splits"]["train"]["dropped"] == 1


def test_classification_label_unseen_in_train_is_an_error(tmp_path):
    source = write_labelled(tmp_path / "pre", {"train": [("a", "x"), ("b", "y")], "test": [("c", "z"), ("d", "w"), ("e", "x")]})
    with pytest.raises(ValueError, match=r"test split has label\(s\) never seen in train: \['w', 'z'\]"):
        run_stage(tmp_path, CLS, source)


def test_seq2seq_sources_and_targets(tmp_path):
    rows = [("translate: good morning", "bonjour"), ("translate: thank you very much " * 3, "merci beaucoup")]
    out, _ = run_stage(tmp_path, {"task": "seq2seq", "tokenize": {"vocab_size": 300, "block_size": 12}}, write_pairs(tmp_path / "pre", rows))
    meta = meta_of(out)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids, offsets, target_ids, target_offsets = load_split(out, "train", "input_ids", "offsets", "target_ids", "target_offsets")
    assert tokenizer.decode(ids[offsets[0] : offsets[1]]) == "translate: good morning"
    assert offsets[2] - offsets[1] == 12  # the long source, cut to the block
    targets = [target_ids[a:b].tolist() for a, b in zip(target_offsets[:-1], target_offsets[1:])]
    assert [tokenizer.decode(t[:-1]) for t in targets] == ["bonjour", "merci beaucoup"]
    assert all(t[-1] == meta["eos_id"] for t in targets)
    info = meta["splits"]["train"]
    assert info["label_tokens"] == len(target_ids) and info["truncated"] == 1 and info["examples"] == 2


def test_scratch_seq2seq_keeps_eos_on_a_truncated_target(tmp_path):
    rows = [("good morning", "bonjour"), ("thank you", "merci beaucoup " * 10)]
    out, _ = run_stage(tmp_path, {"task": "seq2seq", "tokenize": {"vocab_size": 300, "block_size": 8}}, write_pairs(tmp_path / "pre", rows))
    meta = meta_of(out)
    target_ids, target_offsets = load_split(out, "train", "target_ids", "target_offsets")
    ids, offsets = load_split(out, "train", "input_ids", "offsets")
    assert np.diff(target_offsets).tolist()[1] == 8 and target_ids[target_offsets[2] - 1] == meta["eos_id"]
    assert meta["eos_id"] not in ids.tolist()  # a scratch tokenizer adds nothing to sources
