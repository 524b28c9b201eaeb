"""Aliases and promotion: `latest` moved by publish, `production` moved only after a re-check,
every move kept, `MODEL@ALIAS` / `MODEL@VERSION` resolved by the registry commands; on a folder
and on S3."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from tiny import REPO, cli_command, write_tree

from pipeline.registry import aliases
from pipeline.registry import store as registry
from pipeline.registry.promote import PromotionRefused, gate_problems, promote
from pipeline.registry.store import RegistryError


def metrics(perplexity: float, passed: bool = True, threshold: float | None = 40.0) -> bytes:
    gate = {"passed": passed, "thresholds": {"max_perplexity": threshold} if threshold is not None else {},
            "failed": [] if passed else [f"perplexity {perplexity} is not <= evaluate.max_perplexity {threshold}"]}
    return json.dumps({"task": "causal_lm", "perplexity": perplexity, "gate": gate}).encode()


def publish(tmp_path: Path, reg: str, version: str, perplexity: float, passed: bool = True) -> str:
    bundle = write_tree(tmp_path / f"bundle-{version}", {"model/model.safetensors": version.encode() * 64,
                                                          "metrics.json": metrics(perplexity, passed)})
    url, _ = registry.publish_version(bundle, reg, "demo", version, {"v": version})
    return url


@pytest.fixture(params=["folder", "s3"])
def reg(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/registry"


def test_an_alias_moves_atomically_and_keeps_every_move(tmp_path, reg):
    publish(tmp_path, reg, "v1", 12.0)
    publish(tmp_path, reg, "v2", 10.0)
    assert aliases.target(reg, "demo", "production") is None
    first = aliases.move(reg, "demo", "production", "v1", reason="first")
    second = aliases.move(reg, "demo", "production", "v2", reason="better")
    assert (first.previous, second.previous) == (None, "v1")
    assert aliases.target(reg, "demo", "production") == "v2"
    assert [(m.version, m.previous, m.reason) for m in aliases.history(reg, "demo", "production")] == [
        ("v1", None, "first"), ("v2", "v1", "better")]
    assert aliases.resolve(reg, "demo@production") == ("demo", "v2")
    assert aliases.resolve(reg, "demo@v1") == ("demo", "v1")
    assert aliases.aliases_of(reg, "demo") == {"production": "v2"}
    # The alias records are not versions: the listing shows two versions, with the alias on v2.
    rows = registry.list_versions(reg)
    assert [(r["version"], r["aliases"]) for r in rows] == [("v1", []), ("v2", ["production"])]
    with pytest.raises(RegistryError, match="no version 'v9'"):
        aliases.move(reg, "demo", "production", "v9")
    with pytest.raises(RegistryError, match="no alias or version 'nope'"):
        aliases.resolve(reg, "demo@nope")
    assert aliases.target(reg, "demo", "production") == "v2"  # a refused move moved nothing


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 200])
def test_a_hostile_alias_name_is_refused(tmp_path, name):
    reg = str(tmp_path / "registry")
    publish(tmp_path, reg, "v1", 12.0)
    with pytest.raises(RegistryError, match="not a valid name"):
        aliases.move(reg, "demo", name, "v1")
    assert not (tmp_path / "x").exists() and sorted(p.name for p in (tmp_path / "registry" / "demo").iterdir()) == ["v1"]


def test_two_movers_at_once_both_land_in_the_history(tmp_path):
    reg = str(tmp_path / "registry")
    publish(tmp_path, reg, "v1", 12.0)
    publish(tmp_path, reg, "v2", 10.0)
    code = ("import sys; from pipeline.registry import aliases\n"
            "for i in range(40): aliases.move(sys.argv[1], 'demo', 'production', sys.argv[2])")
    procs = [subprocess.Popen([*cli_command()[:1], "-c", code, reg, v], cwd=REPO) for v in ("v1", "v2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    moves = aliases.history(reg, "demo", "production")
    assert len(moves) == 80 and {m.version for m in moves} == {"v1", "v2"}
    assert aliases.target(reg, "demo", "production") == moves[-1].version
    leftovers = [p.name for p in (tmp_path / "registry" / "demo" / ".aliases" / "production").iterdir() if not p.name.endswith(".json")]
    assert leftovers == []


def test_promote_rechecks_the_gate_and_the_files(tmp_path, reg):
    publish(tmp_path, reg, "good", 12.0)
    publish(tmp_path, reg, "failed-gate", 55.0, passed=False)
    with pytest.raises(PromotionRefused, match="evaluation gate did not pass"):
        promote(reg, "demo", "failed-gate", "production")
    with pytest.raises(PromotionRefused, match=r"perplexity 12 is not <= 10.0 \(--max\)"):
        promote(reg, "demo", "good", "production", maximums={"perplexity": 10.0})
    with pytest.raises(PromotionRefused, match=r"accuracy is None, not a number \(--min needs accuracy >= 0.9\)"):
        promote(reg, "demo", "good", "production", minimums={"accuracy": 0.9})
    assert aliases.target(reg, "demo", "production") is None
    move = promote(reg, "demo", "good", "production", maximums={"perplexity": 20.0})
    assert move.version == "good" and "perplexity<=20.0" in move.reason
    assert aliases.target(reg, "demo", "production") == "good"


def test_promote_refuses_a_version_whose_files_changed(tmp_path):
    reg = str(tmp_path / "registry")
    url = publish(tmp_path, reg, "good", 12.0)
    with open(Path(url) / "model" / "model.safetensors", "ab") as f:
        f.write(b"!")
    with pytest.raises(PromotionRefused, match="do not match its manifest"):
        promote(reg, "demo", "good", "production")
    assert aliases.target(reg, "demo", "production") is None


def test_a_non_finite_metric_fails_the_recheck():
    assert gate_problems(json.loads(metrics(math.nan)), {}, {}) == [
        "perplexity is nan, not a number (the publish gate needs perplexity <= 40.0)"]


def test_the_command_line_resolves_aliases(tmp_path):
    reg = str(tmp_path / "registry")
    publish(tmp_path, reg, "v1", 12.0)
    publish(tmp_path, reg, "v2", 30.0)

    def tunepipe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(cli_command("registry", *args, "--registry", reg), cwd=REPO, capture_output=True, text=True, timeout=120)

    done = tunepipe("alias", "demo", "v1", "staging")
    assert done.returncode == 0 and "staging -> v1" in done.stdout, done.stderr
    refused = tunepipe("promote", "demo@v2", "--to", "production", "--max", "perplexity=20")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "tunepipe: not promoting demo@v2 to 'production': perplexity 30 is not <= 20.0 (--max)"]
    assert tunepipe("promote", "demo@staging", "--to", "production", "--max", "perplexity=20").returncode == 0
    listed = tunepipe("list").stdout
    assert "production, staging" in listed or "staging, production" in listed
    assert tunepipe("verify", "demo@production").stdout.startswith("ok: ")
    assert tunepipe("pull", "demo@production", str(tmp_path / "copy")).returncode == 0
    assert (tmp_path / "copy" / "model" / "model.safetensors").read_bytes() == b"v1" * 64
    assert tunepipe("pull", "demo", "v2", str(tmp_path / "copy2")).returncode == 0  # the old form still works
    history = tunepipe("history", "demo", "production").stdout
    assert "v1" in history and "promote" in history
    bad = tunepipe("pull", "demo@nope", str(tmp_path / "copy3"))
    assert bad.returncode == 1 and "no alias or version 'nope'" in bad.stderr and not (tmp_path / "copy3").exists()
