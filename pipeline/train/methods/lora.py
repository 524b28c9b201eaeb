"""`lora`: PEFT low-rank adapters on the attention projections. `qlora`: the same on a 4-bit base (CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from pipeline.config import ModelConfig, TrainConfig
from pipeline.train.methods.architecture import stacks, transformer_blocks
from pipeline.train.methods.peft_base import PeftMethod, peft_task_type

# Attention projection names, for architectures missing from PEFT's table.
_ATTENTION_NAMES = ("q_proj", "v_proj", "query", "value", "q", "v", "c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")


def lora_targets(model: nn.Module, cfg: TrainConfig) -> list[str] | str:
    """train.lora_target_modules, else PEFT's per-architecture table, else a name search in the blocks."""
    if cfg.lora_target_modules:
        return list(cfg.lora_target_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    model_type = getattr(model.config, "model_type", None)
    if model_type in table:
        return table[model_type]
    from transformers.pytorch_utils import Conv1D

    found = sorted({name.rsplit(".", 1)[-1] for block in transformer_blocks(model) for name, m in block.named_modules()
                    if isinstance(m, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] in _ATTENTION_NAMES})
    if not found:
        raise ValueError(f"lora: no attention projections found in {type(model).__name__} (model_type {model_type!r}); "
                         "set train.lora_target_modules to the names of its attention Linear layers")
    return found


class Lora(PeftMethod):
    name = "lora"
    what_trains: ClassVar[str] = "low-rank adapters"

    def peft_config(self, model, train: TrainConfig, task: str, tokenizer_dir: Path | None, modules_to_save):
        from peft import LoraConfig
        from transformers.pytorch_utils import Conv1D

        stacks(model)  # fails early, naming the architecture, when it is unknown
        targets = lora_targets(model, train)
        # GPT-2 stores its projections as Conv1D (weight transposed); PEFT must be told, or it warns and guesses.
        conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
        return LoraConfig(task_type=peft_task_type(task), r=train.lora_r, lora_alpha=train.lora_alpha,
                          lora_dropout=train.lora_dropout, target_modules=targets, fan_in_fan_out=conv1d,
                          modules_to_save=modules_to_save)


class QLora(Lora):
    """The QLoRA paper's recipe: the base loaded in 4-bit NF4 with double quantisation and bf16 compute."""

    name = "qlora"

    def check(self, train: TrainConfig, model: ModelConfig | None, device_type: str) -> list[str]:
        if device_type != "cuda":
            raise RuntimeError(f"train.method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); this run is on {device_type}. "
                               "Use train.method=lora on CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError("train.method=qlora needs bitsandbytes: pip install bitsandbytes") from None
        if model is not None and model.init != "pretrained":
            raise ValueError("train.method qlora quantises a pretrained base: set model.init: pretrained")
        return []

    def load_kwargs(self, train: TrainConfig) -> dict:
        """transformers places a 4-bit model on `torch.cuda.current_device()`: set the device before loading."""
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)}

    def apply(self, model: nn.Module, train: TrainConfig, task: str, tokenizer_dir: Path | None) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        if not getattr(model, "is_loaded_in_4bit", False):
            raise ValueError("train.method=qlora: load the base with base_load_kwargs(cfg) (4-bit) before apply_method")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
        return super().apply(model, train, task, tokenizer_dir)
