"""Every worked recipe in examples/recipes/ run end to end (ingest to publish) at a tiny size,
offline, on CPU: base.yaml pretrains and publishes a 1-layer `recipe-base` into a temporary
registry, then each other recipe loads it (dpo.yaml loads chatbot.yaml's `recipe-chatbot`) and is
checked for what it is there to show. Plus: no recipe file goes untested, each header names the
command that runs it, and make_data.py rewrites the committed data byte for byte.

    python -m pytest -q tests/test_recipes.py      # ~2.5 minutes on 2 CPU cores: 11 torchrun trainings
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import REPO, read_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPES = REPO / "examples" / "recipes"
COMMITTED_DATA = REPO / "examples" / "data" / "recipes"

# The base keeps the recipe's 256 positions: summarizer and the adapters fill them with blocks of
# 248/252 plus their soft prompts. Its vocabulary is 1000: with 400 tokens, answers grow to
# dpo.yaml's whole block of 128 and those pairs are dropped (tests/test_dpo.py tests that edge).
BASE = {
    "sample.count": 200,
    "model.n_layer": 1,
    "model.n_head": 2,
    "model.n_embd": 32,
    "tokenize.vocab_size": 1000,
    "train.max_steps": 3,
    "train.eval_every_steps": None,
    "train.warmup_steps": 0,
}

# Every recipe but the base, in the order they run: dpo.yaml starts from chatbot.yaml's model.
# Each entry adds to EVERY_RECIPE. The sample counts keep what the recipe needs: classification
# stratifies 6 intents into 10% validation and 10% test, so 120 rows leave 2 of each in test.
TINY: dict[str, dict] = {
    "summarizer": {"sample.count": 64, "evaluate.rouge_rows": 4},
    "lm_full": {"sample.count": 80},  # by the recipe's own 2 epochs, never max_steps
    "chatbot": {"sample.count": 64},
    "chatbot_lora": {"sample.count": 64},  # the same data stages as chatbot: reused, not rerun
    "classification_full": {"sample.count": 120},
    "classification_frozen": {"sample.count": 120},
    "instruction": {"sample.count": 64},
    "dpo": {"sample.count": 64},
    "adapter_support": {"sample.count": 64},
    "adapter_docs": {"sample.count": 64},
}
EVERY_RECIPE = {
    "train.max_steps": 3,
    "train.warmup_steps": 0,
    "train.eval_every_steps": None,  # every recipe already saves no sooner than step 50
    "train.tensorboard": False,  # 11 imports of tensorboard cost seconds and show nothing here
    "evaluate.num_generations": 1,
    "evaluate.max_new_tokens": 4,
    # A 3-step, 1-layer model passes no real gate; the gates have tests of their own.
    "evaluate.max_perplexity": None,
    "evaluate.min_accuracy": None,
    "evaluate.min_rouge_l": None,
    "evaluate.min_reward_accuracy": None,
}
LM_STAGES = ["ingest", "sample", "preprocess", "tokenize", "train", "evaluate", "publish"]
N_EMBD = BASE["model.n_embd"]


def recipe_yaml(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def overrides(name: str, registry: Path, values: dict) -> list[str]:
    """`--set` strings for recipe `name`: its data file by absolute path (the YAML's is relative to
    the repository root, which need not be pytest's working directory) and `values`."""
    raw = recipe_yaml(name)
    values = {"registry.url": registry, "data.source": REPO / raw["data"]["source"], **values}
    if raw["train"].get("epochs") is not None:
        values.pop("train.max_steps")  # epochs and max_steps are two ends to one run
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def run_recipe(name: str, registry: Path, workdir: Path, values: dict) -> dict:
    from pipeline.config import load_config
    from pipeline.stages import run_stages

    cfg = load_config(RECIPES / f"{name}.yaml", overrides(name, registry, values))
    return {r.name: r for r in run_stages(cfg, str(workdir), log=lambda _: None)}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory) -> dict[str, dict]:
    """{recipe: {stage: StageResult}}, or {recipe: the exception it raised}: one broken recipe
    must not hide how the others fare (a recipe built on it fails too, naming the missing model)."""
    root = tmp_path_factory.mktemp("recipes")
    registry, workdir = root / "registry", root / "runs"
    runs: dict[str, dict | Exception] = {"base": run_recipe("base", registry, workdir, BASE)}
    for name, values in TINY.items():
        try:
            runs[name] = run_recipe(name, registry, workdir, {**EVERY_RECIPE, **values})
        except Exception as e:
            runs[name] = e
    return runs


def stages_of(recipe_runs: dict, name: str) -> dict:
    run = recipe_runs[name]
    if isinstance(run, Exception):
        raise run
    return run


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def output(stages: dict, stage: str) -> Path:
    return Path(stages[stage].output)


def published(stages: dict) -> Path:
    """The registry version folder the publish stage wrote."""
    return Path(read_json(output(stages, "publish") / "published.json")["url"])


def train_stats(stages: dict) -> dict:
    return read_json(output(stages, "train") / "train_stats.json")


def metrics(stages: dict) -> dict:
    return read_json(output(stages, "evaluate") / "metrics.json")


def meta(stages: dict) -> dict:
    return read_json(output(stages, "tokenize") / "meta.json")


def published_files(stages: dict) -> set[str]:
    return {p.name for p in (published(stages) / "model").iterdir()}


# ---------------------------------------------------------------- what each recipe is for


def check_summarizer(stages, runs):
    m = metrics(stages)
    assert m["rouge_examples"] == 4 and m["rouge_split"] == "validation"
    for scores in (m, *m["rouge_baselines"].values()):
        assert all(isinstance(scores[k], float) and 0.0 <= scores[k] <= 1.0 for k in ("rouge_1", "rouge_2", "rouge_l"))
    assert set(m["rouge_baselines"]) == {"another_rows_summary", "lead"}
    # Highlights restate the article's opening facts, so its lead beats another row's summary: the
    # baseline a tuned summarizer must beat is far from zero.
    assert m["rouge_baselines"]["lead"]["rouge_l"] > m["rouge_baselines"]["another_rows_summary"]["rouge_l"]
    assert m["generations"][0]["prompt"].endswith("\nTL;DR:")
    stats = train_stats(stages)
    assert stats["method"] == "prompt_tuning" and stats["trainable_params"] == 8 * N_EMBD
    adapter = read_json(published(stages) / "model" / "adapter_config.json")
    assert (adapter["num_virtual_tokens"], adapter["prompt_tuning_init_text"]) == (8, "summarize")
    # One article per row, and its block plus the soft prompt fill the base's positions exactly.
    assert (meta(stages)["packing"], meta(stages)["block_size"] + 8) == ("none", 256)


def check_lm_full(stages, runs):
    ingest = stages["ingest"].stats
    # wikitext's blank lines: dropped and counted, never rejected.
    assert ingest["rows_empty"] > 0 and ingest["rows_rejected"] == 0
    assert ingest["rows_out"] == ingest["rows_in"] - ingest["rows_empty"]
    stats = train_stats(stages)
    assert stats["method"] == "full" and stats["trainable_params"] == stats["total_params"]
    # One validation at the end of each of the recipe's 2 epochs.
    assert stats["steps"] % 2 == 0
    assert [v["step"] for v in stats["validations"]] == [stats["steps"] // 2, stats["steps"]]
    assert all(math.isfinite(v["eval_loss"]) for v in stats["validations"])
    assert meta(stages)["packing"] == "concat"


def check_chatbot(stages, runs):
    m = metrics(stages)
    assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1.0
    [generation] = m["generations"]
    assert generation["prompt"].startswith("Question: ") and generation["prompt"].endswith("\nAnswer:")
    # The held-out question answered by the base and by the tuned model, side by side.
    assert isinstance(generation["base"], str) and isinstance(generation["tuned"], str)
    assert train_stats(stages)["method"] == "full"
    assert "model.safetensors" in published_files(stages)


def check_chatbot_lora(stages, runs):
    chatbot = stages_of(runs, "chatbot")
    # chatbot.yaml's data stages, reused by fingerprint.
    for stage in ("ingest", "sample", "preprocess", "tokenize"):
        assert stages[stage].fingerprint == chatbot[stage].fingerprint and stages[stage].status == "cached"
    files = published_files(stages)
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    adapter = read_json(published(stages) / "model" / "adapter_config.json")
    assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"]) == ("LORA", 8, 32)
    # r=8 on c_attn of the 1 block: A is n_embd x 8, B is 8 x 3 n_embd.
    assert train_stats(stages)["trainable_params"] == 8 * (N_EMBD + 3 * N_EMBD)


def check_classification(stages):
    m = metrics(stages)
    assert (m["task"], m["split"], m["examples"]) == ("classification", "test", 12)
    assert isinstance(m["accuracy"], float) and 0.0 <= m["accuracy"] <= 1.0
    assert set(m["per_class"]) == {"cancel", "order_status", "return", "shipping", "troubleshoot", "warranty"}
    assert all(c["support"] == 2 for c in m["per_class"].values())  # stratified
    return train_stats(stages)


def check_classification_full(stages, runs):
    stats = check_classification(stages)
    assert stats["method"] == "full" and stats["trainable_params"] == stats["total_params"]


def check_classification_frozen(stages, runs):
    stats = check_classification(stages)
    full = train_stats(stages_of(runs, "classification_full"))
    # The head alone (6 intents x n_embd, no bias) trains; the frozen blocks have no gradients.
    assert stats["method"] == "freeze" and stats["trainable_params"] == 6 * N_EMBD
    assert stats["total_params"] == full["total_params"] and stats["trainable_params"] < full["trainable_params"] / 100


def check_instruction(stages, runs):
    tokenize = stages["tokenize"].stats
    assert tokenize["packing"] == "bins" and meta(stages)["packing"] == "bins"
    train = tokenize["splits"]["train"]
    assert train["rows"] < train["examples"] and train["truncated"] == 0  # whole examples, several a block
    [generation] = metrics(stages)["generations"]
    assert generation["prompt"].startswith("### Instruction:\n") and generation["prompt"].endswith("### Response:\n")


def check_dpo(stages, runs):
    assert list(stages) == ["ingest", "sample", "preprocess", "tokenize", "reference", "train", "evaluate", "publish"]
    assert stages["reference"].status == "ran"
    m = metrics(stages)
    assert m["task"] == "preference" and 0.0 <= m["rewards/accuracies"] <= 1.0
    assert all(math.isfinite(m[k]) for k in ("eval_loss", "rewards/chosen", "rewards/rejected", "rewards/margins"))
    # The policy starts as its reference (the chatbot), so the first loss is -log sigmoid(0).
    log = read_jsonl(output(stages, "train") / "train_log.jsonl")
    assert log[0]["step"] == 1 and abs(log[0]["loss"] - math.log(2.0)) < 1e-4
    chatbot = published(stages_of(runs, "chatbot"))
    assert read_json(published(stages) / "base.json")["registry"] == {"model": "recipe-chatbot", "version": chatbot.name}
    assert train_stats(stages)["method"] == "lora" and "model.safetensors" not in published_files(stages)


def check_adapter(stages, runs):
    stats = train_stats(stages)
    assert stats["method"] == "prompt_tuning" and stats["trainable_params"] == 4 * N_EMBD
    assert read_json(published(stages) / "model" / "adapter_config.json")["num_virtual_tokens"] == 4
    files = published_files(stages)
    assert "model.safetensors" not in files
    assert (published(stages) / "model" / "adapter_model.safetensors").stat().st_size < 4096
    assert (meta(stages)["packing"], meta(stages)["block_size"] + 4) == ("none", 256)


CHECKS = {
    "summarizer": check_summarizer,
    "lm_full": check_lm_full,
    "chatbot": check_chatbot,
    "chatbot_lora": check_chatbot_lora,
    "classification_full": check_classification_full,
    "classification_frozen": check_classification_frozen,
    "instruction": check_instruction,
    "dpo": check_dpo,
    "adapter_support": check_adapter,
    "adapter_docs": check_adapter,
}


@pytest.mark.parametrize("name", list(TINY))
def test_the_recipe_runs_end_to_end_and_does_what_it_is_for(recipe_runs, name):
    stages = stages_of(recipe_runs, name)
    raw = recipe_yaml(name)
    if raw.get("task") != "preference":
        assert list(stages) == LM_STAGES
    version = published(stages)
    assert version.parent.name == raw["registry"]["model_name"]
    assert (version / "manifest.json").is_file() and (version / "metrics.json").is_file()
    # Built on the version the base recipe (or, for dpo, chatbot) published in this run.
    if name != "dpo":
        base = published(stages_of(recipe_runs, "base"))
        assert read_json(version / "base.json")["registry"] == {"model": "recipe-base", "version": base.name}
    CHECKS[name](stages, recipe_runs)


def test_the_base_is_pretrained_from_scratch_with_256_positions(recipe_runs):
    stages = stages_of(recipe_runs, "base")
    version = published(stages)
    assert version.parent.name == "recipe-base"
    config = read_json(version / "model" / "config.json")
    # The tokenizer's 1,000 ids, padded to a multiple of 64 (model.vocab_multiple).
    assert (config["n_positions"], config["n_layer"], config["n_embd"], config["vocab_size"]) == (256, 1, N_EMBD, 1024)
    assert not (version / "base.json").exists()  # from scratch: no base of its own
    assert train_stats(stages)["steps"] == 3


# ---------------------------------------------------------------- the recipe files


def test_every_recipe_file_is_run_here():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == {"base", *TINY}
    assert set(CHECKS) == set(TINY)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_header_names_the_command_that_runs_the_recipe(path):
    lines = path.read_text().splitlines()
    header = "\n".join(lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert f"tunepipe run examples/recipes/{path.name}" in header


# Made from seeds alone; wiki.jsonl, instructions.jsonl and pretrain.jsonl parse the running Python's standard
# library, so they repeat only on the Python the committed files were made with (3.11).
SEEDED = ["articles.csv", "intents.csv", "preference.jsonl", "preference_chat.jsonl"]
STDLIB = ["instructions.jsonl", "pretrain.jsonl", "wiki.jsonl"]


def test_make_data_writes_the_committed_files_byte_for_byte(tmp_path):
    out = tmp_path / "data"
    subprocess.run([sys.executable, "examples/recipes/make_data.py", "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in COMMITTED_DATA.iterdir()) == sorted(SEEDED + STDLIB)
    compared = SEEDED + (STDLIB if sys.version_info[:2] == (3, 11) else [])
    differing = [f for f in compared if (out / f).read_bytes() != (COMMITTED_DATA / f).read_bytes()]
    assert differing == []
