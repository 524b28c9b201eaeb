"""Two prompt-tuned adapters on one base, the base loaded once: train both, then answer side by side.

    tunepipe run examples/recipes/base.yaml             # once: publishes recipe-base (~3 minutes on 2 CPU cores)
    python examples/recipes/two_adapters.py             # both adapters, then the comparison (~9 minutes on 2 busy cores)
    python examples/recipes/two_adapters.py --set train.max_steps=200 --registry registry --workdir runs
    tunepipe serve --base recipe-base@latest --adapter support=recipe-adapter-support@latest \
        --adapter docs=recipe-adapter-docs@latest       # the same two adapters on one base, over HTTP

Run from the repository root (the configs name their data relative to it). Each `--set KEY=VALUE`
goes to both configs; `--registry` sets `registry.url`.

1. adapter_support.yaml and adapter_docs.yaml run through the pipeline in this process. Each
   publishes a version whose model/ holds a soft prompt of 4 virtual tokens: a few KB, no weights
   of the base.
2. The base version is loaded once and both adapters are attached to it through the serving
   catalog (pipeline/serve/catalog.py), exactly as `tunepipe serve` holds them. The base module
   is the same object under either adapter, and resident memory grows by far less than the base's
   parameter bytes when both are attached: both are printed.
3. A few prompts are answered by the base alone and by each adapter, each in its own version's
   prompt template (greedy, so the table repeats), and the `tunepipe serve` command that serves
   the same three models over HTTP is printed last.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import load_config
from pipeline.registry.bases import SCHEME
from pipeline.registry.loading import load_version
from pipeline.registry.names import RegistryError
from pipeline.run_report import text_table
from pipeline.serve.catalog import Catalog
from pipeline.serve.http import resident_bytes
from pipeline.serve.registry import adapter_copies, adapter_formats, check_trained_on
from pipeline.stages import run_stages

HERE = Path(__file__).resolve().parent
CONFIGS = {"support": HERE / "adapter_support.yaml", "docs": HERE / "adapter_docs.yaml"}
"""Adapter name (as served) -> the recipe that trains it."""
PROMPTS = [
    "How long is the warranty on the NovaSound headset?",
    "Can I return a PixelView 27 monitor I bought last week?",
    "The event loop",
]
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class HeldOnce:
    """What shows that the base is held once under both adapters."""

    base_parameter_bytes: int
    """The base's parameters (tied weights once), as loaded."""
    rss_before_adapters: int | None
    """Resident memory of this process with the base loaded, before any adapter; None where unreadable."""
    rss_after_adapters: int | None
    base_shared: bool
    """The base module under each adapter is the very object that was loaded."""
    adapter_bytes: dict[str, int]
    """Adapter name -> size of its adapter_model.safetensors."""

    @property
    def rss_growth(self) -> int | None:
        if self.rss_before_adapters is None or self.rss_after_adapters is None:
            return None
        return self.rss_after_adapters - self.rss_before_adapters


def train_adapters(registry: str, workdir: str, overrides: list[str]) -> tuple[str, dict[str, str]]:
    """Run both recipes (cached, like `tunepipe run`); (the base reference they name, name -> the
    published adapter's MODEL@VERSION)."""
    published, bases = {}, set()
    for name, path in CONFIGS.items():
        cfg = load_config(path, [*overrides, f"registry.url={registry}"])
        for line in cfg.ignored_settings():
            print(f"[{name}] warning: {line}", file=sys.stderr)
        results = run_stages(cfg, workdir, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        published[name] = f"{cfg.registry.model_name}@{results[-1].stats['version']}"
        bases.add((cfg.model.name, cfg.model.registry))
    (base_name, base_registry), *others = bases
    if others or not base_name.startswith(SCHEME):
        # A hub base (--set model.name=gpt2) is served by `tunepipe serve` alone, which loads it from the hub.
        raise RegistryError(f"this recipe loads one registry base for both adapters; the configs name {sorted(bases)}")
    if base_registry != registry:
        raise RegistryError(f"the base is in {base_registry}, the adapters in {registry}: keep them in one registry")
    return base_name[len(SCHEME):], published


def attach_both(registry: str, base: str, adapters: dict[str, str]) -> tuple[Catalog, HeldOnce]:
    """The base version `base` loaded once, each adapter version in `adapters` (name -> MODEL@X)
    attached to it in a serving catalog, and the measurements that show the base is not copied."""
    import peft  # noqa: F401  imported before the first reading: its import is not the adapters' memory

    copies = adapter_copies(registry, adapters)  # verified copies, each checked to be a PEFT adapter
    loaded = load_version(registry, base)
    check_trained_on(loaded, copies, registry)  # the same check as `tunepipe serve`
    base_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    formats = {base: loaded.format_prompt, **adapter_formats(copies, loaded.tokenizer)}

    gc.collect()
    before = resident_bytes()
    catalog = Catalog(loaded.model, loaded.tokenizer, {name: copy / "model" for name, (copy, _) in copies.items()},
                      base_name=base, format_prompt=formats)
    gc.collect()
    after = resident_bytes()

    shared = True
    for name in copies:
        with catalog.selected(name) as module:
            shared = shared and module.get_base_model() is loaded.model
    sizes = {name: (copy / "model" / ADAPTER_FILE).stat().st_size for name, (copy, _) in copies.items()}
    return catalog, HeldOnce(base_bytes, before, after, shared, sizes)


def side_by_side(catalog: Catalog, prompts: list[str], max_tokens: int = 24) -> str:
    """A table: one row per prompt, one column per model (the base first), greedy answers."""
    rows = [[prompt, *(_cell(catalog.complete(model, prompt, max_tokens=max_tokens).text) for model in catalog.names())]
            for prompt in prompts]
    return text_table(rows, ["prompt", *catalog.names()])


def _cell(text: str, width: int = 40) -> str:
    # repr: an answer of spaces or newlines (a barely trained model's) shows as what it is, not as a blank.
    text = repr(text)
    return text if len(text) <= width else text[: width - 4] + "...'"


def serve_command(registry: str, base: str, adapters: dict[str, str]) -> str:
    words = ["tunepipe", "serve", *(["--registry", registry] if registry != "registry" else []), "--base", base]
    for name, reference in adapters.items():
        words += ["--adapter", f"{name}={reference}"]
    return shlex.join(words)


def _mib(n: int, sign: str = "") -> str:
    return f"{n / 2**20:{sign}.2f} MiB"


def report(held: HeldOnce, adapters: dict[str, str]) -> str:
    lines = [f"adapter {name} ({adapters[name]}): {size:,} bytes" for name, size in held.adapter_bytes.items()]
    lines.append(f"base parameters: {_mib(held.base_parameter_bytes)}; the same base module under every adapter: {held.base_shared}")
    if held.rss_growth is None:
        lines.append("resident memory: not readable on this system")
    else:
        lines.append(f"resident memory: {_mib(held.rss_before_adapters)} with the base, {_mib(held.rss_after_adapters)} with both "
                     f"adapters attached: {_mib(held.rss_growth, '+')} "
                     f"({held.rss_growth / held.base_parameter_bytes:.1%} of the base's parameter bytes)")
    return "\n".join(lines)


@dataclass
class Recipe:
    base: str
    """The base version's reference (MODEL@X), as the configs name it."""
    adapters: dict[str, str]
    """Adapter name -> the version published for it (MODEL@VERSION)."""
    catalog: Catalog
    held: HeldOnce


def run(argv: list[str] | None = None) -> Recipe:
    """Everything `main` does; returns what it loaded and measured."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of both configs (repeatable)")
    p.add_argument("--registry", default="registry", help="registry root: folder or s3:// URL (default: registry)")
    p.add_argument("--workdir", default="runs", help="where stage outputs live (default: runs)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens each model generates per prompt (default: 24)")
    args = p.parse_args(argv)

    base, adapters = train_adapters(args.registry, args.workdir, args.set)
    catalog, held = attach_both(args.registry, base, adapters)
    print(report(held, adapters))
    print(side_by_side(catalog, PROMPTS, args.max_tokens))
    print("the same base and adapters over HTTP (OpenAI's completions API):")
    print("  " + serve_command(args.registry, base, adapters))
    return Recipe(base, adapters, catalog, held)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
