"""Published models as bases: `model.name: registry://MODEL@ALIAS` (or `@VERSION`).

The name is looked up in `model.registry` (default `registry.url`) when the run is planned; the
version's local copy is verified (local_copy.py); its reference and manifest digest join the train
fingerprint (train/fingerprint.py), so moving the alias retrains and the lineage names the exact
version a model started from. The stages read the base through `model_source`:

    model_source(cfg.model)        # what from_pretrained loads: the name itself, or the local folder of a registry base
    registry_base(cfg.model)       # RegistryBase(registry, model, version, manifest_sha256) or None

Light on purpose: tokenize, train and evaluate import this module, and every module it imports
(even lazily) is part of their code fingerprint; what publishing and loading need of bases is in
base_records.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline import artifacts
from pipeline.artifacts import MANIFEST
from pipeline.config import ModelConfig
from pipeline.registry.names import RegistryError, version_url

SCHEME = "registry://"
TRAINED_JSON = "tunepipe_trained.json"  # train/methods/base.py's name; not imported from there: that imports torch


@dataclass(frozen=True)
class RegistryBase:
    registry: str
    model: str
    version: str
    manifest_sha256: str

    @property
    def reference(self) -> str:
        return f"{self.model}@{self.version}"


def is_registry_name(name: str) -> bool:
    return name.startswith(SCHEME)


def registry_base(model: ModelConfig) -> RegistryBase | None:
    """The published version a `registry://MODEL@X` name resolves to now (None for other names)."""
    if model.init != "pretrained" or not is_registry_name(model.name):
        return None
    from pipeline.registry import aliases

    registry = model.registry or "registry"
    name, version = aliases.resolve(registry, model.name[len(SCHEME) :])
    fs, path = artifacts.filesystem(artifacts.join(version_url(registry, name, version), MANIFEST))
    return RegistryBase(registry, name, version, hashlib.sha256(fs.cat_file(path)).hexdigest())


def model_source(model: ModelConfig) -> str:
    """What `from_pretrained` loads for this config: `model.name` itself, or for a registry base a
    plain Hugging Face folder (weights, config and tokenizer side by side) made once per machine
    from the version's verified local copy."""
    base = registry_base(model)
    if base is None:
        return model.name
    from pipeline.registry.local_copy import derived_folder, local_copy

    copy = local_copy(base.registry, base.model, base.version)
    record = version_layout(copy)[2]
    if record.get("method") != "full":
        raise RegistryError(
            f"model.name {model.name}: {base.reference} holds {record.get('trained_with', 'adapter')} adapters only, not a "
            f"whole model; start from the base it names, or `tunepipe registry export {base.reference} DIR --merge` and "
            "`tunepipe registry push DIR NAME VERSION` to publish the merged model as a base"
        )
    return str(derived_folder(base.registry, base.model, base.version, "hf", lambda dest: write_whole_model(copy, dest)))


def version_layout(copy: Path) -> tuple[Path, Path, dict]:
    """(model folder, tokenizer folder, how the model was saved) of a version's copy. A version the
    pipeline published has model/ (with tunepipe_trained.json) and tokenizer/; one pushed from a
    plain Hugging Face folder (`registry push`, e.g. an `export --merge`) is a whole model whose
    weights, config and tokenizer sit side by side."""
    record_path = copy / "model" / TRAINED_JSON
    if record_path.is_file():
        return copy / "model", copy / "tokenizer", json.loads(record_path.read_text())
    if (copy / "config.json").is_file():
        config = json.loads((copy / "config.json").read_text())
        return copy, copy, {"method": "full", "trained_with": "a pushed Hugging Face folder", "base": None, "config": config}
    raise RegistryError(f"{copy}: neither model/{TRAINED_JSON} (a version the pipeline published) nor config.json "
                        "(a pushed Hugging Face folder): not a model version")


def write_whole_model(copy: Path, dest: Path) -> None:
    """A whole-model version's weights, config and tokenizer, side by side in `dest` (plain
    Hugging Face layout; tunepipe's own record left out)."""
    model_dir, tokenizer_dir, _ = version_layout(copy)
    for folder in dict.fromkeys((model_dir, tokenizer_dir)):
        copy_plain_files(folder, dest)


def copy_plain_files(folder: Path, dest: Path, skip: frozenset[str] = frozenset()) -> None:
    """The files of `folder` into `dest` (made if missing), leaving out tunepipe's own records,
    the names in `skip` and any file `dest` already has."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in (TRAINED_JSON, MANIFEST, *skip) and not (dest / path.name).exists():
            shutil.copy2(path, dest / path.name)


def hub_commit(name: str) -> str:
    """The commit a hub id resolves to now: online, the hub's main; offline (HF_HUB_OFFLINE=1),
    the cached one. A commit's files never change, so it stands for their bytes. Only config.json
    is fetched: the weights download when training loads them."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["config.json"])).name
