"""Where an architecture keeps its blocks, embeddings and heads: what every method needs to find.

Works through a PeftModel (`unwrap`). The layouts are tried in order; the first whose stacks all
exist wins, so a new architecture is one row of `_LAYOUTS`.
"""

from __future__ import annotations

from torch import nn

HEAD_NAMES = ("lm_head", "score", "classifier", "classification_head", "pooler")
TASKS = {  # task -> (transformers Auto class name, PEFT task type)
    "causal_lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
    "classification": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
}

# The stacks in forward order, each with the norm after its last block (None: post-LN models have none).
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


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _module(model: nn.Module, path: str | None) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else None
    except AttributeError:
        return None


def stacks(model: nn.Module) -> list[tuple[list[nn.Module], nn.Module | None]]:
    """[(blocks of one stack, the norm after it)], encoder before decoder; raises naming an unknown architecture."""
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
    return [block for blocks, _ in stacks(model) for block in blocks]


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
    """Output-side modules by name: lm_head / score / classifier / classification_head, and a pooler
    (BERT-like classifiers put it between the encoder and a freshly initialised classifier)."""
    base = unwrap(model)
    in_blocks = _inside(transformer_blocks(base))
    heads: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        nested = any(name.startswith(h + ".") for h in heads)
        if leaf in HEAD_NAMES and id(module) not in in_blocks and not nested:
            heads[name] = module
    return heads


def tied_to_embeddings(module: nn.Module, model: nn.Module) -> bool:
    """GPT-2's and T5's lm_head is the embedding matrix: training it would train the embeddings too."""
    embedding_ids = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    return any(id(p) in embedding_ids for p in module.parameters())


def trainable_heads(model: nn.Module, task: str) -> list[nn.Module]:
    """Heads a head-training method unfreezes: every head for classification (new, untrained), else
    the untied ones."""
    return [m for m in head_modules(model).values() if task == "classification" or not tied_to_embeddings(m, model)]
