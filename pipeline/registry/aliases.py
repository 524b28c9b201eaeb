"""Aliases: names that point at a version of a model (`latest`, `production`), moved atomically,
every move kept.

    <registry>/<model>/.aliases/<alias>/<20-digit ns>-<8 hex>.json    {"version", "moved_unix", "previous", "reason"}

A move writes one new record and never changes or deletes one, on a folder (O_EXCL create) or
on S3 (If-None-Match: *). The alias points where its newest record says (records sort by
their names, which begin with the time of the move), so a reader sees the old target or the
new one, never a half-written pointer, and the records are the history. Two movers at once
both succeed; the later one (by clock) is where the alias points, and both moves are in the
history. The folder's name starts with a dot, which no version name can, so an alias can never
be mistaken for a version.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline import artifacts
from pipeline.registry.names import RegistryError, check_name, version_url

ALIASES = ".aliases"
LATEST = "latest"
"""Moved by every publish to the version it published."""


@dataclass(frozen=True)
class Move:
    alias: str
    version: str
    moved_unix: float
    previous: str | None
    reason: str


def _alias_dir(registry: str, model: str, alias: str) -> str:
    return artifacts.join(registry, check_name("model name", model), ALIASES, check_name("alias", alias))


def history(registry: str, model: str, alias: str) -> list[Move]:
    """Every move of `alias`, oldest first."""
    fs, path = artifacts.filesystem(_alias_dir(registry, model, alias))
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    moves = []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        record = json.loads(fs.cat_file(f"{path}/{name}"))
        moves.append(Move(alias, record["version"], record["moved_unix"], record.get("previous"), record.get("reason", "")))
    return moves


def target(registry: str, model: str, alias: str) -> str | None:
    """The version `alias` points at now, or None if it was never set."""
    moves = history(registry, model, alias)
    return moves[-1].version if moves else None


def aliases_of(registry: str, model: str) -> dict[str, str]:
    """alias -> version, for every alias of `model`."""
    fs, path = artifacts.filesystem(artifacts.join(registry, check_name("model name", model), ALIASES))
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return {}
    found = {}
    for alias in names:
        version = target(registry, model, alias)
        if version is not None:
            found[alias] = version
    return found


def move(registry: str, model: str, alias: str, version: str, reason: str = "") -> Move:
    """Point `alias` at `version` (which must exist); returns the move, with the previous target."""
    if not artifacts.exists(artifacts.join(version_url(registry, model, version), artifacts.MANIFEST)):
        raise RegistryError(f"{model} has no version {version!r} under {registry}: nothing to point {alias!r} at")
    previous = target(registry, model, alias)
    now = time.time()
    record = {"version": version, "moved_unix": round(now, 6), "previous": previous, "reason": reason}
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    url = artifacts.join(_alias_dir(registry, model, alias), name)
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    if artifacts.is_remote(url):
        fs, path = artifacts.filesystem(url)
        fs.pipe_file(path, data, mode="create")
    else:
        os.makedirs(os.path.dirname(url), exist_ok=True)
        _create_exclusive(url, data)
    return Move(alias, version, record["moved_unix"], previous, reason)


def _create_exclusive(path: str, data: bytes) -> None:
    """Write a new file whole: to a private name, fsynced, then linked to `path` (fails if it
    exists), so a reader never lists a half-written record."""
    staging = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(staging, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(staging, path)
    finally:
        os.unlink(staging)


def resolve(registry: str, reference: str) -> tuple[str, str]:
    """`MODEL@ALIAS` or `MODEL@VERSION` -> (model, version). An alias wins over a version of
    the same name (aliases are chosen by people; versions are hashes)."""
    model, sep, name = reference.partition("@")
    if not sep or not model or not name:
        raise RegistryError(f"{reference!r}: expected MODEL@ALIAS or MODEL@VERSION, e.g. quickstart-gpt2@latest")
    version = target(registry, model, name)
    if version is not None:
        return model, version
    if artifacts.exists(artifacts.join(version_url(registry, model, name), artifacts.MANIFEST)):
        return model, name
    raise RegistryError(f"{reference}: {model} has no alias or version {name!r} under {registry}")


def summary(moves: list[Move]) -> list[dict[str, Any]]:
    return [m.__dict__ for m in moves]
