"""What a checkpoint saves of the loop itself: where training is, and early stopping's memory.

The model, optimizer and RNG states are saved beside it (checkpoint.py); this is the small rest.
It is stored as a plain dict of numbers and lists, so a checkpoint holds no class of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Global samples drawn from the data stream: where the next step starts (data/loader.py)."""
    history: list[dict] = field(default_factory=list)
    """One row per step: step, loss, lr, grad_norm (the train log)."""
    evals: list[dict] = field(default_factory=list)
    """One row per validation: step and its metrics."""
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    """Validations since the best one (early stopping's patience counter)."""
    stopped_at: int | None = None
    """The step early stopping ended training at; a rerun does not train past it."""

    def to_dict(self) -> dict[str, Any]:
        early = {"best": self.best, "best_step": self.best_step, "bad": self.bad, "stopped_at": self.stopped_at}
        return {"step": self.step, "samples_seen": self.samples_seen, "history": self.history, "evals": self.evals,
                "early_stopping": early}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainState":
        early = saved.get("early_stopping") or {}
        return cls(saved["step"], saved["samples_seen"], list(saved["history"]), list(saved.get("evals", [])),
                   early.get("best"), early.get("best_step"), early.get("bad", 0), early.get("stopped_at"))

    def early_stopping(self) -> dict[str, Any]:
        return self.to_dict()["early_stopping"]

    def record_validation(self, metrics: dict[str, float], metric: str, patience: int | None) -> bool:
        """Note a validation at `self.step`; True when early stopping should stop training now."""
        self.evals.append({"step": self.step, **metrics})
        value = metrics[metric]
        if self.best is None or (value > self.best if metric == "accuracy" else value < self.best):
            self.best, self.best_step, self.bad = value, self.step, 0
        else:
            self.bad += 1
        if patience and self.bad >= patience:
            self.stopped_at = self.step
        return self.stopped_at is not None

