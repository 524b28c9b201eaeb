"""A static site of the registry, to open from disk: no server, no network, no script.

    tunepipe registry html --out site --registry registry       # then open site/index.html

    from pipeline.registry.site import write_site
    index = write_site("registry", Path("site"))                 # or an s3:// registry

`index.html` lists every model (versions, aliases, newest version and its headline metric);
`models/<model>/index.html` its versions (metrics, gate) and every move of each alias;
`models/<model>/versions/<version>/index.html` the model card (README.md) rendered, its curves
copied beside it, the evaluation and the file list (site_html.py writes the HTML).

The site is written whole into a folder beside `out` and renamed into place, so `out` is never
half-written. An `out` that a previous write_site made (it holds MARKER) is replaced; any other
non-empty folder is refused, since we never delete what we did not make. A version whose
manifest, metrics or card cannot be read, or whose bytes no longer match their sha256, is shown
as such (and named on stderr); it never stops the rest of the site.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import fsspec

from pipeline import artifacts
from pipeline.artifacts import MANIFEST, ArtifactError
from pipeline.registry import aliases
from pipeline.registry.names import RegistryError, check_name
from pipeline.registry.site_html import ModelView, VersionView, index_page, model_page, version_page

MARKER = ".tunepipe-site"
_MARKER_TEXT = "written by tunepipe registry html (pipeline/registry/site.py); replaced whole by the next write\n"

IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
"""Copied beside a version's page. Not .svg: an SVG opened on its own runs the script it holds."""
IMAGE_LIMIT = 8 << 20
CARD_LIMIT = 2 << 20
_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, OSError, ArtifactError, RecursionError)


class SiteError(RegistryError):
    pass


def write_site(registry: str, out: Path) -> Path:
    """Write a static site of `registry` into `out` (index.html, one page per model, one per version,
    curve images copied beside them); return the index path. Opens from disk (file://): relative
    links only, no network, no JS needed."""
    out = Path(os.path.abspath(out))  # normalised, but a link at `out` stays a link (refused below)
    if not artifacts.is_remote(registry) and Path(registry).resolve().is_relative_to(out.resolve()):
        raise SiteError(f"the registry {registry} is inside {out}: writing the site there would replace it; choose another --out")
    _refuse_foreign(out)  # before reading anything: fail fast
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.site-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        _write_pages(registry, staging)
        (staging / MARKER).write_text(_MARKER_TEXT)
        _put_in_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # ours; gone already once renamed into place
    return out / "index.html"


# ---------------------------------------------------------------- placing the site


def _ours(out: Path) -> bool:
    marker = out / MARKER
    try:
        return marker.is_file() and not marker.is_symlink() and marker.read_text() == _MARKER_TEXT
    except (OSError, UnicodeDecodeError):
        return False


def _refuse_foreign(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SiteError(f"{out} exists and is not a folder; choose another --out (nothing was changed)")
    if out.is_dir() and any(out.iterdir()) and not _ours(out):
        raise SiteError(f"{out} is not empty and was not written by `tunepipe registry html` (it has no {MARKER}); "
                        "choose another --out or empty it yourself (nothing was changed)")


def _put_in_place(staging: Path, out: Path) -> None:
    _refuse_foreign(out)  # again: someone may have written there while the pages were made
    if not _ours(out):
        try:
            os.rename(staging, out)  # onto nothing or an empty folder; a folder filled meanwhile fails
        except OSError as err:
            raise SiteError(f"{out} could not be written ({err}); nothing there was changed") from None
        return
    # Our previous site: aside, new one in, old one deleted. For an instant `out` is absent (a
    # reader gets "not found", never a mix); Linux's RENAME_EXCHANGE would close that gap but is
    # not reachable from the standard library.
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


# ---------------------------------------------------------------- reading the registry


def _warn(message: str) -> None:
    print(f"tunepipe: warning: {message}", file=sys.stderr)


def _committed(registry: str) -> dict[str, dict[str, str]]:
    """model -> version -> folder, for every folder holding a manifest (as store.list_versions)."""
    fs, root = artifacts.filesystem(registry)
    if not fs.exists(root):  # a mistyped path must not give an empty site that looks right
        raise SiteError(f"no registry at {registry} (nothing was written)")
    found: dict[str, dict[str, str]] = {}
    for manifest_path in sorted(fs.glob(artifacts.join(root, "*", "*", MANIFEST))):
        folder = manifest_path[: -len(MANIFEST) - 1]
        model, version = folder.split("/")[-2:]
        if model.startswith(".") or version.startswith("."):
            continue  # a publisher's staging folder
        try:
            check_name("model name", model)
            check_name("version", version)
        except RegistryError as err:
            _warn(f"skipping {folder}: {err}")
            continue
        found.setdefault(model, {})[version] = folder
    return found


def _read_version(fs: fsspec.AbstractFileSystem, folder: str, model: str, version: str, page_dir: Path) -> VersionView:
    """The version's manifest, metrics and card, each checked against its sha256; its images copied
    into `page_dir` at their paths in the version, so the card's `curves/loss.png` resolves."""
    view = VersionView(model, version)
    try:
        manifest = json.loads(fs.cat_file(artifacts.join(folder, MANIFEST)))
        files = {artifacts.safe_relative(rel, f"{folder}/{MANIFEST}"): entry for rel, entry in manifest["files"].items()}
        if not all(isinstance(f["bytes"], int) and isinstance(f["sha256"], str) for f in files.values()):
            raise ValueError("a file entry without an integer size and a sha256")
        root = artifacts.manifest_root(manifest)
        base = artifacts.join(folder, root) if root else folder
    except _UNREADABLE as err:
        view.unreadable = f"{type(err).__name__}: {err}"
        _warn(f"{model}@{version}: unreadable manifest ({view.unreadable}); shown as unreadable")
        return view
    created = manifest.get("created_unix")
    view.files = files
    view.created_unix = created if isinstance(created, (int, float)) and not isinstance(created, bool) else None

    def read(rel: str, limit: int) -> bytes | None:
        problem = None
        if files[rel]["bytes"] > limit:
            problem = f"{rel} is larger than the {limit >> 20} MiB this site shows; left out"
        else:
            try:
                data = fs.cat_file(artifacts.join(base, rel))
            except OSError as err:
                problem = f"{rel} is unreadable ({type(err).__name__}: {err})"
            else:
                if hashlib.sha256(data).hexdigest() == files[rel]["sha256"]:
                    return data
                problem = f"{rel} does not match its sha256 in the manifest (changed after publish); not shown"
        view.problems.append(problem)
        _warn(f"{model}@{version}: {problem}")
        return None

    if "metrics.json" in files and (raw := read("metrics.json", CARD_LIMIT)) is not None:
        try:
            view.metrics = json.loads(raw)
            if not isinstance(view.metrics, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as err:
            view.metrics = {}
            view.problems.append(f"metrics.json is unreadable ({type(err).__name__}: {err})")
            _warn(f"{model}@{version}: {view.problems[-1]}")
    if "README.md" in files and (raw := read("README.md", CARD_LIMIT)) is not None:
        try:
            view.card = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            view.problems.append(f"README.md is not UTF-8 text ({err})")
            _warn(f"{model}@{version}: {view.problems[-1]}")
    for rel in files:
        if rel.lower().endswith(IMAGES) and (data := read(rel, IMAGE_LIMIT)) is not None:
            target = artifacts.inside(page_dir, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            view.images.add(rel)
    return view


def _read_aliases(registry: str, model: str, view: ModelView) -> None:
    """Each alias's moves; a damaged record hides only its own alias (named as a problem)."""
    fs, path = artifacts.filesystem(artifacts.join(registry, model, aliases.ALIASES))
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return
    for name in names:
        try:
            moves = aliases.history(registry, model, name)
        except (*_UNREADABLE, RegistryError) as err:
            view.problems.append(f"alias {name!r} is unreadable ({type(err).__name__}: {err})")
            _warn(f"{model}: {view.problems[-1]}")
            continue
        if moves:
            view.history[name] = moves
            view.aliases[name] = str(moves[-1].version)


def _write_pages(registry: str, site: Path) -> None:
    fs, _ = artifacts.filesystem(registry)
    models = []
    for model, versions in sorted(_committed(registry).items()):
        views = []
        for version, folder in sorted(versions.items()):
            page_dir = site / "models" / model / "versions" / version
            page_dir.mkdir(parents=True)
            views.append(_read_version(fs, folder, model, version, page_dir))
        views.sort(key=lambda v: (v.created_unix or 0, v.version))
        m = ModelView(model, views)
        _read_aliases(registry, model, m)
        for v in views:
            (site / "models" / model / "versions" / v.version / "index.html").write_text(version_page(v, m.aliases_at(v.version)), encoding="utf-8")
        (site / "models" / model / "index.html").write_text(model_page(m), encoding="utf-8")
        models.append(m)
    (site / "index.html").write_text(index_page(registry, models), encoding="utf-8")
