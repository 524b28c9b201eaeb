"""`adapters`: bottleneck adapters (bottleneck.py) after every block, plus the head for classification."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.methods.architecture import stacks, trainable_heads, transformer_blocks
from pipeline.train.methods.base import Method, load_base
from pipeline.train.methods.bottleneck import ADAPTER_ATTRIBUTE, insert_adapters

ADAPTER_WEIGHTS = "bottleneck_adapters.safetensors"


class Adapters(Method):
    name = "adapters"
    saved_kind = "adapters"
    adapters_only = True
    what_trains: ClassVar[str] = "bottleneck adapters"

    def apply(self, model: nn.Module, train: TrainConfig, task: str, tokenizer_dir: Path | None) -> nn.Module:
        stacks(model)  # fails early, naming the architecture, when it is unknown
        model.requires_grad_(False)
        insert_adapters(transformer_blocks(model), model.config.hidden_size, train.adapter_size)
        if task == "classification":
            for head in trainable_heads(model, task):
                head.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path, state_dict: dict | None) -> dict:
        """The adapter (and trained head) weights only."""
        state = state_dict if state_dict is not None else model.state_dict()
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        save_file({k: state[k].detach().contiguous().cpu() for k in sorted(trained)}, str(folder / ADAPTER_WEIGHTS))
        adapter = getattr(transformer_blocks(model)[0], ADAPTER_ATTRIBUTE)
        return {"adapter_size": adapter.down.out_features}

    @staticmethod
    def load(folder: Path, info: dict, task: str, base: str | Path | None, kw: dict) -> nn.Module:
        model = load_base(info, task, base, kw)
        insert_adapters(transformer_blocks(model), model.config.hidden_size, info["adapter_size"])
        unfit = model.load_state_dict(load_file(str(folder / ADAPTER_WEIGHTS)), strict=False).unexpected_keys
        if unfit:
            raise ValueError(f"{folder}: adapter weights do not fit the base model: {unfit[:5]}")
        return model
