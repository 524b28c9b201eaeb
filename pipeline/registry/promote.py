"""Promotion: move an alias (`production`, `champion`) to a version only after checking it again.

    tunepipe registry promote quickstart-gpt2 3c9172e4ba9d --to production --max perplexity=2.0

A version was checked when it was published, but a registry is a folder or a bucket that
people and tools can touch afterwards, and the bar for `production` may be higher than the
publish gate. So promotion re-verifies every file against the version's manifest, re-judges the
metrics it carries against the gate they were published under (a missing or non-finite metric
fails), then against the stricter `--min` / `--max` bounds given, and only then moves the alias.
"""

from __future__ import annotations

import math

from pipeline import artifacts
from pipeline.registry import aliases
from pipeline.registry.names import RegistryError, version_url


class PromotionRefused(RegistryError):
    pass


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def gate_problems(metrics: dict, minimums: dict[str, float], maximums: dict[str, float]) -> list[str]:
    """Why these metrics miss the recorded gate or the bounds given: one line each, naming the metric."""
    problems = []
    gate = metrics.get("gate") or {}
    if gate.get("passed") is not True:
        problems.append(f"its evaluation gate did not pass: {gate.get('failed') or gate}")
    bounds = [(k.removeprefix("min_"), ">=", v, "the publish gate") for k, v in (gate.get("thresholds") or {}).items() if k.startswith("min_")]
    bounds += [(k.removeprefix("max_"), "<=", v, "the publish gate") for k, v in (gate.get("thresholds") or {}).items() if k.startswith("max_")]
    bounds += [(k, ">=", v, "--min") for k, v in minimums.items()]
    bounds += [(k, "<=", v, "--max") for k, v in maximums.items()]
    for metric, op, bound, source in bounds:
        if bound is None:
            continue
        value = metrics.get(metric)
        if not _finite(value):
            problems.append(f"{metric} is {value!r}, not a number ({source} needs {metric} {op} {bound})")
        elif (op == ">=" and not value >= bound) or (op == "<=" and not value <= bound):
            problems.append(f"{metric} {value:.6g} is not {op} {bound} ({source})")
    return problems


def promote(registry: str, model: str, version: str, alias: str, minimums: dict[str, float] | None = None,
            maximums: dict[str, float] | None = None) -> aliases.Move:
    url = version_url(registry, model, version)
    problems = artifacts.verify(url)
    if problems:
        raise PromotionRefused(f"not promoting {model}@{version} to {alias!r}: its files do not match its manifest: " + "; ".join(problems[:3]))
    try:
        metrics = artifacts.read_json(artifacts.file_url(url, "metrics.json"))
    except FileNotFoundError:
        raise PromotionRefused(f"not promoting {model}@{version} to {alias!r}: it holds no metrics.json to judge (pushed by hand?)") from None
    problems = gate_problems(metrics, minimums or {}, maximums or {})
    if problems:
        raise PromotionRefused(f"not promoting {model}@{version} to {alias!r}: " + "; ".join(problems))
    bounds = ", ".join([f"{k}>={v}" for k, v in (minimums or {}).items()] + [f"{k}<={v}" for k, v in (maximums or {}).items()])
    return aliases.move(registry, model, alias, version, reason=f"promote (verified, gate passed{', ' + bounds if bounds else ''})")
