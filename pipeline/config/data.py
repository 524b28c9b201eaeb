"""The data stages' sections: where rows come from (ingest), which are kept (sample), how they read (preprocess), how they become tokens (tokenize)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section


class DataConfig(Section):
    # Where the bytes come from does not change what they are: the content is hashed anyway.
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset({"s3_endpoint_url"})

    source: str | list[str] = "examples/data/support.csv"
    """Input(s), one or a list: a path or glob (local or fsspec URL such as s3://bucket/*.csv.gz), a folder written by `datasets.save_to_disk`, or `hf:NAME` for `datasets.load_dataset(NAME)` (a hub id or a local dataset folder). Relative paths are relative to the working directory."""
    format: Literal["csv", "tsv", "jsonl", "parquet"] | None = None
    """File format; inferred from each file's extension (.csv, .tsv, .jsonl, .parquet, optionally .gz/.zst/.bz2/.xz) when absent."""
    hf_config: str | None = None
    """`hf:` sources: the dataset configuration (subset) name."""
    hf_split: str = "train"
    """`hf:` and `save_to_disk` sources: the split to read."""
    hf_revision: str | None = None
    """`hf:` sources: a branch, tag or commit of the dataset repository."""
    rename: dict[str, str] = {}
    """Rename input columns on ingest, `{old: new}`; the *_column keys below name columns after renaming."""
    prompt_column: str = "prompt"
    """`prompt_response` template and preference: the column holding the prompt (its tokens carry no loss; preference with `chat`: a JSON list of messages, or a plain user message)."""
    response_column: str = "response"
    """`prompt_response` template: the column holding the response the model learns to produce."""
    instruction_column: str = "instruction"
    """`instruction` template: the instruction column."""
    input_column: str = "input"
    """`instruction` template: the optional input (context) column; may be absent or empty."""
    output_column: str = "output"
    """`instruction` template: the column holding the answer the model learns to produce."""
    messages_column: str = "messages"
    """`chat` template: a column of JSON lists of {"role", "content"} messages; assistant turns carry the loss."""
    text_column: str = "text"
    """`text` template: the whole text to learn; classification: the text to classify; seq2seq: the source text."""
    label_column: str = "label"
    """Classification: the label column (any strings; mapped to ids in sorted order)."""
    target_column: str = "target"
    """Seq2seq: the target text (e.g. the summary of an article)."""
    chosen_column: str = "chosen"
    """Preference: the preferred answer to the prompt (text, or with the `chat` template a JSON list holding one assistant message)."""
    rejected_column: str = "rejected"
    """Preference: the dispreferred answer to the same prompt, in the form of `chosen_column`."""
    invalid_utf8: Literal["reject", "replace"] = "reject"
    """A row with bytes that are not UTF-8: `reject` it (to the rejects file) or `replace` the bad bytes with U+FFFD (counted in the stats)."""
    max_reject_fraction: float = Field(0.1, ge=0.0, le=1.0)
    """Fail the ingest when more than this fraction of rows is rejected."""
    shard_rows: int = Field(100_000, gt=0)
    """Rows per output Parquet shard."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for s3:// sources and outputs; default: the AWS_ENDPOINT_URL environment variable, else AWS."""


class SampleConfig(Section):
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    """Keep this fraction of the rows (seeded). Mutually exclusive with `count`."""
    count: int | None = Field(None, gt=0)
    """Keep this many rows (seeded). Mutually exclusive with `fraction`."""
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of the kept rows held out for validation."""
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the kept rows held out as a test split (never trained on, never used by the gate)."""
    seed: int = Field(0, ge=0)
    """Seed for row selection and the split; the same seed gives the same rows."""
    stratify_by: str | None = None
    """Column whose classes keep their proportions (within one row per class) in the sample and in every split."""
    group_by: str | None = None
    """Column of group keys (a user, a document): all rows of a group land in the same split."""
    dedup: Literal["none", "exact", "minhash"] = "none"
    """Drop duplicates before sampling: `exact` on normalised text (case, Unicode form and whitespace ignored), `minhash` also near-duplicates (datasketch MinHash LSH)."""
    dedup_columns: list[str] | None = None
    """Columns compared by dedup; default: the columns the task reads (e.g. prompt and response)."""
    minhash_threshold: float = Field(0.8, gt=0.0, lt=1.0)
    """`minhash`: estimated Jaccard similarity of word 3-gram sets above which rows are near-duplicates."""
    minhash_num_perm: int = Field(128, ge=16)
    """`minhash`: permutations per signature (more: slower, more precise)."""

    @model_validator(mode="after")
    def _check_sizes(self) -> "SampleConfig":
        if self.fraction is not None and self.count is not None:
            raise ValueError("set sample.fraction or sample.count, not both")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("sample.validation_fraction + sample.test_fraction must leave rows to train on (sum < 1)")
        return self


class PreprocessConfig(Section):
    template: Literal["prompt_response", "instruction", "chat", "text"] = "prompt_response"
    """Causal LM: how a row becomes training text. `prompt_response` and `instruction` mask the prompt part from the loss, `chat` masks all but assistant turns (rendered with the tokenizer's chat template), `text` learns every token. Classification and seq2seq ignore it."""
    prompt_template: str = "### Question:\n{prompt}\n### Answer:\n"
    """`prompt_response`: template for the prompt part; `{prompt}` is the prompt column. Its tokens are masked from the loss."""
    response_template: str = "{response}"
    """`prompt_response`: template for the response part; `{response}` is the response column. The tokenizer's EOS follows it."""
    instruction_template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    """`instruction`: the prompt part of rows that have an input (Alpaca layout). The output column follows it, then EOS."""
    instruction_template_no_input: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    """`instruction`: the prompt part of rows whose input is absent or empty."""
    unicode_nfc: bool = False
    """Normalise text to Unicode NFC (composed characters), so visually equal strings tokenize alike."""
    lowercase: bool = False
    """Lowercase all text."""
    strip_punctuation: bool = False
    """Remove punctuation characters (Unicode category P)."""
    strip_digits: bool = False
    """Remove digits."""
    remove_stopwords: bool = False
    """Remove English stop words (the list shipped in pipeline/data/stopwords_en.txt), matched case-insensitively as whole words."""
    collapse_whitespace: bool = False
    """Collapse runs of whitespace to one space and trim both ends (also drops line breaks)."""
    min_chars: int = Field(1, ge=0)
    """Drop rows whose learned part (response, output, assistant turns, text, target) is shorter than this after normalisation; counted in the stats."""
    max_chars: int | None = Field(None, gt=0)
    """Drop rows whose whole rendered text is longer than this; counted in the stats."""


class TokenizeConfig(Section):
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset({"batch_size", "num_threads"})

    block_size: int = Field(128, ge=8)
    """Length of each packed training block (`concat`, `bins`) or the longest example (`none`), in tokens."""
    packing: Literal["none", "concat", "bins"] = "concat"
    """`none`: one example per row, padded per batch by the trainer; `concat`: examples joined and cut into blocks (nothing truncated, examples may span blocks); `bins`: whole examples placed into blocks first-fit-decreasing, positions restarting at each example."""
    truncation: Literal["right", "left", "prompt", "drop"] = "right"
    """`none`/`bins`: an example longer than block_size keeps its first tokens (`right`), its last tokens (`left`), its whole response with the middle of its prompt cut (`prompt`: for long articles and their summaries; causal_lm and preference pairs), or is dropped (`drop`); counted in the stats. `prompt` drops an example whose response alone is too long."""
    vocab_size: int = Field(2000, ge=300)
    """Vocabulary size of the BPE tokenizer trained on the train split when `model.init` is `scratch`."""
    batch_size: int = Field(1000, gt=0)
    """Texts per tokenizer call."""
    num_threads: int | None = Field(None, gt=0)
    """Tokenizer threads (the Rust tokenizer encodes each batch in parallel); default: all cores."""
    mask_prompt: bool = True
    """Label prompt tokens (and non-assistant chat turns) -100 so the loss covers only what the model should produce."""
    chat_template: str | None = None
    """`chat`: a Jinja chat template to use instead of the tokenizer's own (scratch tokenizers get a ChatML template)."""
