"""What trains: full fine-tuning, frozen bottom blocks, LoRA, QLoRA, prompt tuning, bottleneck adapters.

    method = method_for(cfg.train)                              # one object per name, from METHODS
    warnings = method.check(cfg.train, cfg.model, device.type)  # qlora on CPU fails here, before any work
    model = AutoModelForCausalLM.from_pretrained(name, **method.load_kwargs(cfg.train))
    model = apply_method(model, cfg.train, cfg.task, tokenizer_dir)     # may return a PeftModel
    optimizer = torch.optim.AdamW(method.parameter_groups(model, cfg.train))
    ...
    save_trained(model, out / "model", method=cfg.train.method)  # adapter-only folders for PEFT and adapters
    model = load_trained(out / "model", cfg.task)           # the same model, ready for inference

Each method lives in its own module (full.py, lora.py, prompt_tuning.py, adapters.py) and says
what it trains, how it saves and loads, and the positions it adds; nothing else branches on its
name. A tied weight (lm_head = embeddings) is one parameter: counted once, in one optimizer group.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.methods.adapters import ADAPTER_WEIGHTS, Adapters
from pipeline.train.methods.architecture import TASKS, embedding_modules, head_modules, transformer_blocks, unwrap
from pipeline.train.methods.base import TRAINED_JSON, Method, write_record
from pipeline.train.methods.full import Freeze, Full
from pipeline.train.methods.groups import parameter_groups
from pipeline.train.methods.lora import Lora, QLora
from pipeline.train.methods.peft_base import PeftMethod
from pipeline.train.methods.prompt_tuning import PromptTuning, virtual_tokens
from pipeline.train.modeling import count_parameters  # re-exported: (trainable, total), tied weights once

__all__ = [
    "METHODS", "method_for", "transformer_blocks", "embedding_modules", "head_modules", "apply_method",
    "parameter_groups", "check_method_runtime", "base_load_kwargs", "save_trained", "load_trained",
    "load_adapters", "virtual_tokens", "count_parameters", "unwrap", "ADAPTER_WEIGHTS", "TRAINED_JSON",
]

METHODS: dict[str, Method] = {m.name: m for m in (Full(), Freeze(), Lora(), QLora(), PromptTuning(), Adapters())}
"""`train.method` -> the method. The config's Literal lists the same names (a test checks they agree)."""
_BY_SAVED_KIND: dict[str, type[Method]] = {"full": Full, "peft": PeftMethod, "adapters": Adapters}


def method_for(train: TrainConfig) -> Method:
    try:
        return METHODS[train.method]
    except KeyError:
        raise ValueError(f"unknown train.method {train.method!r}; expected one of {sorted(METHODS)}") from None


def check_method_runtime(train: TrainConfig, device_type: str) -> None:
    """Fail before any work when the method cannot run here (qlora needs CUDA and bitsandbytes)."""
    method_for(train).check(train, None, device_type)


def base_load_kwargs(train: TrainConfig) -> dict:
    return method_for(train).load_kwargs(train)


def apply_method(model: nn.Module, train: TrainConfig, task: str, tokenizer_dir: Path | None = None) -> nn.Module:
    """Set what trains (requires_grad) and return the model to train, a PeftModel for PEFT methods."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return method_for(train).apply(model, train, task, tokenizer_dir)


def _saved_kind(model: nn.Module) -> type[Method]:
    if hasattr(model, "peft_config"):
        return PeftMethod
    from pipeline.train.methods.bottleneck import has_adapters

    return Adapters if has_adapters(model) else Full


def save_trained(model: nn.Module, folder: Path, state_dict: dict | None = None, method: str | None = None) -> None:
    """Write what `load_trained` needs. full/freeze: `save_pretrained` (safetensors); PEFT: adapter
    files only; adapters: the adapter (and trained head) weights only. `state_dict`: the full state
    of `model` gathered elsewhere (ZeRO-3), used instead of the module's own tensors. `method`: the
    train.method name, recorded (default: told from the model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chosen = METHODS[method] if method else _saved_kind(model)()
    extra = chosen.save(model, folder, state_dict)
    write_record(model, folder, chosen.saved_kind, method or chosen.saved_kind, extra)


def load_trained(folder: Path, task: str, base: str | Path | None = None, **kw) -> nn.Module:
    """Rebuild a model written by `save_trained`, in eval mode. `base`: the base model folder or id
    for adapter-only folders (default: the one recorded at save time); `kw` go to `from_pretrained`."""
    folder = Path(folder)
    info = json.loads((folder / TRAINED_JSON).read_text())
    return _BY_SAVED_KIND[info["method"]].load(folder, info, task, base, kw).eval()


def load_adapters(base_model: nn.Module, folders: dict[str, Path]):
    """Several PEFT adapters on one base: a PeftModel whose `set_adapter(name)` picks the one that runs
    (the first is active). The base weights are shared, held once in memory."""
    from peft import PeftModel

    (first, folder), *rest = folders.items()
    model = PeftModel.from_pretrained(base_model, folder, adapter_name=first)
    for name, other in rest:
        model.load_adapter(other, adapter_name=name)
    return model.eval()
