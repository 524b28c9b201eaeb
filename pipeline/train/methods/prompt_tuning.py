"""`prompt_tuning`: a PEFT soft prompt of `num_virtual_tokens` vectors in front of every input.

Causal LM logits then carry `num_virtual_tokens` extra LEADING positions (`virtual_tokens`), and
the position table must have room for them (`extra_positions`). PEFT drops `position_ids` (with a
warning), so bins-packed examples are not isolated.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.methods.architecture import stacks
from pipeline.train.methods.peft_base import PeftMethod, peft_task_type


class PromptTuning(PeftMethod):
    name = "prompt_tuning"
    what_trains: ClassVar[str] = "a soft prompt"

    def extra_positions(self, train: TrainConfig) -> int:
        return train.num_virtual_tokens

    def peft_config(self, model, train: TrainConfig, task: str, tokenizer_dir: Path | None, modules_to_save):
        from peft import PromptTuningConfig, PromptTuningInit

        stacks(model)  # fails early, naming the architecture, when it is unknown
        text = train.prompt_init_text
        if text and tokenizer_dir is None:
            raise ValueError("prompt_tuning with train.prompt_init_text needs the tokenizer folder (tokenizer_dir)")
        return PromptTuningConfig(
            task_type=peft_task_type(task), num_virtual_tokens=train.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text, tokenizer_name_or_path=str(tokenizer_dir) if text else None,
            # PEFT's seq2seq default (2) allocates decoder prompt rows that its prompt-tuning forward never reads.
            num_transformer_submodules=1, modules_to_save=modules_to_save)


def virtual_tokens(model: nn.Module) -> int:
    """Extra leading positions in a causal LM's logits: `num_virtual_tokens` under prompt tuning (PEFT
    prepends the soft prompt to the inputs), else 0. Slice `logits[:, n:]` before the loss. Seq2seq
    logits are the decoder's and carry none (the prompt goes to the encoder)."""
    config = getattr(model, "active_peft_config", None)
    causal = config is not None and config.is_prompt_learning and config.task_type == "CAUSAL_LM"  # a str enum
    return int(config.num_virtual_tokens) if causal else 0
