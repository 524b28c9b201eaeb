"""Load a published version for inference: verified, offline, with its base and its own template.

    from pipeline.registry.loading import load_version
    loaded = load_version("registry", "support-bot@production")
    ids = loaded.tokenizer(loaded.format_prompt("How do I reset my password?"), return_tensors="pt")

The version is read from its verified local copy (local_copy.py). An adapters-only version loads
its base from where `base.json` points: a `base/` folder pulled beside it (`registry pull
--with-base`), the base's own version in the registry, or a hub id at its recorded revision. Only
the last needs the Hugging Face Hub (or its local cache); the others need the registry alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import MANIFEST
from pipeline.registry import aliases
from pipeline.registry.base_records import base_registry, read_base, require_registry_ref
from pipeline.registry.bases import TRAINED_JSON, version_layout
from pipeline.registry.local_copy import local_copy
from pipeline.registry.names import RegistryError

_ARCHITECTURE_TASKS = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm", "ForSequenceClassification": "classification",
                       "ForConditionalGeneration": "seq2seq", "ForSeq2SeqLM": "seq2seq"}


@dataclass
class LoadedVersion:
    model: Any
    tokenizer: Any
    name: str
    version: str
    task: str
    folder: Path
    base: dict | None = None
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"

    def format_prompt(self, text: str) -> str:
        return prompt_formatter(self.config, self.tokenizer)(text)


def load_version(registry: str, reference: str) -> LoadedVersion:
    """`MODEL@ALIAS` or `MODEL@VERSION` from `registry`, ready for inference (eval mode)."""
    model, version = aliases.resolve(registry, reference)
    return load_copy(local_copy(registry, model, version), registry)


def version_record(folder: Path) -> dict:
    """How the version's model was saved (model/tunepipe_trained.json; a pushed plain folder: whole)."""
    return version_layout(folder)[2]


def version_task(folder: Path, record: dict) -> str:
    """What kind of model the version holds (the Auto class's task): a preference-tuned model is a causal LM."""
    task = record.get("task") or _read_json(folder / "metrics.json").get("task")
    if task:
        return "causal_lm" if task == "preference" else task
    for architecture in record.get("config", {}).get("architectures") or []:
        for suffix, task in _ARCHITECTURE_TASKS.items():
            if architecture.endswith(suffix):
                return task
    return "causal_lm"


def base_location(folder: Path, registry: str | None) -> tuple[str | None, dict]:
    """(where the base of an adapters-only version loads from, extra from_pretrained kwargs)."""
    reference = read_base(str(folder))
    if reference is None:
        return None, {}  # an older version: the base recorded at save time
    if "registry" in reference:
        return str(version_layout(base_copy(folder, reference, registry))[0]), {}
    if "hub" in reference:
        return reference["hub"], ({"revision": reference["revision"]} if reference.get("revision") else {})
    path = Path(reference["path"])
    if not path.is_dir():
        raise RegistryError(f"{folder}: its base was the local folder {path}, which is not on this machine")
    return str(path), {}


def base_copy(folder: Path, reference: dict, registry: str | None) -> Path:
    """The verified copy of a registry base: pulled beside the version (`--with-base`), else from the registry."""
    pulled = folder / "base"
    if (pulled / MANIFEST).is_file():
        return pulled
    if registry is None:
        raise RegistryError(f"{folder}: its base is {require_registry_ref(reference)}; pull it with --with-base or load from the registry")
    model, version = require_registry_ref(reference)
    return local_copy(base_registry(reference, registry), model, version)


def load_copy(folder: Path, registry: str | None = None) -> LoadedVersion:
    """Load a verified copy of a version (layout as in the registry)."""
    from transformers import AutoTokenizer

    from pipeline.train.methods import load_trained
    from pipeline.train.modeling import AUTO_CLASSES

    folder = Path(folder)
    model_dir, tokenizer_dir, record = version_layout(folder)
    task = version_task(folder, record)
    if (model_dir / TRAINED_JSON).is_file():
        base, kwargs = base_location(folder, registry) if record.get("method") != "full" else (None, {})
        model = load_trained(model_dir, task, base=base, **kwargs)
    else:  # a pushed plain Hugging Face folder
        model = AUTO_CLASSES[task].from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    manifest = _read_json(folder / MANIFEST)
    return LoadedVersion(
        model=model,
        tokenizer=tokenizer,
        name=manifest.get("model_name", folder.name),
        version=manifest.get("version", ""),
        task=task,
        folder=folder,
        base=read_base(str(folder)),
        config=version_config(folder),
        metrics=_read_json(folder / "metrics.json"),
    )


def prompt_formatter(config: dict, tokenizer):
    """The text a version was trained to answer after: the user's words normalised as preprocess
    did, then put in its prompt template (or the tokenizer's chat template for a chat model)."""
    preprocess = config.get("preprocess") or {}
    normalize = _normalizer(preprocess)
    template = preprocess.get("template", "prompt_response")

    def format_prompt(text: str) -> str:
        text = normalize(text)
        if template == "prompt_response":
            return preprocess.get("prompt_template", "{prompt}").format_map({"prompt": text})
        if template == "instruction":
            return preprocess.get("instruction_template_no_input", "{instruction}").format_map({"instruction": text})
        if template == "chat" and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return text

    return format_prompt


def _normalizer(preprocess: dict):
    from pipeline.config import PreprocessConfig
    from pipeline.data.normalize import make_normalizer

    known = {k: v for k, v in preprocess.items() if k in PreprocessConfig.model_fields}
    try:
        normalize = make_normalizer(PreprocessConfig(**known))
    except ValueError:
        return lambda text: text
    return lambda text: (normalize([text]).to_pylist()[0] or "")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def version_config(copy: Path) -> dict:
    """The resolved config a version was made with (its `config.yaml`); {} for a pushed folder."""
    try:
        return yaml.safe_load((copy / "config.yaml").read_text()) or {}
    except FileNotFoundError:
        return {}
