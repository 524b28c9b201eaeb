"""What a run did, for people: the summary table, the run's name, and its markdown report.

The CLI prints the table; the Prefect flow attaches the markdown report to its run, so the
Prefect UI shows for each scheduled run which stages ran or were cached and where the model went.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.stages import StageResult


def config_fingerprint(cfg: "PipelineConfig") -> str:
    """sha256 of every setting that changes what the run makes (launch-only keys left out)."""
    sections = {name: cfg.fingerprint_section(name) for name in type(cfg).model_fields if hasattr(getattr(cfg, name), "fingerprint_dict")}
    sections["task"] = cfg.task
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()


def run_name(cfg: "PipelineConfig") -> str:
    """`<model name>-<8 hex of the config>`: runs of one config share the name's prefix and
    suffix, so a schedule's runs line up in the Prefect UI and a changed setting stands out."""
    return f"{cfg.registry.model_name}-{config_fingerprint(cfg)[:8]}"


def text_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def stat_summary(name: str, stats: dict) -> str:
    keys = {
        "ingest": ["rows_in", "rows_out", "rows_rejected"],
        "sample": ["rows_in", "duplicates_removed", "near_duplicates_removed", "train", "validation", "test"],
        "preprocess": ["rows_in", "rows_out", "rows_rejected"],
        "tokenize": ["tokens", "train_rows", "truncated", "dropped", "utilisation"],
        "reference": ["pairs", "device", "seconds"],
        "train": ["method", "steps", "world_size", "trainable_params", "final_loss", "tokens_per_s"],
        "evaluate": ["perplexity", "accuracy", "macro_f1", "rouge_l", "rewards/accuracies", "rewards/margins", "gate_passed"],
        "publish": ["version"],
    }.get(name, [])
    # Per-split counts sit one level down (stats["splits"][split]["rows"]); show them flat.
    flat = dict(stats)
    for split, values in (stats.get("splits") or {}).items():
        if isinstance(values, dict) and "rows" in values:
            flat.setdefault(split, values["rows"])
            flat.setdefault(f"{split}_rows", values["rows"])
    parts = []
    for k in keys:
        if flat.get(k) not in (None, 0) or k in ("rows_rejected", "rows_out"):
            if k not in flat:
                continue
            v = flat[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)



def summary_rows(results: "list[StageResult]") -> list[list[str]]:
    return [[r.name, r.status, f"{r.seconds:.1f}", r.fingerprint[:12], stat_summary(r.name, r.stats)] for r in results]


SUMMARY_HEADER = ["stage", "status", "seconds", "fingerprint", "stats"]


def markdown_report(cfg: "PipelineConfig", results: "list[StageResult]", workdir: str) -> str:
    publish = next((r for r in results if r.name == "publish" and r.status != "failed"), None)
    failed = next((r for r in results if r.status == "failed"), None)
    lines = [f"# {run_name(cfg)}", ""]
    if failed:
        lines += [f"**Failed** at stage `{failed.name}`: {failed.stats.get('error', '')}", ""]
    elif results and all(r.status == "cached" for r in results):
        already = f" The config's version is `{publish.stats['url']}`." if publish and publish.stats.get("url") else ""
        lines += [f"Every stage was cached: nothing new was trained or published.{already}", ""]
    elif publish and publish.status == "ran" and publish.stats.get("url"):
        lines += [f"**Published:** `{publish.stats['url']}` (version `{publish.stats.get('version', '')}`)", ""]
    elif publish and publish.stats.get("url"):  # e.g. a run that overlapped the one that published
        lines += [f"Nothing new was published: an earlier run published this version, `{publish.stats['url']}`.", ""]
    lines += ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    for row in summary_rows(results):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    lines += ["", f"workdir: `{workdir}`"]
    return "\n".join(lines)
