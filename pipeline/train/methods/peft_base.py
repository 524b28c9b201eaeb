"""What the PEFT methods (lora, qlora, prompt_tuning) share: wrapping, saving and loading through PEFT."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pipeline.train.methods.architecture import TASKS, head_modules, unwrap
from pipeline.train.methods.base import Method, load_base


class PeftMethod(Method):
    saved_kind = "peft"
    adapters_only = True

    def peft_config(self, model: nn.Module, train, task: str, tokenizer_dir: Path | None, modules_to_save: list[str] | None):
        raise NotImplementedError

    def apply(self, model: nn.Module, train, task: str, tokenizer_dir: Path | None) -> nn.Module:
        from peft import get_peft_model

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
        # PEFT itself adds only `classifier` and `score`; BART/T5 heads and BERT's pooler need naming.
        modules_to_save = [name.rsplit(".", 1)[-1] for name in head_modules(model)] if task == "classification" else None
        return get_peft_model(model, self.peft_config(model, train, task, tokenizer_dir, modules_to_save))

    def save(self, model: nn.Module, folder: Path, state_dict: dict | None) -> dict:
        """Adapter files only (adapter_model.safetensors + adapter_config.json, which records the base)."""
        model.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=_vocab_resized(unwrap(model)))
        # PEFT writes a blank model card ("[More Information Needed]" 39 times); the registry
        # version gets a real one at publish (registry/card.py), so this one would only mislead.
        card = Path(folder) / "README.md"
        if card.is_file() and "[More Information Needed]" in card.read_text(errors="replace"):
            card.unlink()
        return {}

    @staticmethod
    def load(folder: Path, info: dict, task: str, base: str | Path | None, kw: dict) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(info, task, base, kw), folder)


def peft_task_type(task: str) -> str:
    return TASKS[task][1]


def _vocab_resized(base: nn.Module) -> bool:
    """Whether the embeddings were resized after loading: PEFT must then save them with the adapter.
    Decided here, not by PEFT's `auto`, which asks the Hub about hub-id bases."""
    if not base.name_or_path:
        return False
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base.name_or_path).vocab_size != base.config.vocab_size
    except (OSError, ValueError):
        return False
