"""The interface every method implements, and the record a trained folder carries.

A method is a small object chosen by name from `METHODS` (methods/__init__.py). It decides what
trains and how the result is saved and loaded; nothing outside its own module branches on its name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from torch import nn

from pipeline.config import ModelConfig, TrainConfig
from pipeline.train.methods.architecture import TASKS, unwrap
from pipeline.train.methods.groups import parameter_groups

TRAINED_JSON = "tunepipe_trained.json"
"""Written beside the saved model: `method` (the folder's kind: full, peft or adapters), `base`
(name or path of the base model), the base `config`, and what the kind needs to rebuild it."""


class Method:
    name: ClassVar[str]
    saved_kind: ClassVar[str] = "full"
    """How `save` writes the model, which is how `load_trained` rebuilds it: `full` | `peft` | `adapters`."""
    adapters_only: ClassVar[bool] = False
    """The saved folder holds only what trained (adapters, a soft prompt): it needs its base to load."""

    def check(self, train: TrainConfig, model: ModelConfig | None, device_type: str) -> list[str]:
        """Raise when this method cannot run here or with this model (None: skip the model's checks);
        return warnings to print."""
        if self.adapters_only and model is not None and model.init == "scratch":
            return [
                f"train.method {self.name} trains only {self.what_trains} on a base with model.init: scratch, "
                "whose weights are random and stay random: expect a poor model. Use method full (or freeze) "
                "on a scratch base, or model.init: pretrained."
            ]
        return []

    what_trains: ClassVar[str] = "every weight"

    def load_kwargs(self, train: TrainConfig) -> dict:
        """Extra `from_pretrained` kwargs for the base model (a quantization config)."""
        return {}

    def extra_positions(self, train: TrainConfig) -> int:
        """Positions the method adds in front of every causal LM input (a soft prompt's virtual tokens)."""
        return 0

    def apply(self, model: nn.Module, train: TrainConfig, task: str, tokenizer_dir: Path | None) -> nn.Module:
        """Set what trains (requires_grad); return the model to train (a PeftModel for PEFT methods)."""
        raise NotImplementedError

    def parameter_groups(self, model: nn.Module, train: TrainConfig) -> list[dict]:
        return parameter_groups(model, train)

    def save(self, model: nn.Module, folder: Path, state_dict: dict | None) -> dict:
        """Write the trained model into `folder`; return the extra fields for TRAINED_JSON."""
        model.save_pretrained(folder, state_dict=state_dict)
        return {}

    @staticmethod
    def load(folder: Path, info: dict, task: str, base: str | Path | None, kw: dict) -> nn.Module:
        """Rebuild what `save` wrote (a static method: loading needs only the folder's record)."""
        return auto_class(task).from_pretrained(folder, **kw)


def auto_class(task: str):
    import transformers

    return getattr(transformers, TASKS[task][0])


def write_record(model: nn.Module, folder: Path, kind: str, method: str, extra: dict) -> None:
    base = unwrap(model)
    info = {"method": kind, "trained_with": method, "base": base.name_or_path or None, "config": base.config.to_dict(), **extra}
    (folder / TRAINED_JSON).write_text(json.dumps(info, indent=1, default=str))


def load_base(info: dict, task: str, base: str | Path | None, kw: dict) -> nn.Module:
    """The base model an adapters-only folder was trained on, with the saved head's settings."""
    from transformers import AutoConfig

    base = base or info["base"]
    if not base:
        raise ValueError("this folder holds adapters only and its base model has no name or path (trained from "
                         "scratch?); pass base= the base model folder or id")
    saved = info["config"]
    config = AutoConfig.from_pretrained(base)
    for key in ("num_labels", "id2label", "label2id", "pad_token_id", "problem_type"):
        if key in saved:
            setattr(config, key, {int(k): v for k, v in saved[key].items()} if key == "id2label" else saved[key])
    model = auto_class(task).from_pretrained(base, config=config, **kw)
    if saved.get("vocab_size") and model.get_input_embeddings().num_embeddings != saved["vocab_size"]:
        model.resize_token_embeddings(saved["vocab_size"])
    return model
