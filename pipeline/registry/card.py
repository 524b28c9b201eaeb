"""The model card a registry version carries: README.md in Hugging Face's format, and its curves.

    written = write_card(bundle, model_name="support-bot", version="3c9172e4ba9d", metrics=metrics,
                         lineage=stages, config=resolved, train_log=rows, train_stats=stats,
                         base={"hub": "gpt2", "revision": None}, method="lora")
    # written == ["README.md", "curves/loss.png", "curves/lr.png"]

The front matter (yaml.safe_dump, read back by huggingface_hub's ModelCard) names the library,
the base model and how this one relates to it, the data, and a `model-index` with every numeric
evaluate metric. The body: a summary, the training numbers and curves, the evaluation and its
gate, generations (base vs tuned), the lineage down to the raw data's sha256, how to load it.

Text that comes from data (prompts, generations, class names, paths) goes through `inline()`:
registry pages render the card, so data must not open HTML, break a table or end the front
matter. The card holds no clock time: the same run gives the same bytes.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.registry.curves import write_curves

HF_TASK = {"causal_lm": "text-generation", "classification": "text-classification", "seq2seq": "text2text-generation",
           "preference": "text-generation"}
TASK_WORDS = {"causal_lm": "causal language model", "classification": "text classifier", "seq2seq": "sequence-to-sequence model",
              "preference": "causal language model tuned on preference pairs (DPO)"}
PEFT_METHODS = frozenset({"lora", "qlora", "prompt_tuning"})
"""Saved by PEFT (an adapter config and its weights): Hugging Face loads them with `peft`."""
ADAPTER_METHODS = PEFT_METHODS | {"adapters"}
"""New weights on top of a base that stays as it was: the version is an adapter of its base."""
METRICS = (("perplexity", "perplexity", "Perplexity"), ("accuracy", "accuracy", "Accuracy"), ("macro_f1", "f1", "Macro F1"),
           ("rouge_l", "rouge", "ROUGE-L F1"), ("eval_loss", "loss", "Eval loss"))
"""(metrics.json key, model-index metric type, name shown): each task's headline metric first."""
STAGES = ("ingest", "sample", "preprocess", "tokenize", "train", "evaluate")
CELL_CHARS = 400
"""Longer texts are cut in the generations table (metrics.json in the version holds them whole)."""

# Backslash-escaped so data cannot make emphasis, code spans, links or images, or split a cell.
_MARKDOWN = re.compile(r"([\\`*_\[\]|~])")
# Text safe between backticks and on a shell line as it is: no quote, space, backtick or newline.
_PLAIN = re.compile(r"[A-Za-z0-9._:/@+=-]+\Z")


def inline(value: Any, limit: int | None = None) -> str:
    """`value` as one line of inert markdown text: `&<>` as entities, markdown punctuation escaped,
    line breaks as <br> (a table row or a paragraph never ends inside it)."""
    text = str(value)
    if limit and len(text) > limit:
        text = text[:limit] + " …"
    text = _MARKDOWN.sub(r"\\\1", html.escape(text, quote=False))
    return "<br>".join(text.splitlines())


def code(value: Any) -> str:
    """`value` as inline code when it is plain (a name, a hash), else as escaped text: a backtick
    inside would end the code span, and entities would show literally inside one."""
    text = str(value)
    return f"`{text}`" if _PLAIN.match(text) else inline(text)


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return inline(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"


def given(value: Any) -> str | None:
    """`number(value)`, or None for a value not recorded (its table row is left out)."""
    return None if value is None else number(value)


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _section(config: dict, name: str) -> dict:
    section = (config or {}).get(name)
    return section if isinstance(section, dict) else {}


# ---------------------------------------------------------------- front matter


def data_sources(config: dict) -> list[str]:
    """config data.source as a list; `hf:org/name` as `org/name`, the id the Hub knows it by."""
    source = _section(config, "data").get("source")
    sources = source if isinstance(source, list) else [source] if source else []
    return [str(s)[3:] if str(s).startswith("hf:") else str(s) for s in sources]


def base_model(base: dict | None) -> str | None:
    """The front matter's `base_model`: a hub id, or `registry://MODEL@VERSION`; None for no base
    and for a local folder (a path on the publishing machine names nothing a reader can fetch)."""
    if not isinstance(base, dict):
        return None
    if base.get("hub"):
        return str(base["hub"])
    registry = base.get("registry")
    if isinstance(registry, dict):
        return f"registry://{registry.get('model')}@{registry.get('version')}"
    return None


def origin(base: dict | None) -> str:
    """Where the weights started, as the end of the summary's sentence (registry/base_records.py's shapes)."""
    base = base if isinstance(base, dict) else {}
    if base.get("hub"):
        pinned = f"at revision {code(base['revision'])}" if base.get("revision") else "(revision not pinned)"
        return f"on top of the Hugging Face model {code(base['hub'])} {pinned}"
    registry = base.get("registry")
    if isinstance(registry, dict):
        where = f"the registry at {code(base['url'])}" if base.get("url") else "this registry"
        return f"on top of version {code(registry.get('version'))} of {code(registry.get('model'))} in {where}"
    if base.get("path"):
        return f"on top of the model in the local folder {code(base['path'])}"
    return "from scratch (randomly initialised weights), published whole"


def front_matter(model_name: str, metrics: dict, config: dict, base: dict | None, method: str) -> dict:
    task = metrics.get("task") or "causal_lm"
    hf_task = HF_TASK.get(task, "text-generation")
    data: dict[str, Any] = {"library_name": "peft" if method in PEFT_METHODS else "transformers"}
    if base_model(base):
        data["base_model"] = base_model(base)
        data["base_model_relation"] = "adapter" if method in ADAPTER_METHODS else "finetune"
    data["tags"] = list(dict.fromkeys(str(t) for t in ("tunepipe", task, method, hf_task) if t))
    sources = data_sources(config)
    if sources:
        data["datasets"] = sources
    data["pipeline_tag"] = hf_task
    scores = [{"type": kind, "name": name, "value": float(metrics[key])}
              for key, kind, name in METRICS if _finite(metrics.get(key))]
    if scores:  # a model-index with no metric fails huggingface_hub's validation
        dataset = {"name": ", ".join(sources) or "unknown", "type": ",".join(sources) or "unknown",
                   "split": metrics.get("split") or "validation"}
        task_entry = {"type": hf_task, "name": TASK_WORDS.get(task, task)}
        data["model-index"] = [{"name": model_name, "results": [{"task": task_entry, "dataset": dataset, "metrics": scores}]}]
    return data


# ---------------------------------------------------------------- body sections


def summary(model_name: str, version: str, metrics: dict, base: dict | None, method: str) -> str:
    task = metrics.get("task") or "causal_lm"
    gate = (metrics.get("gate") or {}).get("passed")
    return (f"# {inline(model_name)}\n\n{inline(model_name)} version {code(version)} is a "
            f"{TASK_WORDS.get(task, inline(task))} ({code(task)}), trained by tunepipe with method "
            f"{code(method)} {origin(base)}. It was evaluated on the {inline(metrics.get('split') or 'validation')} "
            f"split and {'passed' if gate else 'did not pass'} the evaluation gate.")


def training(train_stats: dict, config: dict, method: str, curves: list[str]) -> str:
    stats, train = train_stats or {}, _section(config, "train")
    trainable, total = stats.get("trainable_params"), stats.get("total_params")
    params = None
    if _finite(trainable) and _finite(total) and total:
        params = f"{number(trainable)} of {number(total)} ({100 * trainable / total:.3g}%)"
    batch = None
    if train.get("micro_batch_size") and train.get("grad_accum_steps"):
        batch = f"{number(train['micro_batch_size'])} × {number(train['grad_accum_steps'])} accumulation steps"
    evals = [v for v in stats.get("validations") or [] if isinstance(v, dict) and _finite(v.get("eval_loss"))]
    best = min(evals, key=lambda v: v["eval_loss"]) if evals else None
    rows = [("Method", code(stats.get("method") or method)), ("Strategy", given(stats.get("strategy"))),
            ("World size", given(stats.get("world_size"))), ("Optimizer steps", given(stats.get("steps"))),
            ("Resumed from step", given(stats.get("resumed_from_step") or None)),
            ("Final train loss", given(stats.get("final_loss"))),
            ("Best validation loss", f"{best['eval_loss']:.6g} at step {number(best.get('step'))}" if best else None),
            ("Tokens per second", given(stats.get("tokens_per_s"))), ("Wall-clock seconds", given(stats.get("seconds"))),
            ("Trainable parameters", params), ("Peak learning rate", given(train.get("lr"))),
            ("Micro batch per rank", batch), ("Seed", given(train.get("seed")))]
    shown = [(name, value) for name, value in rows if value is not None]
    text = "## Training\n\n" + (table(("", "value"), shown) if stats else "No training statistics were recorded.")
    if not curves:
        return text + "\n\nNo training curves: the training log of this version is empty."
    names = {"curves/loss.png": "training loss", "curves/lr.png": "learning rate"}
    return text + "\n\n" + "\n\n".join(f"![{names.get(path, path)}]({path})" for path in curves)


def gate_cell(metric: str, value: Any, thresholds: dict) -> str:
    """The threshold evaluate held `metric` to (evaluate.max_<metric> or min_<metric>) and whether it held."""
    for setting, threshold in thresholds.items():
        if setting in (f"max_{metric}", f"min_{metric}") and _finite(threshold):
            at_most = setting.startswith("max_")
            held = _finite(value) and (value <= threshold if at_most else value >= threshold)
            sign, verdict = ("≤" if at_most else "≥"), ("passed" if held else "failed")
            return f"{sign} {number(threshold)} ({code('evaluate.' + setting)}): {verdict}"
    return "no threshold"


def evaluation(metrics: dict) -> str:
    gate, split = metrics.get("gate") or {}, inline(metrics.get("split") or "validation")
    rows = [(name, "not measured" if metrics[key] is None else number(metrics[key]), split,
             gate_cell(key, metrics[key], gate.get("thresholds") or {})) for key, _, name in METRICS if key in metrics]
    text = "## Evaluation\n\n" + (table(("metric", "value", "split", "gate"), rows) if rows else "No metric was measured.")
    for key, unit in (("eval_tokens", "tokens"), ("examples", "examples")):
        if _finite(metrics.get(key)):
            text += f"\n\nMeasured on {number(metrics[key])} {unit}."
    verdict = "passed" if gate.get("passed") else "failed"
    reasons = "".join(f"\n- {inline(line)}" for line in gate.get("failed") or [])
    text += f"\n\n**Gate: {verdict}.**{reasons}"
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class:
        rows = [(inline(label), *(number((c or {}).get(k)) for k in ("support", "predicted", "correct")))
                for label, c in per_class.items() if isinstance(c, dict)]
        text += "\n\n" + table(("class", "support", "predicted", "correct"), rows)
    return text


def generations(metrics: dict) -> str:
    samples = [g for g in metrics.get("generations") or [] if isinstance(g, dict)]
    shown = [e for e in metrics.get("examples_shown") or [] if isinstance(e, dict)]
    if shown:  # classification: text, true label, predicted label
        rows = [(i, inline(e.get("text", ""), CELL_CHARS), inline(e.get("label", "")), inline(e.get("predicted", "")))
                for i, e in enumerate(shown, 1)]
        return "## Examples\n\n" + table(("#", "text", "label", "predicted"), rows)
    if not samples:
        return "## Generations\n\nNo sample generations were recorded."
    with_base = any("base" in g for g in samples)
    header = ("#", "prompt", "reference", *(("base",) if with_base else ()), "tuned")
    rows = []
    for i, g in enumerate(samples, 1):
        prompt = g.get("prompt", g.get("source", ""))  # seq2seq names its input `source`
        texts = (prompt, g.get("reference", ""), *((g.get("base", ""),) if with_base else ()), g.get("tuned", ""))
        rows.append((i, *(inline(t, CELL_CHARS) for t in texts)))
    note = ("Greedy decoding; the base model answers the same prompts beside the tuned one." if with_base
            else "Greedy decoding (no pretrained base to compare with).")
    return f"## Generations\n\n{note}\n\n" + table(header, rows)


def data_files(content: Any, parent: str = "", depth: int = 0) -> list[tuple[str, str, Any]]:
    """(path, sha256, bytes) of every entry with a sha256 in ingest's content, however nested
    (a hub dataset's entry holds its cache files under `files`)."""
    found: list[tuple[str, str, Any]] = []
    if depth > 8:
        return found
    if isinstance(content, list):
        for item in content:
            found += data_files(item, parent, depth + 1)
    elif isinstance(content, dict):
        name = str(content.get("path") or content.get("name") or "")
        label = f"{parent}/{name}" if parent and name else name or parent
        if isinstance(content.get("sha256"), str):
            found.append((label or "(unnamed)", content["sha256"], content.get("bytes")))
        for value in content.values():
            if isinstance(value, (list, dict)):
                found += data_files(value, label, depth + 1)
    return found


def lineage_section(lineage: dict) -> str:
    stages = {k: v for k, v in (lineage or {}).items() if isinstance(v, dict)}
    order = [s for s in STAGES if s in stages] + sorted(s for s in stages if s not in STAGES)
    prints = [(inline(s), str(stages[s].get("fingerprint") or "")) for s in order]
    text = "## Lineage\n\nEach stage's fingerprint: a hash of its config, its code and its parents' fingerprints.\n\n"
    # Whole fingerprints, no collapsible HTML: registry pages render cards with raw HTML shown as text.
    text += table(("stage", "fingerprint"), [(s, code(f) if f else "none") for s, f in prints])
    files = [(inline(path), "" if size is None else number(size), code(sha)) for path, sha, size
             in data_files(stages.get("ingest", {}).get("content"))]
    text += "\n\n### Raw data\n\n"
    text += table(("file", "bytes", "sha256"), files) if files else "The ingest stage recorded no file hashes."
    software = stages.get("train", {}).get("content")
    if isinstance(software, dict):
        versions = {k: v for k, v in software.items() if isinstance(v, str)}
        if versions:
            text += "\n\nTrained with " + ", ".join(f"{inline(k)} {code(v)}" for k, v in sorted(versions.items())) + "."
        base = software.get("base")
        if isinstance(base, dict) and isinstance(base.get("registry_version"), str):
            text += (f"\n\nStarted from the registry version {code(base['registry_version'])} "
                     f"(manifest sha256 {code(str(base.get('manifest_sha256', '')))}).")
    return text


def how_to_load(model_name: str, version: str, config: dict) -> str:
    ref = f"{model_name}@{version}"
    ref = ref if _PLAIN.match(ref) else "MODEL@VERSION"
    url = str(_section(config, "registry").get("url") or "")
    known = bool(_PLAIN.match(url))
    url = url if known else "REGISTRY_URL"
    where = "" if known else "REGISTRY_URL is the registry's root (a folder or an s3:// URL).\n\n"
    return (f"## How to load\n\n{where}```bash\n"
            f"tunepipe registry pull {ref} ./{ref.replace('@', '-')} --registry {url} --with-base\n"
            f'tunepipe generate {ref} --registry {url} --prompt "Hello"\n```\n\n'
            f"```python\nfrom pipeline.registry.loading import load_version\n\n"
            f'loaded = load_version({repr(url) if known else url}, "{ref}")\nloaded.model, loaded.tokenizer\n```')


def write_card(bundle: Path, *, model_name: str, version: str, metrics: dict, lineage: dict, config: dict,
               train_log: list[dict], train_stats: dict, base: dict | None, method: str) -> list[str]:
    """Write bundle/README.md and bundle/curves/*.png; return the relative paths written."""
    bundle, metrics, train_stats = Path(bundle), metrics or {}, train_stats or {}
    curves = write_curves(bundle, train_log or [], train_stats.get("validations") or [])
    meta = yaml.safe_dump(front_matter(model_name, metrics, config, base, method), sort_keys=False, allow_unicode=True)
    body = [summary(model_name, version, metrics, base, method), training(train_stats, config, method, curves),
            evaluation(metrics), generations(metrics), lineage_section(lineage), how_to_load(model_name, version, config)]
    (bundle / "README.md").write_text(f"---\n{meta}---\n\n" + "\n\n".join(body) + "\n", encoding="utf-8")
    return ["README.md", *curves]
