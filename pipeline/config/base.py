"""The base of every config section, and the one error a bad config raises."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


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
