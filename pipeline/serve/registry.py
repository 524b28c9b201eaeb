"""`tunepipe serve`: a base version and adapter versions from the registry, served OpenAI-style.

    tunepipe serve --registry registry --base lm@production \
        --adapter support=support-bot@latest --adapter docs=docs-bot@latest --port 8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").completions.create(model="support", ...)

Every version is read from its verified local copy. Each adapter must record the base it was
trained on (base.json), and all must name the same one: an adapter on another base's weights would
answer with noise, so that is refused before anything is loaded. Without `--base`, the base is the
one the adapters name (a registry version, or a hub id at its revision). The base is loaded once
and served under its own reference (e.g. `lm@production`); each adapter under its NAME, with its
own version's prompt template.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.registry import aliases
from pipeline.registry.base_records import base_registry, read_base
from pipeline.registry.loading import load_version, prompt_formatter, version_config, version_record
from pipeline.registry.local_copy import local_copy
from pipeline.registry.names import RegistryError, check_name


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=MODEL@X` options -> {name: reference}, names unique and plain."""
    found: dict[str, str] = {}
    for spec in specs:
        name, sep, reference = spec.partition("=")
        if not sep or "@" not in reference:
            raise RegistryError(f"--adapter {spec!r}: expected NAME=MODEL@X, e.g. support=support-bot@latest")
        check_name("--adapter name", name)
        if name in found:
            raise RegistryError(f"--adapter {name!r} is given twice")
        found[name] = reference
    return found


def adapter_copies(registry: str, adapters: dict[str, str]) -> dict[str, tuple[Path, dict]]:
    """name -> (verified local copy, its base reference), each checked to be a PEFT adapter version."""
    out = {}
    for name, reference in adapters.items():
        model, version = aliases.resolve(registry, reference)
        copy = local_copy(registry, model, version)
        record = version_record(copy)
        if record.get("method") != "peft":
            raise RegistryError(f"--adapter {name}={reference}: {model}@{version} is not a PEFT adapter version "
                                f"(it holds {record.get('trained_with', record.get('method'))}); serve a whole model as --base")
        base = read_base(str(copy))
        if base is None:
            raise RegistryError(f"--adapter {name}={reference}: {model}@{version} records no base (published before "
                                "base.json existed); republish it")
        out[name] = (copy, base)
    return out


def check_trained_on(loaded, adapters: dict[str, tuple[Path, dict]], registry: str) -> None:
    """Each adapter (adapter_copies) was trained on the loaded base version, or RegistryError naming it."""
    for name, (_, reference) in adapters.items():
        if not _same_base(reference, registry, loaded.name, loaded.version):
            raise RegistryError(f"--adapter {name}: trained on {_describe(reference)}, not on {loaded.reference}; "
                                "an adapter only fits the base it was trained on")


def adapter_formats(adapters: dict[str, tuple[Path, dict]], tokenizer) -> dict:
    """name -> the prompt template of that adapter's own version (what it was trained on)."""
    return {name: prompt_formatter(version_config(copy), tokenizer) for name, (copy, _) in adapters.items()}


def _same_base(reference: dict, registry: str, model: str, version: str) -> bool:
    if "registry" not in reference:
        return False
    return (reference["registry"].get("model"), reference["registry"].get("version")) == (model, version) and \
        base_registry(reference, registry) == registry


def serve_from_registry(registry: str, base: str | None, adapter_specs: list[str], host: str, port: int) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.serve.catalog import Catalog
    from pipeline.serve.http import serve

    adapters = adapter_copies(registry, parse_adapters(adapter_specs))
    if base is not None:
        loaded = load_version(registry, base)
        if loaded.task != "causal_lm":
            raise RegistryError(f"--base {base}: {loaded.reference} is a {loaded.task} model; completions need a causal LM")
        check_trained_on(loaded, adapters, registry)
        # Served under the name it was asked for (`lm@production`): what clients were told to use.
        model, tokenizer, base_name = loaded.model, loaded.tokenizer, base
        formats = {base_name: loaded.format_prompt}
    else:
        if not adapters:
            raise RegistryError("nothing to serve: give --base MODEL@X and/or --adapter NAME=MODEL@X")
        references = {_describe(ref) for _, ref in adapters.values()}
        if len(references) > 1:
            raise RegistryError(f"the adapters were trained on different bases ({', '.join(sorted(references))}); "
                                "one server holds one base")
        first_copy, reference = next(iter(adapters.values()))
        if "registry" in reference:
            loaded = load_version(base_registry(reference, registry), f"{reference['registry']['model']}@{reference['registry']['version']}")
            model, tokenizer, base_name = loaded.model, loaded.tokenizer, loaded.reference
            formats = {base_name: loaded.format_prompt}
        elif "hub" in reference:
            model = AutoModelForCausalLM.from_pretrained(reference["hub"], revision=reference.get("revision")).eval()
            tokenizer, base_name = AutoTokenizer.from_pretrained(first_copy / "tokenizer"), reference["hub"]
            formats = {}  # a hub model has no template of ours: prompts go as they are
        else:
            raise RegistryError(f"the adapters' base {_describe(reference)} is not in the registry or on the hub")
    formats.update(adapter_formats(adapters, tokenizer))
    catalog = Catalog(model, tokenizer, {name: copy / "model" for name, (copy, _) in adapters.items()},
                      base_name=base_name, format_prompt=formats)
    serve(catalog, host, port)
    return 0


def _describe(reference: dict) -> str:
    if "registry" in reference:
        return f"{reference['registry'].get('model')}@{reference['registry'].get('version')}"
    if "hub" in reference:
        return f"{reference['hub']} (revision {reference.get('revision') or 'unrecorded'})"
    return str(reference.get("path", reference))
