"""The model registry: immutable, verified versions, in a local folder and on S3."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest
from tiny import write_tree

from pipeline import artifacts
from pipeline.registry import store as registry
from pipeline.artifacts import MANIFEST
from pipeline.registry.store import RegistryError

BUNDLE = {
    "model/model.safetensors": bytes(range(256)) * 8,
    "model/config.json": b'{"n_layer": 2}',
    "tokenizer/tokenizer.json": b'{"vocab": {}}',
    "metrics.json": b'{"perplexity": 12.5}',
}
SOURCE = {"tokenize": "t1", "train": "r1", "evaluate": "e1"}


def read_tree(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, bytes]:
    root = root.rstrip("/")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def version_files(url: str) -> dict[str, bytes]:
    """A committed version's files by name, read where its manifest says they are."""
    fs, path = artifacts.filesystem(url)
    manifest = json.loads(fs.cat_file(artifacts.join(path, MANIFEST)))
    base = artifacts.join(path, manifest["root"]) if manifest.get("root") else path
    return {rel: fs.cat_file(artifacts.join(base, rel)) for rel in manifest["files"]}


def _publish_and_pull(tmp_path: Path, reg: str) -> None:
    url, written = registry.publish_version(write_tree(tmp_path / "bundle", BUNDLE), reg, "demo", "v1", SOURCE)

    assert (url, written) == (registry.version_url(reg, "demo", "v1"), True)
    manifest = artifacts.read_json(artifacts.join(url, MANIFEST))
    assert manifest["files"] == {
        rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for rel, data in BUNDLE.items()
    }
    assert (manifest["model_name"], manifest["version"], manifest["source"]) == ("demo", "v1", SOURCE)
    assert artifacts.verify(url) == []

    [row] = registry.list_versions(reg)
    assert (row["model"], row["version"], row["files"], row["perplexity"]) == ("demo", "v1", 4, 12.5)
    assert row["bytes"] == sum(len(d) for d in BUNDLE.values())
    assert row["url"] == url

    dest = registry.pull_version(reg, "demo", "v1", tmp_path / "pulled")
    assert dest == tmp_path / "pulled"
    pulled = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    pulled_manifest = json.loads(pulled.pop(MANIFEST))
    assert pulled_manifest == {k: v for k, v in manifest.items() if k != "root"}  # the copy's files sit beside it
    assert pulled == BUNDLE == version_files(url)


def _immutability(tmp_path: Path, reg: str) -> None:
    bundle = write_tree(tmp_path / "bundle", BUNDLE)
    url, _ = registry.publish_version(bundle, reg, "demo", "v1", SOURCE)
    fs, path = artifacts.filesystem(url)
    before = read_tree(fs, path)

    # The same source again: nothing to do, nothing rewritten.
    assert registry.publish_version(bundle, reg, "demo", "v1", dict(SOURCE)) == (url, False)
    assert read_tree(fs, path) == before

    # Different content under the same label: refused, and the version keeps its bytes.
    other = write_tree(tmp_path / "other", {**BUNDLE, "model/model.safetensors": b"different weights"})
    with pytest.raises(RegistryError, match=r"demo version v1 already exists.*immutable"):
        registry.publish_version(other, reg, "demo", "v1", {**SOURCE, "train": "r2"})
    assert read_tree(fs, path) == before
    assert artifacts.verify(url) == []

    # A new label is fine.
    url2, written = registry.publish_version(other, reg, "demo", "v2", {**SOURCE, "train": "r2"})
    assert written and [r["version"] for r in registry.list_versions(reg)] == ["v1", "v2"]
    assert version_files(url2)["model/model.safetensors"] == b"different weights"


def _a_folder_it_did_not_create_is_left_alone(tmp_path: Path, reg: str) -> None:
    """Files at a version's place without a manifest (a crashed older publish, a hand-made folder)
    are not a version, are not listed, and are never deleted by a publisher."""
    url = registry.version_url(reg, "demo", "v1")
    fs, path = artifacts.filesystem(url)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(artifacts.join(path, "half-written.bin"), b"someone else's")
    assert registry.list_versions(reg) == []

    if artifacts.is_remote(reg):  # the upload goes beside it; the conditional manifest commits it
        assert registry.publish_version(write_tree(tmp_path / "bundle", BUNDLE), reg, "demo", "v1", SOURCE) == (url, True)
        assert artifacts.verify(url) == [] and version_files(url) == BUNDLE
    else:  # rename onto a non-empty folder fails: refused, naming it
        with pytest.raises(RegistryError, match="holds no manifest.json.*Nothing was deleted"):
            registry.publish_version(write_tree(tmp_path / "bundle", BUNDLE), reg, "demo", "v1", SOURCE)
    assert fs.cat_file(artifacts.join(path, "half-written.bin")) == b"someone else's"
    assert [p for p in fs.ls(artifacts.join(reg, "demo"), detail=False) if ".staging" in p] == []


def _tampering_is_caught(tmp_path: Path, reg: str) -> None:
    url, _ = registry.publish_version(write_tree(tmp_path / "bundle", BUNDLE), reg, "demo", "v1", SOURCE)
    fs, path = artifacts.filesystem(url)
    manifest = json.loads(fs.cat_file(artifacts.join(path, MANIFEST)))
    base = artifacts.join(path, manifest["root"]) if manifest.get("root") else path
    fs.pipe_file(artifacts.join(base, "metrics.json"), b'{"perplexity": 1.0}')

    assert artifacts.verify(url) == ["metrics.json: sha256 mismatch"]
    with pytest.raises(RegistryError, match="metrics.json: sha256 mismatch"):
        registry.pull_version(reg, "demo", "v1", tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


SCENARIOS = [_publish_and_pull, _immutability, _a_folder_it_did_not_create_is_left_alone, _tampering_is_caught]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.strip("_"))
def test_local_registry(scenario, tmp_path):
    scenario(tmp_path, str(tmp_path / "registry"))


@pytest.mark.integration
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.strip("_"))
def test_s3_registry(scenario, tmp_path, s3_bucket):
    scenario(tmp_path, f"s3://{s3_bucket}/registry")


def test_listing_an_absent_registry_is_empty(tmp_path):
    assert registry.list_versions(str(tmp_path / "nothing")) == []


def test_pull_refuses_a_non_empty_destination_and_fills_an_empty_one(tmp_path):
    reg = str(tmp_path / "registry")
    registry.publish_version(write_tree(tmp_path / "bundle", BUNDLE), reg, "demo", "v1", SOURCE)
    dest = tmp_path / "pulled"
    (dest / "model").mkdir(parents=True)
    (dest / "model" / "mine.bin").write_bytes(b"the user's")

    with pytest.raises(RegistryError, match="is not an empty folder"):
        registry.pull_version(reg, "demo", "v1", dest)
    assert (dest / "model" / "mine.bin").read_bytes() == b"the user's"
    with pytest.raises(RegistryError, match="is not an empty folder"):
        registry.pull_version(reg, "demo", "v1", tmp_path)  # `registry pull m v .` must not wipe the folder

    empty = tmp_path / "empty"
    empty.mkdir()
    registry.pull_version(reg, "demo", "v1", empty)
    assert artifacts.verify(str(empty)) == []
    assert [p.name for p in tmp_path.iterdir() if "pulling" in p.name] == []
