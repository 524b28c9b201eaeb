"""The HTML of the registry site (registry/site.py): the index, a model's page, a version's page,
and a model card (README.md) rendered from markdown.

    html = version_page(VersionView("demo", "v3", card=readme_text, images={"curves/loss.png"}), ["production"])

Every value read from the registry is data, not markup: metrics, card text, generations and
front matter are HTML-escaped, and the card is rendered with markdown-it's `html` off, so a
`<script>` line in a card is shown as text. Each page also carries a Content-Security-Policy
that allows no script and no fetch beyond its own folder tree, so a page opened from disk
makes no network request even if a card names a remote image (those are shown as text).
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, unquote

import yaml
from markdown_it import MarkdownIt

METRICS = ("perplexity", "accuracy", "macro_f1", "rouge_l", "eval_loss")
"""Columns of a model's version table, where any of its versions has them (metrics.json)."""

HEADLINE = ("perplexity", "accuracy", "rouge_l")
"""The one number shown for a version in listings: the first its task has (as `registry list`)."""

_CSP = "default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'"

_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 72rem; margin: 1.5rem auto; padding: 0 1rem; color: #1d2330; }
nav { font-size: 0.9rem; margin-bottom: 1rem; } nav a { color: #3557a6; }
h1 { font-size: 1.6rem; margin: 0.2rem 0 1rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #dde; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.92rem; }
th, td { border: 1px solid #d5d8e0; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f4f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 0.85rem/1.4 ui-monospace, monospace; } pre { background: #f6f7f9; padding: 0.6rem; overflow-x: auto; white-space: pre-wrap; }
.alias { display: inline-block; background: #e8eefc; border-radius: 0.6rem; padding: 0 0.45rem; margin-right: 0.2rem; font-size: 0.85rem; }
.ok { color: #17753a; } .bad, .problem { color: #b3261e; } .muted { color: #6b7280; }
.card { border: 1px solid #dde; border-radius: 0.4rem; padding: 0.2rem 1.2rem; } .card img { max-width: 100%; }
"""


def e(value: Any) -> str:
    """Text from the registry, safe in HTML text and in quoted attributes."""
    return html.escape(str(value), quote=True)


def href(*parts: str) -> str:
    """A relative link (names are checked names, but quoting costs nothing)."""
    return "/".join(quote(p) for p in parts)


def utc(unix: Any) -> str:
    if not isinstance(unix, (int, float)) or isinstance(unix, bool) or not math.isfinite(unix):
        return "—"
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def size(n: Any) -> str:
    if not isinstance(n, int):
        return "—"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def value(v: Any, limit: int = 400) -> str:
    """A metric or field, escaped: numbers to 4 significant digits, structures as short JSON."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        v = brief(v, limit)
    text = str(v)
    return e(text if len(text) <= limit else text[:limit] + "…")


def brief(v: Any, limit: int = 400) -> str:
    """Compact JSON of `v`, cut at `limit` characters while it is written: YAML aliases can make a
    small front matter stand for an exponentially large structure ("billion laughs")."""
    out: list[str] = []
    budget = [limit]

    def emit(s: str) -> None:
        out.append(s)
        budget[0] -= len(s)
        if budget[0] <= 0:
            raise StopIteration

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            emit("{")
            for i, (k, y) in enumerate(x.items()):
                emit(("" if i == 0 else ", ") + f"{k}: ")
                walk(y)
            emit("}")
        elif isinstance(x, list):
            emit("[")
            for i, y in enumerate(x):
                emit("" if i == 0 else ", ")
                walk(y)
            emit("]")
        else:
            emit(json.dumps(x, default=str, ensure_ascii=False) if not isinstance(x, str) else x)

    try:
        walk(v)
    except (StopIteration, RecursionError):
        return "".join(out)[:limit] + "…"
    return "".join(out)


def headline(metrics: dict) -> str:
    for k in HEADLINE:
        v = metrics.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{k} {v:.4g}"
    return ""


def gate(metrics: dict) -> str:
    g = metrics.get("gate")
    if not isinstance(g, dict) or "passed" not in g:
        return '<span class="muted">—</span>'
    return '<span class="ok">passed</span>' if g["passed"] is True else '<span class="bad">failed</span>'


def alias_badges(names: list[str]) -> str:
    return " ".join(f'<span class="alias">{e(a)}</span>' for a in names)


def page(title: str, crumbs: list[tuple[str, str | None]], body: str) -> str:
    nav = " / ".join(f'<a href="{h}">{e(t)}</a>' if h else e(t) for t, h in crumbs)
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are HTML already (escape values with e() / value() first)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>\n"
        for row in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


# ---------------------------------------------------------------- model cards

_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", re.S | re.M)


def split_front_matter(text: str) -> tuple[str | None, str]:
    """(the YAML between the leading `---` lines or None, the markdown after it)."""
    m = _FRONT_MATTER.match(text)
    return (m.group(1), text[m.end():]) if m else (None, text)


def front_matter_table(raw: str) -> str:
    try:
        meta = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as err:  # PyYAML recurses once per nesting level
        return f'<p class="problem">Front matter is not valid YAML ({e(type(err).__name__)}); shown as text:</p><pre>{e(raw)}</pre>'
    if meta is None:
        return ""
    if not isinstance(meta, dict):
        return f'<p class="problem">Front matter is not a mapping; shown as text:</p><pre>{e(raw)}</pre>'
    rows = [[e(k), value(", ".join(map(str, v)) if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v) else v)]
            for k, v in meta.items()]
    return table(["card field", "value"], rows)


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])

    def image(self, tokens, idx, options, env):
        token = tokens[idx]
        src = unquote(token.attrGet("src") or "").removeprefix("./")
        if src in env["images"]:
            token.attrSet("src", href(*src.split("/")))
            return self.image(tokens, idx, options, env)  # the default rule, now with a local src
        alt = self.renderInlineAsText(token.children or [], options, env)
        return f'<span class="problem">[image not in this version: {e(alt or src)}]</span>'

    md.add_render_rule("image", image)
    return md


def render_card(text: str, images: set[str]) -> str:
    """The card's front matter as a table, then its markdown as HTML; an image is shown only when
    it is one of `images` (files copied beside the page), anything else is named as text."""
    raw, markdown = split_front_matter(text)
    meta = front_matter_table(raw) if raw is not None else ""
    return meta + '\n<div class="card">\n' + _markdown().render(markdown, {"images": images}) + "</div>"


# ---------------------------------------------------------------- pages
# The site's layout: index.html, models/<model>/index.html, models/<model>/versions/<version>/index.html.
# Models and versions sit under fixed folders so that no name (a model called "index.html") can
# land on a page's path.


def model_href(model: str) -> str:
    return href("models", model, "index.html")


def version_href(model: str, version: str) -> str:
    return href("models", model, "versions", version, "index.html")


@dataclass
class VersionView:
    """What a version page shows: read from the registry by site.py."""

    model: str
    version: str
    created_unix: Any = None
    files: dict[str, dict] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    card: str | None = None
    images: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    unreadable: str | None = None
    """Why the manifest could not be read; the version then shows nothing else."""

    @property
    def total_bytes(self) -> int | None:
        return sum(f.get("bytes", 0) for f in self.files.values()) if not self.unreadable else None


@dataclass
class ModelView:
    name: str
    versions: list[VersionView]
    """Oldest first (by created_unix, then name)."""
    aliases: dict[str, str] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)
    """alias -> aliases.Move, oldest first."""
    problems: list[str] = field(default_factory=list)

    def newest(self) -> VersionView | None:
        readable = [v for v in self.versions if not v.unreadable]
        return readable[-1] if readable else None

    def aliases_at(self, version: str) -> list[str]:
        return sorted(a for a, v in self.aliases.items() if v == version)


def _problems(problems: list[str]) -> str:
    return "".join(f'<p class="problem">{e(p)}</p>\n' for p in problems)


def index_page(registry: str, models: list[ModelView]) -> str:
    rows = []
    for m in models:
        newest = m.newest()
        known = {v.version for v in m.versions}  # an alias may outlive its version's folder
        aliases = "<br>".join(f'<span class="alias">{e(a)}</span> → '
                              + (f'<a href="{version_href(m.name, v)}">{e(v)}</a>' if v in known else f'{e(v)} <span class="problem">(missing)</span>')
                              for a, v in sorted(m.aliases.items()))
        rows.append([
            f'<a href="{model_href(m.name)}">{e(m.name)}</a>', str(len(m.versions)), aliases or '<span class="muted">—</span>',
            f'<a href="{version_href(m.name, newest.version)}">{e(newest.version)}</a> <span class="muted">{e(utc(newest.created_unix))}</span>'
            if newest else '<span class="muted">—</span>',
            e(headline(newest.metrics)) if newest else "",
        ])
    count = sum(len(m.versions) for m in models)
    body = (f"<h1>Model registry</h1>\n<p>{len(models)} models, {count} versions, from <code>{e(registry)}</code>.</p>\n"
            + (table(["model", "versions", "aliases", "newest version", "headline metric"], rows, {1}) if models else "<p>No versions yet.</p>"))
    return page("Model registry", [("registry", None)], body)


def model_page(m: ModelView) -> str:
    shown = [k for k in METRICS if any(k in v.metrics for v in m.versions)]
    rows = []
    for v in reversed(m.versions):  # newest first
        link = f'<a href="{href("versions", v.version, "index.html")}">{e(v.version)}</a>'
        if v.unreadable:
            rows.append([link, '<span class="problem">unreadable manifest</span>', "", "", ""] + [""] * len(shown) + [""])
            continue
        rows.append([link, e(utc(v.created_unix)), alias_badges(m.aliases_at(v.version)), e(size(v.total_bytes)), str(len(v.files))]
                    + [value(v.metrics.get(k)) for k in shown] + [gate(v.metrics)])
    n = len(shown)
    body = [f"<h1>{e(m.name)}</h1>", _problems(m.problems), "<h2>Versions</h2>",
            table(["version", "created", "aliases", "size", "files", *shown, "gate"], rows, {3, 4, *range(5, 5 + n)})]
    body.append("<h2>Aliases</h2>")
    if not m.history:
        body.append('<p class="muted">No aliases.</p>')
    for alias, moves in sorted(m.history.items()):
        body.append(f'<h3><span class="alias">{e(alias)}</span> → {e(m.aliases.get(alias, "—"))}</h3>')
        body.append(table(["when", "from", "to", "why"], [
            [e(utc(mv.moved_unix)), e(mv.previous) if mv.previous else '<span class="muted">—</span>', e(mv.version), e(mv.reason)]
            for mv in moves]))
    return page(m.name, [("registry", "../../index.html"), (m.name, None)], "\n".join(body))


def version_page(v: VersionView, aliases_here: list[str]) -> str:
    crumbs = [("registry", "../../../../index.html"), (v.model, "../../index.html"), (v.version, None)]
    body = [f"<h1>{e(v.model)} <span class=\"muted\">@</span> {e(v.version)} {alias_badges(aliases_here)}</h1>"]
    if v.unreadable:
        body.append(f'<p class="problem">This version\'s manifest is unreadable: {e(v.unreadable)}</p>')
        return page(f"{v.model}@{v.version}", crumbs, "\n".join(body))
    body.append(_problems(v.problems))
    body.append(f"<p>Created {e(utc(v.created_unix))}; {len(v.files)} files, {e(size(v.total_bytes))}; gate {gate(v.metrics)}.</p>")
    body.append("<h2>Model card</h2>")
    if v.card is not None:
        body.append(render_card(v.card, v.images))
    elif "README.md" in v.files:
        body.append('<p class="problem">README.md is unreadable (see above).</p>')
    else:
        body.append('<p class="muted">This version has no model card (README.md).</p>')
    # Curves the card does not show (or every image, without a card) still belong on the page.
    loose = sorted(rel for rel in v.images if v.card is None or rel not in v.card)
    if loose:
        body.append("<h2>Curves</h2>")
        body += [f'<figure><img src="{href(*rel.split("/"))}" alt="{e(rel)}"><figcaption><code>{e(rel)}</code></figcaption></figure>' for rel in loose]
    body.append(_evaluation(v.metrics))
    body.append("<h2>Files</h2>")
    body.append(table(["path", "size", "sha256"], [
        [f"<code>{e(rel)}</code>", e(size(f.get("bytes"))), f"<code>{e(str(f.get('sha256', ''))[:12])}</code>"]
        for rel, f in sorted(v.files.items())], {1}))
    return page(f"{v.model}@{v.version}", crumbs, "\n".join(body))


def _evaluation(metrics: dict) -> str:
    if not metrics:
        return '<h2>Metrics (metrics.json)</h2>\n<p class="muted">No metrics.json.</p>'
    out = ["<h2>Metrics (metrics.json)</h2>"]
    scalars = [[e(k), value(v)] for k, v in metrics.items() if not isinstance(v, (dict, list))]
    out.append(table(["metric", "value"], scalars, {1}))
    g = metrics.get("gate")
    if isinstance(g, dict):
        out.append(f"<p>Gate: {gate(metrics)}; thresholds {value(g.get('thresholds') or {})}.</p>")
        failed = g.get("failed")
        out += [f'<p class="bad">{e(line)}</p>' for line in failed] if isinstance(failed, list) else []
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class:
        out.append("<h3>Per class</h3>")
        out.append(_records([{"class": k, **(c if isinstance(c, dict) else {"counts": c})} for k, c in per_class.items()]))
    for key, title in (("generations", "Generations"), ("examples_shown", "Examples")):
        if isinstance(metrics.get(key), list) and metrics[key]:
            out.append(f"<h3>{title}</h3>")
            out.append(_records(metrics[key]))
    return "\n".join(out)


def _records(records: list) -> str:
    """A list of dicts (generations, examples) as a table, one column per key; texts in <pre>."""
    rows = [r if isinstance(r, dict) else {"value": r} for r in records]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[f"<pre>{value(r.get(k), limit=4000)}</pre>" if isinstance(r.get(k), str) else value(r.get(k)) for k in keys] for r in rows]
    return table([str(k) for k in keys], cells)
