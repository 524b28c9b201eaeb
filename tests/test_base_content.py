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
from tiny import REPO

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
    build_tokenizer(ModelConfig(), TokenizeConfig(vocab_size=300), texts).save_pretrained(folder)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)


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


def hub_plan(cache: Path) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HUB_PLAN], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_a_new_commit_under_the_same_hub_id_retrains(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--tunepipe-test--tiny-gpt2"
    commits = ["1" * 40, "2" * 40]
    for seed, commit in enumerate(commits):
        save_base(repo / "snapshots" / commit, seed)
    (repo / "refs").mkdir()
    plans = []
    for commit in commits:
        (repo / "refs" / "main").write_text(commit)
        plans.append(hub_plan(cache))
    assert [p["content"] for p in plans] == [{"base": {"hub": "tunepipe-test/tiny-gpt2", "revision": c}} for c in commits]
    assert plans[0]["train"] != plans[1]["train"]
    assert hub_plan(cache)["train"] == plans[1]["train"]  # the same commit: the same key
