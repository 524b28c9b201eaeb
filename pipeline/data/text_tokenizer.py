"""The tokenizer a run uses, and fast encoding through its Rust backend.

A byte-level BPE trained on the train split (`model.init: scratch`) or the pretrained model's
own (`model.init: pretrained`):

    tokenizer = build_tokenizer(cfg.model, cfg.tokenize, train_texts, chat=False, task="causal_lm")
    encoder = fast_encoder(tokenizer)
    ids, lengths = encode_flat(encoder, ["some text", "more"])   # int32 flat, int64 per text

Parallelism: `encode_flat` hands a whole batch to the Rust `tokenizers` library, which encodes
the texts on its own thread pool (rayon) with the GIL released; that pool is where all cores are
used. Its size is fixed when the pool first starts in a process: `set_tokenizer_threads` sets
RAYON_NUM_THREADS, which only takes effect if no tokenizer has run a parallel batch yet.
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import ModelConfig, TokenizeConfig
from pipeline.data.packing import IGNORE_INDEX
from pipeline.registry.bases import model_source

if TYPE_CHECKING:  # transformers is imported where it is used: fingerprinting a cached run should not pay ~4 s for it
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
"""The end-of-text special token of a scratch tokenizer: end of text, and also bos and pad (as in GPT-2)."""

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
"""Turn markers of ChatML; special tokens of a scratch tokenizer trained for the chat template."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The chat template a scratch tokenizer ships with (ChatML, as used by Qwen and OpenAI). A Python
constant rather than a .jinja file, so that editing it changes the stage's code fingerprint."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files that can change how a pretrained tokenizer encodes or renders text; their bytes are fingerprinted."""


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = (EOS,)) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: the prompt template decides where spaces go, not the tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        # All 256 bytes from the start, so text unseen in training never maps to an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tokenizer(
    model: ModelConfig, tok: TokenizeConfig, train_texts: Iterable[str], chat: bool = False, task: str = "causal_lm"
) -> PreTrainedTokenizerFast:
    """Train (scratch) or load (pretrained) the tokenizer; `train_texts` is only read for scratch.

    `chat`: the data is rendered with a chat template, which the returned tokenizer carries
    (`tok.chat_template`, else its own, else ChatML for a scratch tokenizer). A pretrained tokenizer
    without one is an error here, before any text is tokenized.

    `task`: only `causal_lm` needs an eos token (it ends every example). Classification and seq2seq
    accept a pretrained tokenizer without one (BERT's has [CLS]/[SEP] instead) but need a pad token.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model.init == "scratch":
        # The ChatML markers must be single special tokens: masking finds the end of a turn by them.
        specials = (EOS, *CHATML_TOKENS) if chat else (EOS,)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=train_byte_level_bpe(train_texts, tok.vocab_size, specials),
            eos_token=EOS,
            bos_token=EOS,
            pad_token=EOS,
        )
        if chat:
            tokenizer.chat_template = tok.chat_template or CHATML_TEMPLATE
        return tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_source(model))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer of {model.name!r} is not a fast (Rust) tokenizer; tokenize needs one for speed and offsets")
    if tokenizer.eos_token_id is None and task == "causal_lm":
        raise ValueError(f"tokenizer of {model.name!r} has no eos token; tokenize ends every causal LM example with one")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {model.name!r} has neither a pad nor an eos token; batches need one to pad with")
        # Padding only fills the tail of a block (or of a batch) and is masked from the loss,
        # so reusing eos is safe (the usual choice for GPT-2-style tokenizers).
        tokenizer.pad_token = tokenizer.eos_token
    if chat:
        if tok.chat_template:
            tokenizer.chat_template = tok.chat_template
        elif not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer of {model.name!r} has no chat template and tokenize.chat_template is not set; "
                "the chat template needs one to render conversations"
            )
    return tokenizer


def tokenizer_source_files(model: ModelConfig) -> list[Path] | None:
    """The files that define a pretrained model's tokenizer, or None for a scratch tokenizer.

    A hub id is resolved with a download of the tokenizer files only (needs a network).
    """
    if model.init == "scratch":
        return None
    folder = Path(model_source(model))
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model.name, allow_patterns=list(TOKENIZER_FILES)))
    files = sorted(folder / name for name in TOKENIZER_FILES if (folder / name).is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return files


# ---------------------------------------------------------------- fast encoding


def set_tokenizer_threads(num_threads: int | None) -> None:
    """Size the Rust tokenizer's thread pool (None: all cores). Only effective before its first parallel batch."""
    if num_threads is None:
        if "TOKENIZERS_PARALLELISM" not in os.environ:
            # datasets.map(num_proc=...) sets TOKENIZERS_PARALLELISM=false and then restores only
            # Python's os.environ, not the C environment that Rust reads: the rest of that process
            # would tokenize on one core. Unset it there too (unset = parallel, and tokenizers
            # still protects forked children, which an explicit "true" would not).
            os.unsetenv("TOKENIZERS_PARALLELISM")
        return
    os.environ["RAYON_NUM_THREADS"] = str(num_threads)
    # One thread means no pool at all; this flag is read on every batch, so it works even late.
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if num_threads == 1 else "true"


def fast_encoder(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the Rust backend with truncation and padding off.

    A pretrained tokenizer.json may carry its own truncation or padding settings; the HF wrapper
    resets them on every call, but we call the backend directly, so we switch them off once here.
    """
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    return encoder


_PROBE = "probe text"


def special_affixes(encoder: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a single text: ([CLS], [SEP])
    for BERT, ([], [</s>]) for T5, (<s>, </s>) for BART, nothing for GPT-2 or a scratch BPE.

    Texts are encoded without them (fast, and truncation must cut the text, not the markers);
    tokenize adds them back around each truncated text, which is what `tokenizer(text,
    truncation=True, max_length=n)` gives. Found by encoding a probe text both ways.
    """
    plain = encoder.encode(_PROBE, add_special_tokens=False).ids
    full = encoder.encode(_PROBE, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"the tokenizer's special tokens do not wrap the text ({plain} became {full}); cannot tell where to add them")


def encode_batch(encoder: Tokenizer, texts: list[str]) -> list:
    # encode_batch_fast skips offset tracking (tokenizers >= 0.21); same ids, less work.
    fast = getattr(encoder, "encode_batch_fast", None) or encoder.encode_batch
    return fast(texts, add_special_tokens=False)


def encode_flat(encoder: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts, concatenated (int32), and each text's length (int64)."""
    ids = [e.ids for e in encode_batch(encoder, texts)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


# ---------------------------------------------------------------- chat rendering and masking


class ChatTemplateError(ValueError):
    """The chat template cannot be used to find which tokens belong to assistant turns."""


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
    return ids


def assistant_spans(tokenizer: PreTrainedTokenizerFast, conversations: list[list[dict]], first_row: int = 0):
    """Render each conversation and locate its assistant turns by character.

    Returns, per conversation, (rendering, [(content_start, content_end, turn_end), ...]) for its
    assistant messages, where turn_end is where the next message's rendering begins.

    Rendering messages[:i+1] gives where message i ends in the whole rendering, whatever the
    template adds around it (role headers, system prompts, end-of-turn tokens); the content is
    then searched only inside that message's own stretch, so text that also occurs in a header
    or another turn cannot be mistaken for it. This needs the template to be prefix-stable
    (rendering fewer messages yields a prefix of the full rendering); one that is not is an error.
    """
    prefixes = [conv[: i + 1] for conv in conversations for i in range(len(conv))]
    try:
        rendered = tokenizer.apply_chat_template(prefixes, tokenize=False)
    except Exception as e:  # jinja raises its own types; say which stage and why
        raise ChatTemplateError(f"the chat template failed to render rows {first_row}..: {e}") from e
    result, at = [], 0
    for r, conv in enumerate(conversations):
        parts = rendered[at : at + len(conv)]
        at += len(conv)
        full, spans, start = parts[-1], [], 0
        for i, (message, end) in enumerate(zip(conv, map(len, parts))):
            if not full.startswith(parts[i]):
                raise ChatTemplateError(
                    f"row {first_row + r}: rendering the first {i + 1} messages is not a prefix of the whole "
                    "conversation, so assistant turns cannot be located; use a prefix-stable tokenize.chat_template"
                )
            if message["role"] == "assistant":
                spans.append(_content_span(full, message["content"], start, end, first_row + r, i) + (end,))
            start = end
        result.append((full, spans))
    return result


def _content_span(full: str, content: str, start: int, end: int, row: int, index: int) -> tuple[int, int]:
    for text in (content, content.strip()):  # some templates trim message contents
        found = full.find(text, start, end)
        if found >= 0:
            return found, found + len(text)
    raise ChatTemplateError(f"row {row}: the content of message {index} does not appear in its rendering (the chat template rewrites it)")


def chat_examples(
    tokenizer: PreTrainedTokenizerFast, encoder: Tokenizer, conversations: list[list[dict]], mask: bool, first_row: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, labels (flat int32) and lengths (int64) of rendered conversations.

    With `mask`, only tokens that start inside an assistant message's content carry a label,
    plus the template's tokens after it up to and including its first special token (the
    end-of-turn marker such as <|im_end|> or </s>), so the model learns to end its turn.
    """
    rendered = assistant_spans(tokenizer, conversations, first_row)
    encodings = encoder.encode_batch([full for full, _ in rendered], add_special_tokens=False)  # with offsets
    is_special = np.zeros(len(tokenizer), bool)
    is_special[sorted(_special_ids(tokenizer))] = True
    all_ids, all_labels, lengths = [], [], []
    for (full, spans), enc in zip(rendered, encodings):
        ids = np.array(enc.ids, dtype=np.int32)
        learn = np.ones(len(ids), bool)
        if mask:
            starts = np.fromiter(chain.from_iterable(enc.offsets), dtype=np.int64, count=2 * len(ids))[::2]
            learn[:] = False
            for content_start, content_end, turn_end in spans:
                lo, hi, stop = np.searchsorted(starts, [content_start, content_end, turn_end])
                learn[lo:hi] = True
                ends_turn = np.flatnonzero(is_special[ids[hi:stop]])
                if len(ends_turn):
                    learn[hi : hi + ends_turn[0] + 1] = True
        all_ids.append(ids)
        all_labels.append(np.where(learn, ids, IGNORE_INDEX).astype(np.int32))
        lengths.append(len(ids))
    if not all_ids:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(all_ids), np.concatenate(all_labels), np.array(lengths, np.int64)
