"""The tokenizer a run uses: a byte-level BPE trained on the train split (`model.init: scratch`)
or the pretrained model's own (`model.init: pretrained`).

    tokenizer = build_tokenizer(cfg.model, cfg.tokenize, train_texts)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import ModelConfig, TokenizeConfig

if TYPE_CHECKING:  # transformers is imported where it is used: fingerprinting a cached run should not pay ~4 s for it
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
"""The one special token of a scratch tokenizer: end of text, and also bos and pad (as in GPT-2)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files that can change how a pretrained tokenizer encodes text; their bytes are fingerprinted."""


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: the prompt template decides where spaces go, not the tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # All 256 bytes from the start, so text unseen in training never maps to an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tokenizer(model: ModelConfig, tok: TokenizeConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train (scratch) or load (pretrained) the tokenizer; `train_texts` is only read for scratch."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model.init == "scratch":
        return PreTrainedTokenizerFast(
            tokenizer_object=train_byte_level_bpe(train_texts, tok.vocab_size),
            eos_token=EOS,
            bos_token=EOS,
            pad_token=EOS,
        )
    tokenizer = AutoTokenizer.from_pretrained(model.name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {model.name!r} has no eos token; tokenize ends every example with one")
    if tokenizer.pad_token_id is None:
        # Padding only fills the tail of the last packed block and is masked from the loss,
        # so reusing eos is safe (the usual choice for GPT-2-style tokenizers).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_source_files(model: ModelConfig) -> list[Path] | None:
    """The files that define a pretrained model's tokenizer, or None for a scratch tokenizer.

    A hub id is resolved with a download of the tokenizer files only (needs a network).
    """
    if model.init == "scratch":
        return None
    folder = Path(model.name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model.name, allow_patterns=list(TOKENIZER_FILES)))
    files = sorted(folder / name for name in TOKENIZER_FILES if (folder / name).is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return files
