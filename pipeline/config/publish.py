"""The sections after training: the evaluation gate, and where versions are published."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section


class EvaluateConfig(Section):
    max_batches: int = Field(50, gt=0)
    """Validation blocks are scored in batches of 8, up to this many batches."""
    num_generations: int = Field(3, ge=0)
    """Validation prompts to generate answers for, written into metrics.json."""
    max_new_tokens: int = Field(40, gt=0)
    """Tokens generated per sample prompt (and per ROUGE answer)."""
    rouge_rows: int = Field(0, ge=0)
    """Causal LM with prompts (prompt_response, instruction, chat): generate a greedy answer for up to this many held-out rows and score ROUGE-1/2/L against their responses (a summarizer's metric); 0: off. `min_rouge_l` then gates it."""
    max_perplexity: float | None = Field(None, gt=0.0)
    """Evaluation gate: refuse to publish when validation perplexity is above this."""
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    """Evaluation gate (classification): refuse to publish when held-out accuracy is below this."""
    min_rouge_l: float | None = Field(None, ge=0.0, le=1.0)
    """Evaluation gate (seq2seq; causal_lm with rouge_rows): refuse to publish when held-out ROUGE-L F1 is below this."""
    min_reward_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    """Evaluation gate (preference): refuse to publish when fewer held-out pairs than this fraction have the chosen answer's implicit reward above the rejected one's."""


class RegistryConfig(Section):
    url: str = "registry"
    """Registry root: a local folder or an fsspec URL (s3://bucket/prefix)."""
    model_name: str = Field("quickstart-gpt2", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Name under which versions are published."""
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Version label; default: the first 12 hex digits of the publish fingerprint, so identical inputs give the identical version."""
