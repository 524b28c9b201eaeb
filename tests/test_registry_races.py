"""The registry under attack: racing publishers, broken manifests, hostile names and paths.

Publishers are real processes started together, on a folder and on a loopback S3 endpoint; a
version must be one publisher's bytes, whole, and every other publisher must be told."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import REPO, cli_command, write_tree

from pipeline import artifacts
from pipeline.artifacts import MANIFEST, ArtifactError
from pipeline.registry import store
from pipeline.registry.store import RegistryError, VersionExists

PUBLISHERS, TRIALS = 6, 4

# Each publisher process: for every trial, wait for the common start time, then publish its own
# bundle (or, with --same, everyone's identical one) as version t<trial>.
PUBLISHER = r'''
import json, sys, time
from pathlib import Path
from pipeline.registry.store import VersionExists, publish_version
registry, me, start, interval, trials, same, bundles = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "same", Path(sys.argv[7])
for trial in range(trials):
    time.sleep(max(0.0, start + trial * interval - time.time()))
    who = 0 if same else me
    try:
        url, written = publish_version(bundles / str(who), registry, "raced", f"t{trial}", {"publisher": who})
        print(json.dumps({"trial": trial, "written": written}), flush=True)
    except VersionExists:
        print(json.dumps({"trial": trial, "exists": True}), flush=True)
'''


def bundle(i: int) -> dict[str, bytes]:
    # Big enough that uploads overlap in time; every file differs between publishers.
    return {"model/weights.bin": bytes([i]) * 300_000, "model/config.json": f'{{"publisher": {i}}}'.encode(),
            "metrics.json": f'{{"perplexity": {i + 1}}}'.encode()}


def race(tmp_path: Path, registry: str, same: bool, interval: float) -> list[list[dict]]:
    bundles = tmp_path / "bundles"
    for i in range(PUBLISHERS):
        write_tree(bundles / str(i), bundle(i))
    start = time.time() + 8.0  # every interpreter has started by then
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, registry, str(i), str(start), str(interval), str(TRIALS),
                               "same" if same else "own", str(bundles)], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(PUBLISHERS)]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outcomes.append([json.loads(line) for line in out.splitlines()])
    return [[outcomes[p][t] for p in range(PUBLISHERS)] for t in range(TRIALS)]


def check_races(tmp_path: Path, registry: str, interval: float) -> None:
    for trial, results in enumerate(race(tmp_path, registry, same=False, interval=interval)):
        winners = [p for p, r in enumerate(results) if r.get("written")]
        assert len(winners) == 1 and sum(bool(r.get("exists")) for r in results) == PUBLISHERS - 1, results
        url = store.version_url(registry, "raced", f"t{trial}")
        assert artifacts.verify(url) == []
        manifest = artifacts.read_json(artifacts.join(url, MANIFEST))
        assert manifest["source"] == {"publisher": winners[0]}
        assert version_files(url) == bundle(winners[0])  # one publisher's bytes, never a mix
    fs, root = artifacts.filesystem(artifacts.join(registry, "raced"))
    leftovers = [p for p in fs.find(root) if ".staging" in p or (".uploads" in p and not _referenced(fs, p))]
    assert leftovers == []  # losers removed what they wrote, and only that
    assert [r["version"] for r in store.list_versions(registry)] == [f"t{t}" for t in range(TRIALS)]


def _referenced(fs, path: str) -> bool:
    version = path.split("/.uploads/")[0]
    manifest = json.loads(fs.cat_file(version + "/" + MANIFEST))
    return path.startswith(f"{version}/{manifest['root']}/")


def version_files(url: str) -> dict[str, bytes]:
    fs, path = artifacts.filesystem(url)
    manifest = json.loads(fs.cat_file(artifacts.join(path, MANIFEST)))
    base = artifacts.join(path, manifest["root"]) if manifest.get("root") else path
    return {rel: fs.cat_file(artifacts.join(base, rel)) for rel in manifest["files"]}


@pytest.mark.integration
def test_racing_publishers_on_a_folder_one_wins_each_time(tmp_path):
    check_races(tmp_path, str(tmp_path / "registry"), interval=1.0)


@pytest.mark.integration
def test_racing_publishers_on_s3_one_wins_each_time(tmp_path, s3_bucket):
    check_races(tmp_path, f"s3://{s3_bucket}/registry", interval=2.0)


@pytest.mark.integration
def test_publishers_of_the_same_content_all_succeed_and_one_writes(tmp_path):
    for results in race(tmp_path, str(tmp_path / "registry"), same=True, interval=1.0):
        assert sorted(r["written"] for r in results) == [False] * (PUBLISHERS - 1) + [True]


def test_a_broken_manifest_hides_only_its_version(tmp_path, capsys):
    reg = tmp_path / "registry"
    for version in ("v1", "v2"):
        store.publish_version(write_tree(tmp_path / version, bundle(1)), str(reg), "demo", version, {"v": version})
    (reg / "demo" / "v1" / MANIFEST).write_text('{"files": {"metrics.json": ')  # cut short
    rows = store.list_versions(str(reg))
    assert [r["version"] for r in rows] == ["v2"]
    err = capsys.readouterr().err
    assert err.count("skipping") == 1 and str(reg / "demo" / "v1" / MANIFEST) in err
    assert artifacts.verify(str(reg / "demo" / "v1"))[0].startswith(f"{reg / 'demo' / 'v1'}/{MANIFEST}: unreadable")


@pytest.mark.parametrize("model,version", [("../outside", "v1"), ("/abs", "v1"), ("m", ".."), ("m", "a/b"), (".hidden", "v1"), ("m", "")])
def test_hostile_names_are_refused_before_any_io(tmp_path, model, version):
    with pytest.raises(RegistryError, match="is not a valid name"):
        store.version_url(str(tmp_path / "registry"), model, version)
    with pytest.raises(RegistryError, match="is not a valid name"):
        store.publish_version(write_tree(tmp_path / "b", bundle(0)), str(tmp_path / "registry"), model, version, {})
    assert not (tmp_path / "registry").exists() and not (tmp_path / "outside").exists()


@pytest.mark.parametrize("rel", ["../../escaped.bin", "/tmp/escaped.bin", "model/../../escaped.bin"])
def test_a_manifest_naming_a_path_outside_is_refused_on_pull_and_download(tmp_path, rel):
    reg = tmp_path / "registry"
    url, _ = store.publish_version(write_tree(tmp_path / "b", bundle(0)), str(reg), "demo", "v1", {})
    manifest = json.loads((Path(url) / MANIFEST).read_text())
    manifest["files"][rel] = manifest["files"]["metrics.json"]
    (Path(url) / MANIFEST).write_text(json.dumps(manifest))

    assert any("unsafe path" in p or "unreadable" in p for p in artifacts.verify(url))
    with pytest.raises(RegistryError):
        store.pull_version(str(reg), "demo", "v1", tmp_path / "pulled")
    with pytest.raises(ArtifactError, match="unsafe path"):
        artifacts.inside(tmp_path / "pulled", rel)
    assert not (tmp_path / "escaped.bin").exists() and not Path("/tmp/escaped.bin").exists()
    assert not (tmp_path / "pulled").exists()


def test_push_publishes_a_folder_made_anywhere_from_the_command_line(tmp_path):
    folder = write_tree(tmp_path / "by-hand", bundle(3))
    reg = str(tmp_path / "registry")
    run = lambda *a: subprocess.run(cli_command("registry", *a), cwd=REPO, capture_output=True, text=True, timeout=120)  # noqa: E731

    first = run("push", str(folder), "handmade", "v1", "--registry", reg)
    again = run("push", str(folder), "handmade", "v1", "--registry", reg)
    (folder / "metrics.json").write_bytes(b'{"perplexity": 99}')
    changed = run("push", str(folder), "handmade", "v1", "--registry", reg)
    hostile = run("verify", "../outside", "v1", "--registry", reg)

    assert first.returncode == 0 and first.stdout.startswith("published: "), first.stderr
    assert again.returncode == 0 and again.stdout.startswith("already published, same content"), again.stderr
    assert changed.returncode == 1 and changed.stderr.strip().splitlines() == [
        f"tunepipe: handmade version v1 already exists at {reg}/handmade/v1 with different content; "
        "versions are immutable: publish under a new version (registry.version)"]
    assert hostile.returncode == 1 and "is not a valid name" in hostile.stderr and "Traceback" not in hostile.stderr
    assert artifacts.verify(f"{reg}/handmade/v1") == [] and version_files(f"{reg}/handmade/v1") == bundle(3)
