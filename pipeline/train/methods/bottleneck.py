"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"):
a small down-projection -> GELU -> up-projection with a residual, added after every transformer
block's output. Only the adapters (and a classification head) train; the base stays bit-identical.

    from pipeline.train.methods.bottleneck import insert_adapters
    adapters = insert_adapters(transformer_blocks(model), model.config.hidden_size, size=16)
    # the model's outputs are unchanged until the adapters train

The up-projection starts at zero, so a freshly inserted adapter is the identity and the model
begins exactly where the base model is (the same trick as LoRA's zero B matrix).

Why our own ~80 lines and not the `adapters` library (AdapterHub): its releases pin
`transformers ~= 4.57` and patch transformers' model classes, and we run transformers 5.x, where
those classes changed (blocks return tensors, attention moved to an interface). A forward hook
needs nothing from transformers' internals, so it works on any block that returns its hidden
states first, on every architecture `pipeline.methods.transformer_blocks` knows.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_ATTRIBUTE = "bottleneck_adapter"
"""Each adapter is registered as this child of its block, so `.to()`, `state_dict()`, DDP and
DeepSpeed see it like any other parameter; its keys read `<block path>.bottleneck_adapter.*`."""


class BottleneckAdapter(nn.Module):
    """h -> h + up(gelu(down(h))); `up` is zero at init, so the adapter starts as the identity."""

    def __init__(self, hidden_size: int, size: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.down = nn.Linear(hidden_size, size, dtype=dtype, device=device)
        self.up = nn.Linear(size, hidden_size, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


def _after_block(block: nn.Module, args, output):
    """Forward hook: run the block's adapter on its hidden states, whatever else the block returns.

    transformers 5 blocks return either the hidden states (GPT-2, BERT, Llama, BART) or a tuple
    whose first element they are (T5: hidden states, position bias, ...).
    """
    adapter = getattr(block, ADAPTER_ATTRIBUTE)
    if isinstance(output, torch.Tensor):
        return adapter(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (adapter(output[0]),) + tuple(output[1:])
    raise TypeError(f"bottleneck adapters: {type(block).__name__} returned {type(output).__name__}, "
                    "expected the hidden states or a tuple starting with them")


def insert_adapters(blocks: list[nn.Module], hidden_size: int, size: int) -> list[BottleneckAdapter]:
    """Add one zero-initialised adapter after each block (in the block's dtype and device); returns them in block order."""
    adapters = []
    for block in blocks:
        if hasattr(block, ADAPTER_ATTRIBUTE):
            raise ValueError(f"{type(block).__name__} already has a bottleneck adapter")
        reference = next(block.parameters())
        adapter = BottleneckAdapter(hidden_size, size, dtype=reference.dtype, device=reference.device)
        block.add_module(ADAPTER_ATTRIBUTE, adapter)
        block.register_forward_hook(_after_block)
        adapters.append(adapter)
    return adapters


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())
