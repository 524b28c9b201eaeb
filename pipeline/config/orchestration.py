"""How Prefect runs the stages: the `prefect:` section (retries, timeouts).

None of it changes what a stage makes, so none of it is part of any fingerprint.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config.cluster import LaunchOnly

STAGE_NAMES = ("ingest", "sample", "preprocess", "tokenize", "reference", "train", "evaluate", "publish")


class PrefectConfig(LaunchOnly):
    retries: int = Field(2, ge=0)
    """Retries of a stage that reads or writes remote storage: ingest of an s3:// or hub source,
    publish to an s3:// registry, every stage but train when the workdir is s3://. Never train: a
    failed train resumes from its checkpoint on the next run, not in a loop of retries."""
    retry_delay_s: float = Field(10.0, ge=0)
    """Seconds before the first retry; each further retry waits twice as long as the one before."""
    timeout_s: dict[str, float] = {}
    """Seconds a stage may run before Prefect fails it, by stage name, e.g. {ingest: 3600,
    train: 86400}. A timed-out train stops its ranks with SIGTERM (they checkpoint first), so
    the next run resumes. Default: no limit."""

    @field_validator("timeout_s")
    @classmethod
    def _known_stages(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(STAGE_NAMES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGE_NAMES)}")
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"timeouts must be positive seconds, got {bad}")
        return value
