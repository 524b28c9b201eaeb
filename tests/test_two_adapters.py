"""The two-adapter recipe (examples/recipes/two_adapters.py) at a tiny size: a 1-layer recipe base
published first, then both prompt-tuned adapters trained, published as a few KB each, attached to
one base held once, compared side by side, and named in a `tunepipe serve` command."""

from __future__ import annotations

import importlib.util
import io
import json
import shlex
import sys
from contextlib import redirect_stdout

import pytest
from tiny import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # three pipelines, each training in a torchrun process

RECIPES = REPO / "examples" / "recipes"
TINY_BASE = [
    "sample.count=200", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "tokenize.vocab_size=400",
    # tokenize.block_size stays 256: the adapters' blocks (252) and soft prompts (4) need its 256 positions.
    "train.max_steps=3", "train.eval_every_steps=null", "train.warmup_steps=0",
    "train.tensorboard=false", "evaluate.num_generations=0", "evaluate.max_batches=1",
]
TINY_ADAPTERS = [
    "sample.count=64", "train.max_steps=8", "train.warmup_steps=0", "train.tensorboard=false",
    "evaluate.num_generations=0", "evaluate.max_batches=1", "evaluate.max_perplexity=null",
]
MIB = 2**20
# Resident memory moves in pages and allocator arenas, not bytes. Attaching both adapters grew it by
# 0 bytes when the process had loaded a PEFT model before (as evaluate has, here) and by 1.6 MiB in
# a fresh process (PEFT's lazily imported tuner code): so 4 MiB of slack on top of 10 % of the base.
# At this size the slack dwarfs the 0.13 MiB base, so the RSS bound only catches gross copies; the
# identity and storage checks below are what pin "held once" down at any size.
RSS_SLACK = 4 * MIB


def _recipe_module():
    spec = importlib.util.spec_from_file_location("two_adapters_recipe", RECIPES / "two_adapters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    import torch

    from pipeline.config import load_config
    from pipeline.stages import run_stages

    root = tmp_path_factory.mktemp("two-adapters")
    registry, workdir = root / "registry", root / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny in-process models: see conftest.py's one_thread
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(REPO)  # the recipes name their data relative to the repository root
            base = run_stages(load_config(RECIPES / "base.yaml", [*TINY_BASE, f"registry.url={registry}"]), str(workdir),
                              log=lambda line: None)
            argv = ["--registry", str(registry), "--workdir", str(workdir), "--max-tokens", "8"]
            for override in TINY_ADAPTERS:
                argv += ["--set", override]
            printed = io.StringIO()
            with redirect_stdout(printed):
                result = _recipe_module().run(argv)
        yield {"registry": registry, "base_version": base[-1].stats["version"], "result": result, "printed": printed.getvalue()}
    finally:
        torch.set_num_threads(threads)


def test_both_adapters_published_as_soft_prompts_of_a_few_kb(recipe):
    registry, result = recipe["registry"], recipe["result"]
    base_weights = registry / "recipe-base" / recipe["base_version"] / "model" / "model.safetensors"
    assert result.base == "recipe-base@latest"
    assert set(result.adapters) == {"support", "docs"}
    for name, reference in result.adapters.items():
        model, version = reference.split("@")
        assert model == f"recipe-adapter-{name}"
        folder = registry / model / version
        assert sorted(p.name for p in (folder / "model").iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "tunepipe_trained.json"]
        size = (folder / "model" / "adapter_model.safetensors").stat().st_size
        # 4 virtual tokens x 32 dims x 4 bytes, plus the safetensors header: no weight of the base.
        assert 4 * 32 * 4 <= size < 4096 and size < base_weights.stat().st_size / 50, size
        assert result.held.adapter_bytes[name] == size
        lineage = json.loads((folder / "lineage.json").read_text())
        assert lineage["train"]["config"]["train"]["method"] == "prompt_tuning"
        assert lineage["train"]["config"]["train"]["num_virtual_tokens"] == 4
        assert json.loads((folder / "model" / "adapter_config.json").read_text())["num_virtual_tokens"] == 4
        assert json.loads((folder / "base.json").read_text())["registry"] == {"model": "recipe-base", "version": recipe["base_version"]}


def test_the_base_is_held_once(recipe):
    catalog, held = recipe["result"].catalog, recipe["result"].held
    assert held.base_shared
    base_storage = {p.data_ptr() for p in catalog.base_model.parameters()}
    for name in ("support", "docs"):
        with catalog.selected(name) as module:
            assert module.get_base_model() is catalog.base_model
            # Whatever the adapter's module holds beyond the base's own tensors is the soft prompts alone.
            extra = [p for p in module.parameters() if p.data_ptr() not in base_storage]
            assert sum(p.numel() * p.element_size() for p in extra) <= sum(held.adapter_bytes.values())
    assert held.base_parameter_bytes == sum(p.numel() * 4 for p in catalog.base_model.parameters())
    assert held.rss_growth is not None and held.rss_growth < 0.10 * held.base_parameter_bytes + RSS_SLACK, held


def test_each_adapter_changes_what_the_base_answers(recipe):
    """Each version answers in its own template; a soft prompt of 8 steps on a 1-layer base barely
    moves its greedy text, so the difference is asserted on the next-token logits of one prompt."""
    import torch

    catalog = recipe["result"].catalog
    assert catalog.names() == ["recipe-base@latest", "support", "docs"]
    assert catalog.format_prompt("support", "Is it waterproof?") == "Question: Is it waterproof?\nAnswer:"
    assert catalog.format_prompt("docs", "The event loop") == catalog.format_prompt("recipe-base@latest", "The event loop") == "The event loop"
    ids = catalog.tokenizer("The event loop", return_tensors="pt", add_special_tokens=False)["input_ids"]
    last = {}
    for name in catalog.names():
        with catalog.selected(name) as module, torch.no_grad():
            last[name] = module(input_ids=ids).logits[0, -1]
    assert not torch.allclose(last["support"], last["docs"], atol=1e-4)
    for name in ("support", "docs"):
        assert not torch.allclose(last[name], last["recipe-base@latest"], atol=1e-4), name


def test_prints_sizes_memory_the_table_and_the_serve_command(recipe):
    from pipeline.cli import build_parser

    printed, result, registry = recipe["printed"], recipe["result"], str(recipe["registry"])
    for name, reference in result.adapters.items():
        assert f"adapter {name} ({reference}): {result.held.adapter_bytes[name]:,} bytes" in printed
    assert "the same base module under every adapter: True" in printed
    assert f"resident memory: {result.held.rss_before_adapters / MIB:.2f} MiB with the base" in printed
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("prompt "))
    assert lines[header].split() == ["prompt", "recipe-base@latest", "support", "docs"]
    assert [line.split()[:3] for line in lines[header + 2: header + 5]] == [
        ["How", "long", "is"], ["Can", "I", "return"], ["The", "event", "loop"]]
    command = lines[-1].strip()
    assert command == shlex.join(["tunepipe", "serve", "--registry", registry, "--base", "recipe-base@latest",
                                  "--adapter", f"support={result.adapters['support']}",
                                  "--adapter", f"docs={result.adapters['docs']}"])
    args = build_parser().parse_args(shlex.split(command)[1:])  # what `tunepipe serve` itself accepts
    assert (args.command, args.registry, args.base) == ("serve", registry, "recipe-base@latest")
