"""`tunepipe generate`: one completion from a published version, in the version's own template.

    tunepipe generate support-bot@production --prompt "How do I reset my password?"
    tunepipe generate lm@latest --adapter support-bot@latest --prompt "..."   # an adapter on another base

Greedy decoding (the evaluate stage's `generate`), so the same version answers the same prompt the
same way every time and two versions can be compared.
"""

from __future__ import annotations

import sys

from pipeline.registry import aliases
from pipeline.registry.base_records import read_base
from pipeline.registry.loading import load_version, prompt_formatter, version_config, version_record
from pipeline.registry.local_copy import local_copy
from pipeline.registry.names import RegistryError


def generate_from_registry(registry: str, reference: str, prompt: str, max_new_tokens: int = 40,
                           adapter: str | None = None, raw: bool = False) -> str:
    from pipeline.evaluate.stage import generate

    loaded = load_version(registry, reference)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    if adapter is not None:
        model, config = attach_adapter(registry, adapter, loaded)
    text = prompt if raw else prompt_formatter(config, tokenizer)(prompt)
    return generate(model, tokenizer, text, fitting_answer(model, tokenizer, text, max_new_tokens))


def fitting_answer(model, tokenizer, text: str, max_new_tokens: int) -> int:
    """How many tokens to generate: `max_new_tokens`, or fewer where the model's positions end
    (said on stderr). A prompt that does not fit is refused: never cut, as serve never cuts it."""
    from pipeline.train.methods import virtual_tokens

    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit is None:
        return max_new_tokens
    taken = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + virtual_tokens(model)
    if taken >= limit:
        raise RegistryError(f"the prompt is {taken} tokens after the template, and the model reads at most {limit} positions; "
                            "shorten the prompt")
    if taken + max_new_tokens > limit:
        print(f"tunepipe: note: generating {limit - taken} tokens, not {max_new_tokens}: the model reads at most {limit} "
              f"positions and the prompt takes {taken}", file=sys.stderr)
    return min(max_new_tokens, limit - taken)


def attach_adapter(registry: str, adapter: str, base):
    """(the base with an adapters-only version's PEFT weights on it, that version's config)."""
    from peft import PeftModel

    name, version = aliases.resolve(registry, adapter)
    copy = local_copy(registry, name, version)
    record = version_record(copy)
    if record.get("method") != "peft":
        raise RegistryError(f"{name}@{version} is not a PEFT adapter version (it holds {record.get('trained_with', record.get('method'))}); "
                            "load it on its own")
    if base.task != "causal_lm":
        raise RegistryError(f"generate needs a causal LM; {base.reference} is {base.task}")
    trained_on = (read_base(str(copy)) or {}).get("registry") or {}
    if (trained_on.get("model"), trained_on.get("version")) != (base.name, base.version):
        # Allowed (trying an adapter on a newer base is a fair experiment), but never silently.
        print(f"tunepipe: warning: {name}@{version} was trained on {trained_on.get('model')}@{trained_on.get('version')}, "
              f"not on {base.reference}", file=sys.stderr)
    return PeftModel.from_pretrained(base.model, copy / "model").eval(), version_config(copy)
