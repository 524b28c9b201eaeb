"""`full`: every weight trains. `freeze`: only the top blocks, their final norm and the head."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.methods.architecture import embedding_modules, stacks, trainable_heads, transformer_blocks
from pipeline.train.methods.base import Method


class Full(Method):
    name = "full"

    def apply(self, model: nn.Module, train: TrainConfig, task: str, tokenizer_dir: Path | None) -> nn.Module:
        model.requires_grad_(True)
        return model


class Freeze(Method):
    """The top `trainable_blocks` blocks, the final norm of every stack whose last block trains, and
    the head. Embeddings stay frozen, and so does a head TIED to them (GPT-2's and T5's lm_head)."""

    name = "freeze"
    what_trains: ClassVar[str] = "the top blocks and the head"

    def apply(self, model: nn.Module, train: TrainConfig, task: str, tokenizer_dir: Path | None) -> nn.Module:
        found = stacks(model)  # fails early, naming the architecture, when it is unknown
        model.requires_grad_(False)
        blocks = transformer_blocks(model)
        top = blocks[len(blocks) - min(train.trainable_blocks, len(blocks)):]  # more than there are: all
        for block in top:
            block.requires_grad_(True)
        for stack, norm in found:
            if norm is not None and any(stack[-1] is block for block in top):
                norm.requires_grad_(True)
        for head in trainable_heads(model, task):
            head.requires_grad_(True)
        for embedding in embedding_modules(model):  # last: a tied lm_head is the embedding matrix
            embedding.requires_grad_(False)
        return model
