"""What the train stage reads from outside its inputs, for its fingerprint; light on purpose.

A cache check imports this module, not `train/stage.py` (which imports torch): a fully cached run
then never pays torch's import. Library versions come from package metadata for the same reason.
"""

from __future__ import annotations

import importlib.metadata

from pipeline.config import ModelConfig, SlurmConfig, TrainConfig
from pipeline.registry.bases import registry_base


def library_versions() -> dict[str, str]:
    """A new torch or transformers can change the weights (or log-probabilities) for the same inputs."""
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers")}


def registry_base_content(model: ModelConfig) -> dict:
    """A registry base's exact version, as the run was planned: moving the alias retrains, and the
    lineage of what this trains names the exact bytes it started from."""
    base = registry_base(model)
    return {} if base is None else {"base": {"registry_version": base.reference, "manifest_sha256": base.manifest_sha256}}


def content_fingerprint(model: ModelConfig, train: TrainConfig, slurm: SlurmConfig) -> dict[str, str]:
    """Library versions, a registry base's version, and the DeepSpeed JSON a run uses, which may be
    a user's own file edited between runs."""
    found = {**library_versions(), **registry_base_content(model)}
    if train.strategy == "deepspeed":
        from pipeline.train.parallel.zero_config import config_digest

        found["deepspeed_config"] = config_digest(train.deepspeed_config)
    return found
