"""A pretrained base's bytes key the train stage (pipeline/train/fingerprint.py): weights re-saved
into the same folder, or a new commit under the same hub id, retrain; the same bytes do not. The
hub path runs offline on a hub cache built here (HF_HUB_OFFLINE=1), as a user's machine holds it.
Remembered digests (pipeline/file_digests.py) never stand in for bytes that changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import REPO, cli_args, cli_command, summary_of

from pipeline import file_digests
from pipeline.config import build_config
from pipeline.stages import plan

DATA = str(REPO / "examples" / "data" / "support.csv")


def save_base(folder: Path, seed: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.config import ModelConfig, TokenizeConfig
    from pipeline.data.text_tokenizer import build_tokenizer

    texts = (REPO / "examples" / "data" / "support.csv").read_text().splitlines()[:200]
    tokenizer = build_tokenizer(ModelConfig(), TokenizeConfig(vocab_size=300), texts)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)


def train_fingerprint(name: str) -> str:
    cfg = build_config(None, [f"data.source={DATA}", "model.init=pretrained", f"model.name={name}", "train.method=lora"])
    return plan(cfg, "train")["train"]


def test_a_local_base_re_saved_with_other_weights_retrains_and_the_same_bytes_do_not(tmp_path):
    base = tmp_path / "base"
    save_base(base, seed=0)
    first = train_fingerprint(str(base))
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights)  # the same bytes, a new mtime
    assert train_fingerprint(str(base)) == first
    save_base(base, seed=1)  # other weights, same names and sizes
    assert (base / "model.safetensors").stat().st_size == len(weights)
    assert train_fingerprint(str(base)) != first


def test_a_remembered_digest_is_used_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv(file_digests.CACHE_ENV, str(tmp_path / "digests"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    fresh = file_digests.remembered_sha256(path)
    assert not (tmp_path / "digests").exists()  # written just now: not remembered (racy)
    old = time.time() - 60
    os.utime(path, (old, old))
    assert file_digests.remembered_sha256(path) == fresh
    hashed = []
    monkeypatch.setattr(file_digests, "sha256_file", lambda p: hashed.append(p) or "recomputed")
    assert file_digests.remembered_sha256(path) == fresh and hashed == []  # remembered: not read again
    path.write_bytes(b"b" * 1000)  # same size, new mtime
    os.utime(path, (old + 1, old + 1))
    assert file_digests.remembered_sha256(path) == "recomputed" and hashed == [path.resolve()]
    [record] = (tmp_path / "digests").rglob("*.json")
    record.write_text("{not json")  # a damaged record is a missed shortcut, never an error
    assert file_digests.remembered_sha256(path) == "recomputed"


HUB_PLAN = """
import json, sys
from pipeline.config import build_config
from pipeline.stages import plan
from pipeline.train.fingerprint import pretrained_base_content
cfg = build_config(None, ["data.source=%s", "model.init=pretrained", "model.name=tunepipe-test/tiny-gpt2", "train.method=lora"])
print(json.dumps({"train": plan(cfg, "train")["train"], "content": pretrained_base_content(cfg.model)}))
""" % DATA


def offline(cache: Path, **extra: str) -> dict:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def hub_cache(tmp_path: Path, commits: list[str]) -> Path:
    """A hub cache as huggingface_hub lays it out, holding tunepipe-test/tiny-gpt2 at `commits`,
    main at the last."""
    cache = tmp_path / "hub"
    repo = cache / "models--tunepipe-test--tiny-gpt2"
    for seed, commit in enumerate(commits):
        save_base(repo / "snapshots" / commit, seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[-1])
    return cache


def hub_plan(cache: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", HUB_PLAN], cwd=REPO, env=offline(cache), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_a_new_commit_under_the_same_hub_id_retrains(tmp_path):
    commits = ["1" * 40, "2" * 40]
    cache = hub_cache(tmp_path, commits)
    plans = []
    for commit in commits:
        (cache / "models--tunepipe-test--tiny-gpt2" / "refs" / "main").write_text(commit)
        plans.append(hub_plan(cache))
    assert [p["content"] for p in plans] == [{"base": {"hub": "tunepipe-test/tiny-gpt2", "revision": c}} for c in commits]
    assert plans[0]["train"] != plans[1]["train"]
    assert hub_plan(cache)["train"] == plans[1]["train"]  # the same commit: the same key


@pytest.mark.integration
def test_an_adapter_on_a_hub_base_publishes_its_commit_and_generates_from_the_registry(tmp_path):
    """The hub path end to end, offline: LoRA on a hub id, published with base.json and an
    adapter_config.json naming the id and commit; then a process with the hub cache and the
    registry alone (no workdir, an empty registry cache) generates what the evaluate stage did."""
    commit = "3" * 40
    cache = hub_cache(tmp_path, [commit])
    registry = tmp_path / "registry"
    args = cli_args("stage", tmp_path / "runs", registry, "publish", **{
        "model.init": "pretrained", "model.name": "tunepipe-test/tiny-gpt2", "train.method": "lora", "train.max_steps": 10})
    proc = subprocess.run(cli_command(*args), cwd=REPO, env=offline(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {s["name"]: s["status"] for s in summary_of(proc)["stages"]}["publish"] == "ran"
    [version] = [p for p in (registry / "tiny").iterdir() if not p.name.startswith(".")]
    assert json.loads((version / "base.json").read_text()) == {"hub": "tunepipe-test/tiny-gpt2", "revision": commit}
    adapter_config = json.loads((version / "model" / "adapter_config.json").read_text())
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == ("tunepipe-test/tiny-gpt2", commit)
    lineage = json.loads((version / "lineage.json").read_text())
    assert lineage["train"]["content"]["base"] == {"hub": "tunepipe-test/tiny-gpt2", "revision": commit}

    sample = json.loads((version / "metrics.json").read_text())["generations"][0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    generated = subprocess.run(
        cli_command("generate", "tiny@latest", "--registry", str(registry), "--raw", "--prompt", sample["prompt"], "--max-new-tokens", "8"),
        cwd=elsewhere, env=offline(cache, TUNEPIPE_REGISTRY_CACHE=str(tmp_path / "empty-cache")), capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout == sample["tuned"] + "\n", (generated.stdout, sample)
