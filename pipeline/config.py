"""Typed pipeline configuration: one frozen pydantic model per stage, composed into `PipelineConfig`.

Load a YAML preset and apply dotted overrides:

    cfg = load_config("examples/quickstart.yaml", ["train.lr=3e-4", "train.max_steps=50"])

Every field's docstring is its reference documentation (`tunepipe config --help` prints them).
A wrong key or a bad value raises `ConfigError` naming the dotted key, before any stage runs.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid. The message names the dotted key."""


class Section(BaseModel):
    """Base for every config section: immutable, and unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    # Fields that change how a stage runs but never what it produces (logging cadence,
    # checkpoint cadence). They are left out of the fingerprint so that changing them
    # does not throw away a cache that is still valid.
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in type(self).not_fingerprinted}


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
    """`prompt_response` template: the column holding the prompt (its tokens carry no loss)."""
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
    """Remove English stop words (the list shipped in pipeline/stopwords_en.txt), matched case-insensitively as whole words."""
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
    truncation: Literal["right", "left", "drop"] = "right"
    """`none`/`bins`: an example longer than block_size keeps its first tokens (`right`), its last tokens (`left`), or is dropped (`drop`); counted in the stats."""
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


class ModelConfig(Section):
    name: str = "gpt2"
    """Hugging Face model id or local folder. With `init: scratch` only its architecture family is used."""
    init: Literal["scratch", "pretrained"] = "scratch"
    """`scratch`: a fresh model of the size below with a BPE tokenizer trained on the data; `pretrained`: load `name` (weights and tokenizer)."""
    n_layer: int = Field(2, gt=0)
    """Transformer blocks (scratch only)."""
    n_head: int = Field(2, gt=0)
    """Attention heads (scratch only)."""
    n_embd: int = Field(64, gt=0)
    """Hidden size (scratch only)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout for residual, embedding and attention (scratch only)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        return self


class TrainConfig(Section):
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset({"save_every_steps", "keep_last_checkpoints", "log_every_steps"})

    seed: int = 0
    """Seed for initialisation, dropout and data order."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine decays to lr * min_lr_ratio at max_steps."""
    max_steps: int = Field(200, gt=0)
    """Optimizer steps to train."""
    micro_batch_size: int = Field(8, gt=0)
    """Blocks per rank per forward pass."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch_size x grad_accum_steps x world size."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient clipping norm."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 on a CUDA device that supports it, fp32 elsewhere. `fp16` (CUDA only) adds dynamic loss scaling."""
    group_by_length: bool = False
    """Rows padded per batch (packing none, classification, seq2seq): draw them in groups of 64 sorted by
    length, so batches pad less. Faster; on small data it can cost some validation loss (docs/benchmarks.md)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass: less memory, about a third more compute."""
    fast_cpu_dropout: bool = True
    """On CPU, draw dropout masks 16 bits per element instead of with torch's bernoulli (25% of a small
    GPT-2's step there) and run attention dropout in our own math path. The drop probability is
    rounded to a multiple of 1/65536. CUDA always uses torch's dropout (pipeline/cpu_dropout.py)."""

    method: Literal["full", "freeze", "lora", "qlora", "prompt_tuning", "adapters"] = "full"
    """What trains. `full`: every weight; `freeze`: the top `trainable_blocks` blocks and the head;
    `lora` / `qlora` (4-bit base, CUDA + bitsandbytes): low-rank adapters (PEFT); `prompt_tuning`:
    soft prompt vectors (PEFT); `adapters`: bottleneck adapters after each block (pipeline/bottleneck.py)."""
    trainable_blocks: int = Field(2, ge=0)
    """`freeze`: how many of the top transformer blocks train (with the head); embeddings stay frozen."""
    layer_lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    """Layer-wise learning rates: block i of n trains at lr x decay^(n - i), embeddings at lr x decay^(n + 1). 1.0 = off."""
    head_lr: float | None = Field(None, gt=0.0)
    """Learning rate of the output head (LM head, classifier); default: `lr`."""
    lora_r: int = Field(8, gt=0)
    """LoRA rank."""
    lora_alpha: int = Field(16, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | None = None
    """Module names LoRA wraps; default: the attention projections of the architecture (PEFT's table, else a search)."""
    num_virtual_tokens: int = Field(20, gt=0)
    """`prompt_tuning`: soft prompt length."""
    prompt_init_text: str | None = None
    """`prompt_tuning`: initialise the soft prompt from this text's token embeddings (e.g. "Summarize the following"); default: random."""
    adapter_size: int = Field(16, gt=0)
    """`adapters`: bottleneck width of each adapter."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """Data parallelism: `ddp` (torch DistributedDataParallel) or `deepspeed` (ZeRO, see deepspeed_config)."""
    deepspeed_config: str = "zero2"
    """`zero1`, `zero2`, `zero3`, `zero3_offload` (files in deepspeed_configs/) or a path to a JSON; its `auto` values are filled from this section."""

    eval_every_steps: int | None = Field(None, gt=0)
    """Validate every N steps (validation loss; accuracy for classification) and log it; default: never during training."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop when the validation metric has not improved for this many validations (needs eval_every_steps)."""
    early_stopping_metric: Literal["eval_loss", "accuracy"] = "eval_loss"
    """Validation metric early stopping watches (`accuracy`: classification only)."""
    eval_batches: int = Field(20, gt=0)
    """Validation batches (of micro_batch_size rows) scored at each validation during training."""
    tensorboard: bool = True
    """Write TensorBoard event files (loss, lr, grad norm, tokens/s, MFU on GPU) under the train output's `tensorboard/`."""
    save_every_steps: int = Field(50, gt=0)
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_last_checkpoints: int = Field(2, gt=0)
    """Older complete checkpoints beyond this many are deleted; the newest complete one never is."""
    log_every_steps: int = Field(10, gt=0)
    """Log loss, learning rate and throughput every N steps."""
    nproc_per_node: int = Field(1, gt=0)
    """Processes `torchrun` starts on this node (one per GPU; on CPU, gloo ranks)."""


class EvaluateConfig(Section):
    max_batches: int = Field(50, gt=0)
    """Validation blocks are scored in batches of 8, up to this many batches."""
    num_generations: int = Field(3, ge=0)
    """Validation prompts to generate answers for, written into metrics.json."""
    max_new_tokens: int = Field(40, gt=0)
    """Tokens generated per sample prompt."""
    max_perplexity: float | None = Field(None, gt=0.0)
    """Evaluation gate: refuse to publish when validation perplexity is above this."""
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    """Evaluation gate (classification): refuse to publish when held-out accuracy is below this."""
    min_rouge_l: float | None = Field(None, ge=0.0, le=1.0)
    """Evaluation gate (seq2seq): refuse to publish when held-out ROUGE-L F1 is below this."""


class RegistryConfig(Section):
    url: str = "registry"
    """Registry root: a local folder or an fsspec URL (s3://bucket/prefix)."""
    model_name: str = Field("quickstart-gpt2", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Name under which versions are published."""
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Version label; default: the first 12 hex digits of the publish fingerprint, so identical inputs give the identical version."""


class RowSpec(Section):
    """Derived from the config, never written by users: what each ingested row must hold for this
    task. Ingest checks these columns and sample dedups on them, so this is what their fingerprints
    hash (not the whole preprocess section: editing a template must not re-ingest)."""

    task: str
    template: str
    columns: dict[str, str]
    """Role (prompt, response, ...) -> column name, for the roles this task and template read."""
    optional: tuple[str, ...] = ()
    """Roles whose column may be absent or empty (the instruction template's input)."""

    @property
    def required_columns(self) -> list[str]:
        return [c for role, c in self.columns.items() if role not in self.optional]


def _roles(task: str, template: str, data: DataConfig) -> tuple[dict[str, str], tuple[str, ...]]:
    if task == "classification":
        return {"text": data.text_column, "label": data.label_column}, ()
    if task == "seq2seq":
        return {"source": data.text_column, "target": data.target_column}, ()
    if template == "prompt_response":
        return {"prompt": data.prompt_column, "response": data.response_column}, ()
    if template == "instruction":
        roles = {"instruction": data.instruction_column, "input": data.input_column, "output": data.output_column}
        return roles, ("input",)
    if template == "chat":
        return {"messages": data.messages_column}, ()
    return {"text": data.text_column}, ()


class PipelineConfig(Section):
    task: Literal["causal_lm", "classification", "seq2seq"] = "causal_lm"
    """What the model learns: `causal_lm` (next-token / instruction SFT), `classification` (text -> label), `seq2seq` (source -> target)."""
    data: DataConfig = DataConfig()

    sample: SampleConfig = SampleConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    def _train_options_agree(self) -> "PipelineConfig":
        t = self.train
        if t.early_stopping_patience is not None and t.eval_every_steps is None:
            raise ValueError("train.early_stopping_patience needs train.eval_every_steps (how often to validate)")
        if t.early_stopping_metric == "accuracy" and self.task != "classification":
            raise ValueError(f"train.early_stopping_metric 'accuracy' needs task classification (task is {self.task!r})")
        return self

    @property
    def row_spec(self) -> RowSpec:
        columns, optional = _roles(self.task, self.preprocess.template, self.data)
        return RowSpec(task=self.task, template=self.preprocess.template, columns=columns, optional=optional)


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(PipelineConfig), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}"


_YAML_NULLS = {"null", "Null", "NULL", "~"}


def _parse_value(key: str, text: str, annotation: Any) -> Any:
    """Parse an override value as YAML, except that a text field keeps the text as typed.

    Plain YAML would turn `registry.version=2` into the int 2, `registry.version=2024-05-01`
    into a date, a template starting with `#` into None (a comment) and `data.source=*.csv`
    into a parse error (an alias); all four are meant as strings.
    """
    text = text.strip()
    if not text:
        return None
    takes_text = annotation is str or str in get_args(annotation)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if takes_text:
            return text
        raise ConfigError(f"config key '{key}': cannot parse {text!r} ({getattr(e, 'problem', None) or e})") from None
    if takes_text and not isinstance(value, (str, list, dict)) and text not in _YAML_NULLS:
        return text
    return value


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (so 3, 0.5, true, [a, b] work)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value, e.g. train.lr=3e-4")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    model: type[BaseModel] = PipelineConfig
    node = raw
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            raise ConfigError(_unknown_key_message(key))
        annotation = model.model_fields[part].annotation
        last = depth == len(parts) - 1
        if last:
            node[part] = _parse_value(key, text, annotation)
        else:
            if not (isinstance(annotation, type) and issubclass(annotation, Section)):
                raise ConfigError(_unknown_key_message(key))
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' must be a mapping")
            model = annotation


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"] if p != "__root__")
        if item["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(key))
        else:
            value = item.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"config key '{key or '<root>'}': {item['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(raw: dict[str, Any], overrides: list[str] = ()) -> PipelineConfig:
    raw = json.loads(json.dumps(raw or {}))  # deep copy; overrides must not touch the caller's dict
    for override in overrides:
        apply_override(raw, override)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    """Load a YAML preset (or the embedded defaults when `path` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, train:, ...)")
    return build_config(raw, overrides)


def describe_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field: the reference docs of the config."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            rows.extend(describe_fields(annotation, prefix + name + "."))
        else:
            rows.append((prefix + name, repr(field.default), field.description or ""))
    return rows
