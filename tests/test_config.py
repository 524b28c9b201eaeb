"""Config: shipped presets load, overrides are typed, and every mistake names its dotted key."""

from __future__ import annotations

import functools
from pathlib import Path

import pydantic
import pytest
import yaml

from pipeline import stages
from pipeline.artifacts import Artifact
from pipeline.config import ConfigError, PipelineConfig, TrainConfig, build_config, load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "examples").rglob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yml"))


def test_there_are_presets_to_check():
    assert PRESETS, "no YAML under examples/"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_preset_loads(path):
    cfg = load_config(path)
    # Every value the preset sets is the value the config holds: none dropped, renamed or replaced by a default.
    written = {}
    for section, values in yaml.safe_load(path.read_text()).items():  # sections, and scalars such as `task:`
        written.update({f"{section}.{k}": v for k, v in values.items()} if isinstance(values, dict) else {section: values})
    assert {name: functools.reduce(getattr, name.split("."), cfg) for name in written} == written
    assert cfg.model.n_embd % cfg.model.n_head == 0


def test_quickstart_values():
    cfg = load_config(ROOT / "examples" / "quickstart.yaml")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 4, 128)
    assert cfg.train.lr == 2.0e-3 and cfg.evaluate.max_perplexity == 200.0
    assert cfg.registry.model_name == "quickstart-gpt2"


def test_no_path_gives_the_defaults():
    assert load_config(None) == PipelineConfig()


def test_overrides_are_typed():
    cfg = load_config(
        ROOT / "examples" / "quickstart.yaml",
        [
            "train.max_steps=7",
            "train.lr=3e-4",
            "model.name=distilgpt2",
            "data.source=[a.csv, s3://b/c/*.csv]",
            "tokenize.mask_prompt=false",
            "evaluate.max_perplexity=",
        ],
    )
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float
    assert cfg.model.name == "distilgpt2"
    assert cfg.data.source == ["a.csv", "s3://b/c/*.csv"]
    assert cfg.tokenize.mask_prompt is False
    assert cfg.evaluate.max_perplexity is None
    assert cfg.train.warmup_steps == 20  # untouched keys keep the preset's values


def test_text_overrides_stay_text():
    cfg = build_config(
        {},
        [
            "registry.version=2",              # YAML would say int 2
            "registry.model_name=2024-05-01",  # YAML would say a date
            "data.source=*.csv",               # YAML would say an undefined alias
            "preprocess.prompt_template=# Q: {prompt}",  # YAML would say a comment, i.e. None
        ],
    )
    assert cfg.registry.version == "2"
    assert cfg.registry.model_name == "2024-05-01"
    assert cfg.data.source == "*.csv"
    assert cfg.preprocess.prompt_template == "# Q: {prompt}"
    assert build_config({}, ["registry.version=null"]).registry.version is None


def test_overrides_do_not_touch_the_callers_dict():
    raw = {"train": {"lr": 0.5}}
    assert build_config(raw, ["train.lr=0.25"]).train.lr == 0.25
    assert raw == {"train": {"lr": 0.5}}


def test_a_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.lr") as error:
        build_config({}, ["train.lr=abc"])
    assert "'abc'" in str(error.value)
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        build_config({}, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"train\.lr.*cannot parse"):
        build_config({}, ["train.lr=*x"])


def test_an_unknown_override_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as error:
        build_config({}, ["train.lrr=1e-3"])
    assert str(error.value) == "unknown config key 'train.lrr' (did you mean 'train.lr'?)"
    with pytest.raises(ConfigError, match=r"'train\.lr\.x'"):
        build_config({}, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"key=value"):
        build_config({}, ["train.lr"])


def test_an_unknown_section_in_yaml_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("trainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer' \(did you mean 'train'\?\)"):
        load_config(path)


def test_a_typo_inside_a_section_names_the_dotted_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lr: 0.1\n  warmup_step: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.warmup_step' \(did you mean 'train\.warmup_steps'\?\)"):
        load_config(path)


def test_a_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- lr\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_sample_fraction_and_count_are_exclusive():
    assert build_config({}, ["sample.fraction=0.5"]).sample.fraction == 0.5
    assert build_config({}, ["sample.count=10"]).sample.count == 10
    with pytest.raises(ConfigError, match=r"sample\.fraction or sample\.count, not both"):
        build_config({}, ["sample.fraction=0.5", "sample.count=10"])


def test_heads_must_divide_the_width():
    assert build_config({"model": {"n_embd": 96, "n_head": 3}}).model.n_embd == 96
    with pytest.raises(ConfigError, match=r"model\.n_embd \(65\) must be divisible by model\.n_head \(2\)"):
        build_config({"model": {"n_embd": 65, "n_head": 2}})


def test_configs_are_frozen():
    cfg = build_config({})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train.lr = 1.0
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train = TrainConfig()
    assert cfg.train.lr == 1e-3


def test_cadence_fields_are_not_fingerprinted():
    keys = set(TrainConfig().fingerprint_dict())
    assert keys.isdisjoint({"save_every_steps", "log_every_steps", "keep_last_checkpoints"})
    assert {"lr", "max_steps", "seed", "micro_batch_size"} <= keys
    assert len(keys) == len(TrainConfig.model_fields) - len(TrainConfig.not_fingerprinted) + 1  # + world_size


def test_where_a_run_trains_is_not_fingerprinted_but_its_world_size_is():
    """2 nodes x 1 process trains the weights 1 node x 2 processes trains: one cache entry; the
    launcher, rendezvous, checkpoint place and the slurm/kubernetes sections are not the model."""
    def train_fp(*overrides):
        return load_config(None, list(overrides)).fingerprint_section("train")

    two_by_one = train_fp("train.nnodes=2", "train.nproc_per_node=1", "train.launcher=slurm", "train.rdzv_port=1234")
    assert two_by_one == train_fp("train.nproc_per_node=2", "train.checkpoint_dir=s3://b/ckpt")
    assert two_by_one != train_fp("train.nproc_per_node=1")
    assert load_config(None, ["slurm.partition=gpu", "kubernetes.image=x"]).fingerprint_section("slurm") == {}


def test_local_multi_node_needs_a_rendezvous_endpoint():
    with pytest.raises(ConfigError, match="train.rdzv_endpoint"):
        load_config(None, ["train.nnodes=2"])
    assert load_config(None, ["train.nnodes=2", "train.rdzv_endpoint=10.0.0.1:29500"]).train.world_size == 2


def test_train_fingerprint_ignores_cadence_but_follows_the_learning_rate():
    parents = {"tokenize": Artifact("tokenize", "abc", "/x")}
    base = stages.compute_fingerprint("train", build_config({}), parents)

    assert stages.compute_fingerprint("train", build_config({}, ["train.save_every_steps=7"]), parents) == base
    assert stages.compute_fingerprint("train", build_config({}, ["train.log_every_steps=3", "train.keep_last_checkpoints=9"]), parents) == base
    assert stages.compute_fingerprint("train", build_config({}, ["train.lr=2e-3"]), parents) != base
    other_parent = {"tokenize": Artifact("tokenize", "abd", "/x")}
    assert stages.compute_fingerprint("train", build_config({}), other_parent) != base


# ---------------------------------------------------------------- the derived row spec


def test_row_spec_names_the_columns_each_task_reads():
    assert build_config({}).row_spec.columns == {"prompt": "prompt", "response": "response"}
    spec = build_config({"preprocess": {"template": "instruction"}, "data": {"output_column": "answer"}}).row_spec
    assert spec.columns == {"instruction": "instruction", "input": "input", "output": "answer"}
    assert spec.required_columns == ["instruction", "answer"]  # input is optional
    assert build_config({"task": "classification"}).row_spec.columns == {"text": "text", "label": "label"}
    assert build_config({"task": "seq2seq", "data": {"target_column": "summary"}}).row_spec.columns == {
        "source": "text",
        "target": "summary",
    }
    assert build_config({"preprocess": {"template": "chat"}}).row_spec.required_columns == ["messages"]


def test_ingest_fingerprint_follows_the_columns_not_the_template_text(tmp_path):
    from pipeline import stages

    source = tmp_path / "pairs.csv"
    source.write_text("prompt,response\nq,a\n")
    base = {"data": {"source": str(source)}}
    fp = stages.compute_fingerprint("ingest", build_config(base), {})
    # Rewording a template must not re-ingest; reading other columns must.
    assert stages.compute_fingerprint("ingest", build_config(base, ["preprocess.prompt_template=Q: {prompt}\\n"]), {}) == fp
    assert stages.compute_fingerprint("ingest", build_config(base, ["data.response_column=answer"]), {}) != fp
    assert stages.compute_fingerprint("ingest", build_config(base, ["task=classification"]), {}) != fp
    # Where the bytes come from is not what they are.
    assert stages.compute_fingerprint("ingest", build_config(base, ["data.s3_endpoint_url=http://127.0.0.1:9"]), {}) == fp


def test_split_fractions_must_leave_a_train_split():
    with pytest.raises(ConfigError, match="validation_fraction \\+ sample.test_fraction"):
        build_config({}, ["sample.validation_fraction=0.5", "sample.test_fraction=0.5"])


def test_unknown_task_and_packing_name_the_key():
    with pytest.raises(ConfigError, match="'task'"):
        build_config({}, ["task=regression"])
    with pytest.raises(ConfigError, match="'tokenize.packing'"):
        build_config({}, ["tokenize.packing=greedy"])
