"""Build the model a run trains: a fresh GPT-2 of a given size, or a pretrained checkpoint."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from pipeline.config import ModelConfig


def build_model(cfg: ModelConfig, vocab_size: int, block_size: int, eos_id: int, pad_id: int, seed: int) -> PreTrainedModel:
    """`scratch`: GPT-2 architecture at the configured size; `pretrained`: `cfg.name` (hub id or folder)."""
    torch.manual_seed(seed)  # initial weights are a function of the seed alone
    if cfg.init == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(cfg.name)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id
        return model
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return GPT2LMHeadModel(config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
