"""Optimizer parameter groups with layer-wise learning rates, for whatever a method left trainable."""

from __future__ import annotations

from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.methods.architecture import embedding_modules, transformer_blocks


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
