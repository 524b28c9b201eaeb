"""Build the model a run trains, per task: fresh weights of a given size, or a pretrained checkpoint.

    meta = json.loads((tokenized / "meta.json").read_text())
    model = build_model(cfg.model, cfg.task, meta, cfg.train.seed, load_kwargs=base_load_kwargs(cfg.train))

    task            scratch (model.init: scratch)           pretrained (model.init: pretrained, model.name)
    causal_lm       GPT2LMHeadModel                         AutoModelForCausalLM
    classification  GPT2ForSequenceClassification           AutoModelForSequenceClassification (GPT-2, BERT, ...)
    seq2seq         T5ForConditionalGeneration (tiny)       AutoModelForSeq2SeqLM

A classifier's label names (meta.json `label_names`, in class-id order) go into its config as
id2label / label2id, so a saved model says what its outputs mean.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from pipeline.config import ModelConfig
from pipeline.registry.bases import model_source

AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}
"""The transformers Auto class that loads a saved model of each task."""


def build_model(cfg: ModelConfig, task: str, meta: dict, seed: int, load_kwargs: dict | None = None,
                attention: str | None = None) -> PreTrainedModel:
    """`scratch`: the table's architecture at the configured size; `pretrained`: `cfg.name` (hub id or
    folder), loaded with `load_kwargs` (e.g. a quantization_config). `meta` is the tokenize output's
    meta.json: vocab_size, block_size, eos_id, pad_id (and label_names for classification).
    `attention`: the attention kernel (`attention_kernel`); None: transformers' default.
    Initial weights (and a pretrained model's new head) are a function of `seed` alone."""
    if task not in AUTO_CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(AUTO_CLASSES)}")
    torch.manual_seed(seed)
    kernel = {"attn_implementation": attention} if attention else {}
    if cfg.init == "pretrained":
        return _pretrained(model_source(cfg), task, meta, {**kernel, **(load_kwargs or {})})
    if task == "seq2seq":
        model = T5ForConditionalGeneration(_t5_config(cfg, meta, **kernel))
    elif task == "classification":
        model = GPT2ForSequenceClassification(_gpt2_config(cfg, meta, **kernel, **_label_maps(meta)))
    else:
        model = GPT2LMHeadModel(_gpt2_config(cfg, meta, **kernel))
    if model.can_generate():
        # The ids past the tokenizer's vocabulary exist only to round the head up: never generate them.
        padding = list(range(meta["vocab_size"], model.config.vocab_size))
        model.generation_config.suppress_tokens = padding or None
    return model


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`: matmuls over the vocabulary then run on whole GPU tiles."""
    return -(-vocab_size // multiple) * multiple


def attention_kernel(cfg: ModelConfig, device: torch.device, precision: str) -> str:
    """`model.attn_implementation`, with `auto` resolved for this device and precision."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    import importlib.util

    # FlashAttention-2 runs only in half precision on a GPU; packed `bins` blocks then attend as
    # variable-length sequences (transformers derives their boundaries from the restarting position_ids).
    half = precision in ("bf16", "fp16") or (precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _label_maps(meta: dict) -> dict:
    names = meta.get("label_names")
    if not names or len(names) < 2:
        # One class would make transformers treat the head as a regression (num_labels == 1).
        raise ValueError(f"classification needs at least 2 labels in meta.json label_names, got {names!r}")
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def _gpt2_config(cfg: ModelConfig, meta: dict, **extra) -> GPT2Config:
    return GPT2Config(
        vocab_size=padded_vocab(meta["vocab_size"], cfg.vocab_multiple),
        n_positions=meta["block_size"],
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=meta["eos_id"],
        eos_token_id=meta["eos_id"],
        # Also what GPT2ForSequenceClassification pools at: the last token that is not pad.
        pad_token_id=meta["pad_id"],
        **extra,
    )


def _t5_config(cfg: ModelConfig, meta: dict, **extra) -> T5Config:
    return T5Config(
        vocab_size=padded_vocab(meta["vocab_size"], cfg.vocab_multiple),
        d_model=cfg.n_embd,
        d_kv=cfg.n_embd // cfg.n_head,
        d_ff=4 * cfg.n_embd,
        num_layers=cfg.n_layer,  # encoder and decoder alike
        num_heads=cfg.n_head,
        dropout_rate=cfg.dropout,
        pad_token_id=meta["pad_id"],
        eos_token_id=meta["eos_id"],
        # As in T5: the decoder starts from pad. The model shifts labels right itself and turns
        # their -100 into pad, so targets need no start token of their own.
        decoder_start_token_id=meta["pad_id"],
        **extra,
    )


def _pretrained(name: str, task: str, meta: dict, load_kwargs: dict) -> PreTrainedModel:
    if task == "classification":
        # ignore_mismatched_sizes: a checkpoint that already has a classifier with another number
        # of classes gets a fresh head instead of a load error.
        load_kwargs = {**_label_maps(meta), "num_labels": len(meta["label_names"]), "ignore_mismatched_sizes": True, **load_kwargs}
    model = AUTO_CLASSES[task].from_pretrained(name, **load_kwargs)
    if model.get_input_embeddings().num_embeddings < meta["vocab_size"]:
        model.resize_token_embeddings(meta["vocab_size"])
    if model.config.pad_token_id is None:
        # GPT-2 has none; a GPT-2 classifier needs it to find each row's last real token.
        model.config.pad_token_id = meta["pad_id"]
    if task == "seq2seq" and getattr(model.config, "decoder_start_token_id", None) is None:
        model.config.decoder_start_token_id = meta["pad_id"]
    return model


def replace_children(model: torch.nn.Module, replacement) -> int:
    """Swap every submodule for `replacement(child)` where that returns a module (None keeps the
    child); returns how many were swapped. For weightless modules swapped for training only
    (dropout, activations): the state dict and the saved model do not change."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(module, name, new)
                swapped += 1
    return swapped


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
