"""The `tunepipe` command line: config errors before work, one stage at a time, the registry."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from tiny import QUICKSTART, REPO, cli_args, cli_command, read_rejects, write_tree

from pipeline import cli


@pytest.mark.parametrize(
    "override, named",
    [("train.lr=abc", "train.lr"), ("train.lrr=1", "train.lrr"), ("trian.lr=1", "trian.lr"), ("sample.fraction=2", "sample.fraction")],
)
def test_bad_config_fails_before_any_stage_naming_the_key(tmp_path, override, named):
    workdir = tmp_path / "runs"
    proc = subprocess.run(
        cli_command("run", str(QUICKSTART), "--workdir", str(workdir), "--set", override),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert named in proc.stderr
    assert not workdir.exists(), "a stage wrote output despite the bad config"


def test_stage_ingest_counts_rejects_of_a_malformed_csv(tmp_path, capsys):
    source = tmp_path / "pairs.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        for i in range(1000):
            writer.writerow([f"question {i}, with a comma", f"answer {i}\non two lines"])
    lines = source.read_text().splitlines(keepends=True)
    # Three broken records: a row with too many fields, one with too few, one with an empty response.
    # Inserted from the back so each index still falls between two records.
    lines.insert(901, "question,\n")
    lines.insert(501, "lonely field\n")
    lines.insert(101, "extra,fields,here\n")
    source.write_text("".join(lines))

    code = cli.main(["stage", "ingest", "--workdir", str(tmp_path / "runs"), "--set", f"data.source={source}"])
    assert code == 0
    summary = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    stats = summary["stages"][0]["stats"]
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    assert (stats["rows_out"], stats["rows_rejected"]) == (1000, 3)
    # Each at its physical line: the header is line 1 and every record spans two lines.
    assert [(r["line"], r["reason"]) for r in read_rejects(summary["stages"][0]["output"])] == [
        (102, "expected 2 fields, got 3"), (503, "expected 2 fields, got 1"), (904, "'response' is empty"),
    ]
    assert {r["file"] for r in read_rejects(summary["stages"][0]["output"])} == {str(source)}


def test_config_keys_lists_every_documented_key(capsys):
    assert cli.main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("data.source", "model.name", "train.seed", "train.lr", "train.max_steps", "train.save_every_steps", "train.nproc_per_node", "registry.url"):
        assert f"\n{key} = " in "\n" + out


@pytest.mark.integration
def test_pretrained_model_from_a_local_folder(tmp_path, capsys):
    """`model.init: pretrained` loads weights and tokenizer the way a hub id would, from a folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.config import ModelConfig, TokenizeConfig
    from pipeline.data.text_tokenizer import build_tokenizer

    folder = tmp_path / "base-model"
    texts = [line for line in (REPO / "examples" / "data" / "support.csv").read_text().splitlines()[:400]]
    tokenizer = build_tokenizer(ModelConfig(), TokenizeConfig(vocab_size=300), texts)
    tokenizer.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)

    args = cli_args("stage", tmp_path / "runs", tmp_path / "reg", "evaluate", **{"model.init": "pretrained", "model.name": str(folder), "train.max_steps": 4})
    assert cli.main(args) == 0
    summary = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    evaluate = summary["stages"][-1]
    metrics = json.loads((Path(evaluate["output"]) / "metrics.json").read_text())
    assert metrics["generations"] and "base" in metrics["generations"][0] and "tuned" in metrics["generations"][0]
    tokenize = next(s for s in summary["stages"] if s["name"] == "tokenize")
    saved = json.loads((Path(tokenize["output"]) / "tokenizer" / "tokenizer.json").read_text())
    assert saved["model"]["vocab"] == json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def test_registry_list_and_verify_from_the_command_line(tmp_path, capsys):
    from pipeline.registry.store import publish_version

    bundle = write_tree(tmp_path / "bundle", {"model/weights.bin": b"\x00" * 1000, "metrics.json": b'{"perplexity": 3.25}'})
    publish_version(bundle, str(tmp_path / "reg"), "demo", "v1", {"train": "abc"})

    assert cli.main(["registry", "list", "--registry", str(tmp_path / "reg")]) == 0
    listing = capsys.readouterr().out
    assert "demo" in listing and "v1" in listing and "perplexity 3.25" in listing
    assert cli.main(["registry", "verify", "demo", "v1", "--registry", str(tmp_path / "reg")]) == 0
    (tmp_path / "reg" / "demo" / "v1" / "model" / "weights.bin").write_bytes(b"\x01" * 1000)
    assert cli.main(["registry", "verify", "demo", "v1", "--registry", str(tmp_path / "reg")]) == 1
    assert "model/weights.bin: sha256 mismatch" in capsys.readouterr().out
