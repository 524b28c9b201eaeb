"""What trains: full fine-tuning, frozen bottom blocks, LoRA, QLoRA, prompt tuning, bottleneck adapters.

    check_method_runtime(cfg.train, device.type)            # qlora on CPU fails here, before any work
    model = AutoModelForCausalLM.from_pretrained(name, **base_load_kwargs(cfg.train))
    model = apply_method(model, cfg.train, cfg.task, tokenizer_dir)     # may return a PeftModel
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train))
    ...
    save_trained(model, out / "model")                      # adapter-only folders for PEFT and adapters
    model = load_trained(out / "model", cfg.task)           # the same model, ready for inference

What each method trains (`head` = lm_head / score / classifier / classification_head, plus the
pooler of BERT-like classifiers, which sits between the encoder and a freshly initialised classifier):

- `full`: everything.
- `freeze`: the top `trainable_blocks` blocks, the final norm of every stack whose last block trains,
  and the head. Embeddings stay frozen, and so does a head TIED to them (GPT-2's and T5's lm_head
  is the embedding matrix: training it would train the embeddings too).
- `lora` / `qlora`: PEFT LoRA matrices on the attention projections (cfg.lora_target_modules, else
  PEFT's per-architecture table, else a name search); classification also trains the head
  (PEFT `modules_to_save`, saved with the adapter). qlora: the same on a 4-bit base.
- `prompt_tuning`: PEFT soft prompt of `num_virtual_tokens` vectors (+ the head for classification).
  Causal LM logits then carry `num_virtual_tokens` extra LEADING positions (see `virtual_tokens`),
  and PEFT drops `position_ids` (with a warning), so bins-packed examples are not isolated.
- `adapters`: pipeline/bottleneck.py adapters after every block (+ the head for classification).

A tied weight (lm_head = embeddings) is one parameter: counted once, in one optimizer group.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.bottleneck import ADAPTER_ATTRIBUTE, has_adapters, insert_adapters
from pipeline.config import TrainConfig
from pipeline.modeling import count_parameters  # re-exported: (trainable, total), tied weights once

__all__ = [
    "transformer_blocks", "embedding_modules", "head_modules", "apply_method", "parameter_groups",
    "check_method_runtime", "base_load_kwargs", "save_trained", "load_trained", "load_adapters",
    "virtual_tokens", "count_parameters",
]

PEFT_METHODS = ("lora", "qlora", "prompt_tuning")
HEAD_NAMES = ("lm_head", "score", "classifier", "classification_head", "pooler")
TRAINED_JSON = "tunepipe_trained.json"
ADAPTER_WEIGHTS = "bottleneck_adapters.safetensors"

# Where each architecture keeps its blocks: the stacks in forward order, each with the norm after
# its last block (None: post-LN models have none). The first layout whose stacks all exist wins.
_LAYOUTS = [
    ("GPT-2", [("transformer.h", "transformer.ln_f")]),
    ("Llama-like", [("model.layers", "model.norm")]),
    ("T5", [("encoder.block", "encoder.final_layer_norm"), ("decoder.block", "decoder.final_layer_norm")]),
    ("T5 classifier", [("transformer.encoder.block", "transformer.encoder.final_layer_norm"),
                       ("transformer.decoder.block", "transformer.decoder.final_layer_norm")]),
    ("BART", [("model.encoder.layers", "model.encoder.layer_norm"), ("model.decoder.layers", "model.decoder.layer_norm")]),
    ("BERT", [("bert.encoder.layer", None)]),
    ("RoBERTa", [("roberta.encoder.layer", None)]),
    ("bare encoder (BertModel)", [("encoder.layer", None)]),
    ("bare GPT-2", [("h", "ln_f")]),
    ("bare Llama-like", [("layers", "norm")]),
]
_TASKS = {  # task -> (transformers Auto class name, PEFT task type)
    "causal_lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
    "classification": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
}
# Attention projection names, for architectures missing from PEFT's table.
_ATTENTION_NAMES = ("q_proj", "v_proj", "query", "value", "q", "v", "c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")


# ---------------------------------------------------------------- architecture

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _module(model: nn.Module, path: str | None) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else None
    except AttributeError:
        return None


def _stacks(model: nn.Module) -> list[tuple[list[nn.Module], nn.Module | None]]:
    base = unwrap(model)
    for _, layout in _LAYOUTS:
        found = [(_module(base, blocks), _module(base, norm)) for blocks, norm in layout]
        if all(isinstance(blocks, nn.ModuleList) for blocks, _ in found):
            return [(list(blocks), norm) for blocks, norm in found]
    known = ", ".join(f"{name} ({' + '.join(b for b, _ in layout)})" for name, layout in _LAYOUTS)
    model_type = getattr(getattr(base, "config", None), "model_type", "?")
    raise ValueError(f"unknown architecture {type(base).__name__} (model_type {model_type!r}): "
                     f"cannot find its transformer blocks; known layouts: {known}")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks in forward order (encoder blocks before decoder blocks); works through a PeftModel."""
    return [block for blocks, _ in _stacks(model) for block in blocks]


def _inside(modules: list[nn.Module]) -> set[int]:
    return {id(m) for top in modules for m in top.modules()}


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Input-side modules outside the blocks: token, position and type embeddings and their norms
    (BERT's `embeddings` container, BART's `layernorm_embedding`). T5's relative position bias lives
    inside block 0 and counts as that block."""
    base = unwrap(model)
    in_blocks = _inside(transformer_blocks(base))
    found = [base.get_input_embeddings()]
    for name, module in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if id(module) not in in_blocks and (isinstance(module, nn.Embedding) or leaf in ("embeddings", "layernorm_embedding")):
            found.append(module)
    return list({id(m): m for m in found}.values())


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Output-side modules by name: lm_head / score / classifier / classification_head, and a pooler."""
    base = unwrap(model)
    in_blocks = _inside(transformer_blocks(base))
    heads: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        nested = any(name.startswith(h + ".") for h in heads)
        if leaf in HEAD_NAMES and id(module) not in in_blocks and not nested:
            heads[name] = module
    return heads


def _tied_to_embeddings(module: nn.Module, model: nn.Module) -> bool:
    embedding_ids = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    return any(id(p) in embedding_ids for p in module.parameters())


def virtual_tokens(model: nn.Module) -> int:
    """Extra leading positions in a causal LM's logits: `num_virtual_tokens` under prompt tuning (PEFT
    prepends the soft prompt to the inputs), else 0. Slice `logits[:, n:]` before the loss. Seq2seq
    logits are the decoder's and carry none (the prompt goes to the encoder)."""
    config = getattr(model, "active_peft_config", None)
    causal = config is not None and config.is_prompt_learning and config.task_type == "CAUSAL_LM"  # a str enum
    return int(config.num_virtual_tokens) if causal else 0


# ---------------------------------------------------------------- applying a method

def check_method_runtime(cfg: TrainConfig, device_type: str) -> None:
    """Fail before any work when the method cannot run here (qlora needs CUDA and bitsandbytes)."""
    if cfg.method != "qlora":
        return
    if device_type != "cuda":
        raise RuntimeError(f"train.method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); this run is on {device_type}. "
                           "Use train.method=lora on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError("train.method=qlora needs bitsandbytes: pip install bitsandbytes") from None


def base_load_kwargs(cfg: TrainConfig) -> dict:
    """Extra `from_pretrained` kwargs for the base model: qlora loads it in 4-bit NF4 with double
    quantisation and bf16 compute (the QLoRA paper's recipe). transformers places a 4-bit model on
    `torch.cuda.current_device()`, so set the device before loading."""
    if cfg.method != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def _lora_targets(model: nn.Module, cfg: TrainConfig) -> list[str] | str:
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


def _peft_config(model: nn.Module, cfg: TrainConfig, task: str, tokenizer_dir: Path | None):
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit

    task_type = _TASKS[task][1]
    # PEFT itself adds only `classifier` and `score`; BART/T5 heads and BERT's pooler need naming.
    modules_to_save = [name.rsplit(".", 1)[-1] for name in head_modules(model)] if task == "classification" else None
    if cfg.method == "prompt_tuning":
        text = cfg.prompt_init_text
        if text and tokenizer_dir is None:
            raise ValueError("prompt_tuning with train.prompt_init_text needs the tokenizer folder (tokenizer_dir)")
        return PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text, tokenizer_name_or_path=str(tokenizer_dir) if text else None,
            # PEFT's seq2seq default (2) allocates decoder prompt rows that its prompt-tuning forward never reads.
            num_transformer_submodules=1, modules_to_save=modules_to_save)
    from transformers.pytorch_utils import Conv1D

    targets = _lora_targets(model, cfg)
    # GPT-2 stores its projections as Conv1D (weight transposed); PEFT must be told, or it warns and guesses.
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    return LoraConfig(task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, fan_in_fan_out=conv1d, modules_to_save=modules_to_save)


def apply_method(model: nn.Module, cfg: TrainConfig, task: str, tokenizer_dir: Path | None = None) -> nn.Module:
    """Set what trains (requires_grad) and return the model to train, a PeftModel for PEFT methods."""
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_TASKS)}")
    method = cfg.method
    if method == "full":
        model.requires_grad_(True)
        return model
    stacks = _stacks(model)  # fails early, naming the architecture, when it is unknown
    if method in PEFT_METHODS:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            if not getattr(model, "is_loaded_in_4bit", False):
                raise ValueError("train.method=qlora: load the base with base_load_kwargs(cfg) (4-bit) before apply_method")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        return get_peft_model(model, _peft_config(model, cfg, task, tokenizer_dir))

    model.requires_grad_(False)
    heads = [m for m in head_modules(model).values() if task == "classification" or not _tied_to_embeddings(m, model)]
    if method == "freeze":
        blocks = transformer_blocks(model)
        top = blocks[len(blocks) - min(cfg.trainable_blocks, len(blocks)):]  # more than there are: all
        for block in top:
            block.requires_grad_(True)
        for stack, norm in stacks:
            if norm is not None and any(stack[-1] is block for block in top):
                norm.requires_grad_(True)
        for head in heads:
            head.requires_grad_(True)
        for embedding in embedding_modules(model):  # last: a tied lm_head is the embedding matrix
            embedding.requires_grad_(False)
    elif method == "adapters":
        insert_adapters(transformer_blocks(model), model.config.hidden_size, cfg.adapter_size)
        if task == "classification":
            for head in heads:
                head.requires_grad_(True)
    else:
        raise ValueError(f"unknown train.method {method!r}")
    return model


# ---------------------------------------------------------------- optimizer groups

def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups over the trainable parameters, each {"params", "lr", "initial_lr", "weight_decay", "name"}.

    Layer-wise decay (ELECTRA / BEiT style): block i of n (0 = lowest) at lr * decay^(n - i),
    embeddings at lr * decay^(n + 1), head and final norms at head_lr (default lr). LoRA matrices and
    adapters go with their block; a soft prompt is new, so it trains at lr. Biases and norm gains
    (ndim < 2) get no weight decay. A tied weight sits in the embeddings group, once.
    """
    blocks = transformer_blocks(model)
    n, decay = len(blocks), cfg.layer_lr_decay
    where: dict[int, tuple[str, float]] = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            where.setdefault(id(p), (f"block_{i}", cfg.lr * decay ** (n - i)))
    for module in embedding_modules(model):
        for p in module.parameters():
            where.setdefault(id(p), ("embeddings", cfg.lr * decay ** (n + 1)))
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        default = ("soft_prompt", cfg.lr) if "prompt_encoder" in name else ("head", cfg.head_lr or cfg.lr)
        part, lr = where.get(id(p), default)
        no_decay = len(getattr(p, "ds_shape", p.shape)) < 2  # ds_shape: the real shape of a ZeRO-3 partitioned param
        key = part + ("_no_decay" if no_decay else "")
        group = groups.setdefault(key, {"params": [], "lr": lr, "initial_lr": lr, "name": key,
                                        "weight_decay": 0.0 if no_decay else cfg.weight_decay})
        group["params"].append(p)
    order = ["embeddings", *(f"block_{i}" for i in range(n)), "head", "soft_prompt"]
    rank = {k: i for i, k in enumerate(order)}
    return sorted(groups.values(), key=lambda g: (rank[g["name"].removesuffix("_no_decay")], g["name"]))


# ---------------------------------------------------------------- saving and loading

def _method_of(model: nn.Module) -> str:
    if hasattr(model, "peft_config"):
        return "peft"
    return "adapters" if has_adapters(model) else "full"


def save_trained(model: nn.Module, folder: Path, state_dict: dict | None = None) -> None:
    """Write what `load_trained` needs. full/freeze: `save_pretrained` (safetensors); PEFT: adapter
    files only (adapter_model.safetensors + adapter_config.json, which records the base); adapters:
    the adapter (and trained head) weights only. `state_dict`: the full state of `model` gathered
    elsewhere (ZeRO-3), used instead of the module's own tensors.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    method, base = _method_of(model), unwrap(model)
    if method == "full":
        model.save_pretrained(folder, state_dict=state_dict)
    elif method == "peft":
        model.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=_vocab_resized(base))
    else:
        state = state_dict if state_dict is not None else model.state_dict()
        trained = {n for n, p in model.named_parameters() if p.requires_grad}  # adapters (+ classification head)
        save_file({k: state[k].detach().contiguous().cpu() for k in sorted(trained)}, str(folder / ADAPTER_WEIGHTS))
    info = {"method": method, "base": base.name_or_path or None, "config": base.config.to_dict()}
    if method == "adapters":
        adapter = getattr(transformer_blocks(model)[0], ADAPTER_ATTRIBUTE)
        info["adapter_size"] = adapter.down.out_features
    (folder / TRAINED_JSON).write_text(json.dumps(info, indent=1, default=str))


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


def _auto_class(task: str):
    import transformers

    return getattr(transformers, _TASKS[task][0])


def _load_base(info: dict, task: str, base: str | Path | None, kw: dict) -> nn.Module:
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
    model = _auto_class(task).from_pretrained(base, config=config, **kw)
    if saved.get("vocab_size") and model.get_input_embeddings().num_embeddings != saved["vocab_size"]:
        model.resize_token_embeddings(saved["vocab_size"])
    return model


def load_trained(folder: Path, task: str, base: str | Path | None = None, **kw) -> nn.Module:
    """Rebuild a model written by `save_trained`, in eval mode. `base`: the base model folder or id
    for adapter-only folders (default: the one recorded at save time); `kw` go to `from_pretrained`."""
    folder = Path(folder)
    info = json.loads((folder / TRAINED_JSON).read_text())
    if info["method"] == "full":
        return _auto_class(task).from_pretrained(folder, **kw).eval()
    model = _load_base(info, task, base, kw)
    if info["method"] == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, folder).eval()
    insert_adapters(transformer_blocks(model), model.config.hidden_size, info["adapter_size"])
    unfit = model.load_state_dict(load_file(str(folder / ADAPTER_WEIGHTS)), strict=False).unexpected_keys
    if unfit:
        raise ValueError(f"{folder}: adapter weights do not fit the base model: {unfit[:5]}")
    return model.eval()


def load_adapters(base_model: nn.Module, folders: dict[str, Path]):
    """Several PEFT adapters on one base: a PeftModel whose `set_adapter(name)` picks the one that runs
    (the first is active). The base weights are shared, held once in memory."""
    from peft import PeftModel

    (first, folder), *rest = folders.items()
    model = PeftModel.from_pretrained(base_model, folder, adapter_name=first)
    for name, other in rest:
        model.load_adapter(other, adapter_name=name)
    return model.eval()
