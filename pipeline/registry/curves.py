"""Training curves for a version's model card: loss and learning rate per optimizer step, as PNGs.

    written = write_curves(bundle, train_log, validations)   # -> ["curves/loss.png", "curves/lr.png"]

`train_log` is train_log.jsonl's rows ({"step", "loss", "lr", "grad_norm"}); `validations` is
train_stats.json's list of {"step", "eval_loss", ...}, drawn as points over the train loss.
A curve with no finite value to draw is not written, so an empty log writes nothing.

Drawn with matplotlib's object API (`Figure` + `FigureCanvasAgg`), never pyplot: pyplot keeps
figures in a global registry and picks a GUI backend from the environment, neither of which a
publisher running inside a Prefect worker or a test process should touch.
"""

from __future__ import annotations

import math
from pathlib import Path

FOLDER = "curves"
SIZE_INCHES = (6.0, 3.5)
DPI = 100
# PNG text chunks default to "Software: matplotlib version X"; with it gone the bytes depend only
# on the data and the matplotlib build, so republishing the same run gives the same files.
PNG_METADATA = {"Software": None}


def points(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows whose `step` and `key` are finite numbers, in row order.

    A NaN loss (a diverged step that fp16 loss scaling skipped) or a missing value is left out
    rather than drawn as a gap that matplotlib would silently bridge or break on.
    """
    steps, values = [], []
    for row in rows or []:
        step, value = (row.get("step"), row.get(key)) if isinstance(row, dict) else (None, None)
        if _finite(step) and _finite(value):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: publishing without a card never loads matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.grid(True, alpha=0.3)
    axes.set_xlabel("optimizer step")
    return figure, axes


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)


def draw_loss(train_log: list[dict], validations: list[dict], path: Path) -> bool:
    """Train loss per step, validation loss as points; False (nothing written) when neither has a value."""
    steps, losses = points(train_log, "loss")
    eval_steps, eval_losses = points(validations, "eval_loss")
    if not losses and not eval_losses:
        return False
    figure, axes = _figure()
    if losses:
        # Markers only when there are few steps: a line through 3 points hides that there are 3.
        axes.plot(steps, losses, marker="." if len(steps) <= 30 else None, linewidth=1.2, label="train loss")
    if eval_losses:
        axes.plot(eval_steps, eval_losses, "o", markersize=5, label="validation loss")
    axes.set_ylabel("loss")
    axes.legend(loc="upper right")
    _save(figure, path)
    return True


def draw_lr(train_log: list[dict], path: Path) -> bool:
    """Learning rate per step (warmup, then decay); False when the log has no learning rate."""
    steps, rates = points(train_log, "lr")
    if not rates:
        return False
    figure, axes = _figure()
    axes.plot(steps, rates, marker="." if len(steps) <= 30 else None, linewidth=1.2, color="tab:green")
    axes.set_ylabel("learning rate")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _save(figure, path)
    return True


def write_curves(bundle: Path, train_log: list[dict], validations: list[dict]) -> list[str]:
    """Draw the curves under bundle/curves/; return the paths written, relative to `bundle`."""
    written = []
    if draw_loss(train_log, validations, bundle / FOLDER / "loss.png"):
        written.append(f"{FOLDER}/loss.png")
    if draw_lr(train_log, bundle / FOLDER / "lr.png"):
        written.append(f"{FOLDER}/lr.png")
    return written
