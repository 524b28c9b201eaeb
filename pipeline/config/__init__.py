"""Typed pipeline configuration: one frozen pydantic model per stage, composed into `PipelineConfig`.

Load a YAML preset and apply dotted overrides:

    cfg = load_config("examples/quickstart.yaml", ["train.lr=3e-4", "train.max_steps=50"])

Every field's docstring is its reference documentation (`tunepipe config --keys` prints them).
A wrong key or a bad value raises `ConfigError` naming the dotted key, before any stage runs.
The sections live by concept: data.py (ingest to tokenize), train.py (model and training),
publish.py (evaluate and registry), pipeline.py (the whole, and the keys a run ignores).
"""

from pipeline.config.base import ConfigError, Section
from pipeline.config.cluster import KubernetesConfig, SlurmConfig
from pipeline.config.data import DataConfig, PreprocessConfig, SampleConfig, TokenizeConfig
from pipeline.config.orchestration import PrefectConfig
from pipeline.config.loading import apply_override, build_config, describe_fields, load_config
from pipeline.config.pipeline import PipelineConfig, RowSpec
from pipeline.config.publish import EvaluateConfig, RegistryConfig
from pipeline.config.train import ModelConfig, TrainConfig

__all__ = [
    "ConfigError", "Section", "DataConfig", "SampleConfig", "PreprocessConfig", "TokenizeConfig", "ModelConfig",
    "TrainConfig", "EvaluateConfig", "RegistryConfig", "RowSpec", "PipelineConfig", "apply_override",
    "build_config", "load_config", "describe_fields", "SlurmConfig", "KubernetesConfig", "PrefectConfig",
]
