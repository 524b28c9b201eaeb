"""The base each version records (`base.json`), so that a version loads from the registry alone.

At publish (`describe_base`, `publish_base`), a version records where its weights started: a
version in the same registry ({"registry": {"model", "version"}}, plus "url" for another
registry), a hub id with its revision ({"hub", "revision"}), or, for a whole model fine-tuned from
a local folder, that folder ({"path"}, informational). An adapters-only version needs its base to
load, so a base that exists nowhere else (the random initialisation of a scratch model, a local
folder) is first published as a version of `<model>-base`, named by its content, and referenced.
`registry pull --with-base` (`pull_base`) copies that base beside the version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipeline import artifacts
from pipeline.artifacts import MANIFEST
from pipeline.config import ModelConfig
from pipeline.registry.bases import TRAINED_JSON, hub_commit, registry_base, version_layout
from pipeline.registry.names import RegistryError, version_url

BASE_JSON = "base.json"


def describe_base(model: ModelConfig, trained_from: dict | None = None) -> dict | None:
    """What `base.json` says for a model trained from `model`: None for a scratch model.
    `trained_from`: the base part of the train stage's recorded content (train/fingerprint.py),
    whose hub commit is the one trained from, even if the hub has moved on since."""
    if model.init == "scratch":
        return None
    base = registry_base(model)
    if base is not None:
        return {"registry": {"model": base.model, "version": base.version}, "url": base.registry}
    if Path(model.name).is_dir():
        return {"path": str(Path(model.name).resolve())}
    if trained_from and trained_from.get("hub") == model.name:
        return {"hub": model.name, "revision": trained_from["revision"]}
    return {"hub": model.name, "revision": hub_commit(model.name)}


def publish_base(folder: Path, tokenizer: Path, registry: str, model_name: str, task: str, scratch: Path) -> dict:
    """Publish a base that exists nowhere else as a version of `<model_name>-base`, named by its
    content (the same initialisation publishes once); return its base.json reference."""
    from pipeline.registry.store import publish_version

    digests = {rel: artifacts.sha256_file(folder / rel) for rel in artifacts.list_files(folder) if not rel.startswith(".")}
    version = artifacts.hash_json(digests)[:12]
    base_name = f"{model_name}-base"
    reference = {"registry": {"model": base_name, "version": version}}
    if artifacts.exists(artifacts.join(version_url(registry, base_name, version), MANIFEST)):
        return reference  # published by an earlier version: the same bytes, no copy needed
    # Staged in the publish stage's scratch, a folder of this publish's own: never beside the base
    # (a local folder of the user's, perhaps read-only).
    bundle = Path(tempfile.mkdtemp(prefix="base-bundle-", dir=scratch))
    try:
        shutil.copytree(folder, bundle / "model", ignore=shutil.ignore_patterns(".*", MANIFEST))
        shutil.copytree(tokenizer, bundle / "tokenizer", ignore=shutil.ignore_patterns(".*", MANIFEST))
        config = json.loads((bundle / "model" / "config.json").read_text())
        # Loaded like any version (methods.load_trained): a whole model, nothing trained on it here.
        record = {"method": "full", "trained_with": "none (initial weights)", "base": None, "config": config, "task": task}
        (bundle / "model" / TRAINED_JSON).write_text(json.dumps(record, indent=1))
        (bundle / "README.md").write_text(
            f"# {base_name} {version}\n\nThe initial weights that adapters-only versions of `{model_name}` were "
            f"trained on, published so that those versions load from the registry alone.\n"
        )
        publish_version(bundle, registry, base_name, version, {"base_files_sha256": artifacts.hash_json(digests)})
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    return reference


def read_base(folder: str) -> dict | None:
    """A version's base.json (None when it has none: a scratch model, or an older version)."""
    try:
        return artifacts.read_json(artifacts.join(folder, BASE_JSON))
    except FileNotFoundError:
        return None


def base_registry(reference: dict, registry: str) -> str:
    """The registry a base reference lives in: its own `url` when it is in another registry."""
    return reference.get("url") or registry


def require_registry_ref(reference: dict) -> tuple[str, str]:
    try:
        return reference["registry"]["model"], reference["registry"]["version"]
    except (KeyError, TypeError):
        raise RegistryError(f"base reference {reference!r} names no registry version") from None


def pull_base(registry: str, pulled: Path) -> str | None:
    """Pull the base of the version copied at `pulled` into `pulled/base` (verified), so the copy
    loads offline with nothing else; None for a whole model. A hub base is named, not copied."""
    from pipeline.registry.local_copy import pull_version

    reference = read_base(str(pulled))
    record = version_layout(Path(pulled))[2]
    if record.get("method") == "full" or reference is None or ("registry" not in reference and "hub" not in reference):
        return None  # a whole model loads alone
    if "hub" in reference:
        return f"the hub model {reference['hub']} (revision {reference.get('revision') or 'unrecorded'}), not in the registry"
    model, version = require_registry_ref(reference)
    return str(pull_version(base_registry(reference, registry), model, version, Path(pulled) / "base"))


def adapter_base_name(base: dict) -> tuple[str, str | None]:
    """How a published adapter_config.json names its base: the hub id and revision, or
    `registry://MODEL@VERSION` (base.json says which registry). Never the trainer's local path,
    which PEFT records and which means nothing on another machine."""
    if "hub" in base:
        return base["hub"], base.get("revision")
    return f"registry://{base['registry']['model']}@{base['registry']['version']}", None


def point_adapter_at(config_path: Path, base: str | None, revision: str | None) -> None:
    """Rewrite adapter_config.json's base_model_name_or_path (and revision) to `base`."""
    if base is None:
        return
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    if revision:
        config["revision"] = revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
