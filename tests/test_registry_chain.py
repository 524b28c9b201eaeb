"""The registry as users use it, end to end through the CLI: a language model fine-tuned and
published, promoted to production, then two adapters tuned on `registry://lm@production`; an
adapter on a scratch base; cards with curves; loading, exporting and generating from the
registry alone (a copy of it, offline, with an empty cache).

    python -m pytest -q tests/test_registry_chain.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import REPO, cli_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FRUIT = {"apple": "apple pie with apple sauce", "banana": "banana bread and banana split"}


def fruit_csv(path: Path, answer: str, rows: int = 120) -> Path:
    """Every question answered with one phrase: an adapter that learned it says it."""
    lines = ["prompt,response"] + [f"question number {i} about the shop,{answer}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def registry_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`tunepipe ARGS` in this process (the same main(), without a new interpreter's seconds of
    imports); it must exit 0. The offline and server tests below start real processes."""
    import contextlib
    import io

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    done = subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
    assert code == 0 or not check, done
    return done


def one_version(registry: Path, model: str) -> Path:
    found = [p.parent for p in (registry / model).glob("*/manifest.json") if not p.parent.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    work, registry = root / "work", root / "registry"
    # 1. A language model (scratch GPT-2, full fine-tune), published and promoted.
    # 64 positions: the prompts compared below (evaluate's, then `generate`'s) fit whole.
    registry_cli(*cli_args("stage", work, registry, "publish", **{"registry.model_name": "lm", "train.max_steps": 20, "tokenize.block_size": 64}))
    registry_cli("registry", "promote", "lm@latest", "--to", "production", "--registry", str(registry))
    # 2. Two adapters on lm@production, each taught one answer. The lm has 64 positions: the soft
    #    prompt's 4 virtual tokens need a block of 60.
    on_lm = {"model.init": "pretrained", "model.name": "registry://lm@production", "tokenize.block_size": 60,
             "train.max_steps": 10, "train.warmup_steps": 2, "sample.count": None, "sample.validation_fraction": 0.1}
    for name, method, lr in (("apple", "prompt_tuning", 0.3), ("banana", "lora", 0.02)):
        data = fruit_csv(root / f"{name}.csv", FRUIT[name])
        registry_cli(*cli_args("stage", work, registry, "publish", **on_lm, **{
            "data.source": data, "registry.model_name": f"bot-{name}", "train.method": method, "train.lr": lr,
            "train.num_virtual_tokens": 4, "train.lora_r": 8, "train.lora_alpha": 32}))
    # 3. LoRA on a scratch model: its random initialisation exists nowhere else.
    registry_cli(*cli_args("stage", work, registry, "publish", **{
        "registry.model_name": "scratch-lora", "train.method": "lora", "train.max_steps": 5, "tokenize.block_size": 64,
        "data.source": root / "apple.csv", "sample.count": None}))
    return {"root": root, "work": work, "registry": registry}


def test_versions_carry_cards_with_metrics_and_curves_listed_in_the_manifest(chain):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    version = one_version(chain["registry"], "lm")
    manifest = json.loads((version / "manifest.json").read_text())
    metrics = json.loads((version / "metrics.json").read_text())
    for curve in ("curves/loss.png", "curves/lr.png"):
        assert curve in manifest["files"], sorted(manifest["files"])
        assert (version / curve).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard((version / "README.md").read_text())
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    values = {r.metric_type: r.metric_value for r in results}
    assert name == "lm"
    assert values["perplexity"] == pytest.approx(metrics["perplexity"])
    assert {r.dataset_split for r in results} == {"validation"}
    assert card.data.library_name == "transformers" and "base_model" not in card.data.to_dict()

    # PEFT's blank template ("[More Information Needed]") is not shipped beside the real card.
    assert not (one_version(chain["registry"], "bot-apple") / "model" / "README.md").exists()
    adapter_card = ModelCard((one_version(chain["registry"], "bot-apple") / "README.md").read_text())
    assert adapter_card.data.library_name == "peft"
    assert adapter_card.data.base_model_relation == "adapter"
    assert "lm@" in adapter_card.data.base_model


def test_registry_base_is_in_the_fingerprint_and_the_lineage(chain):
    lm = one_version(chain["registry"], "lm").name
    for bot in ("bot-apple", "bot-banana"):
        version = one_version(chain["registry"], bot)
        assert json.loads((version / "base.json").read_text()) == {"registry": {"model": "lm", "version": lm}}
        lineage = json.loads((version / "lineage.json").read_text())
        assert lineage["train"]["content"]["base"]["registry_version"] == f"lm@{lm}"
        assert lineage["train"]["config"]["model"]["name"] == "registry://lm@production"
        # PEFT records the trainer's local copy of the base; the published file names the version.
        adapter_config = json.loads((version / "model" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == f"registry://lm@{lm}"
    scratch = one_version(chain["registry"], "scratch-lora")
    base = json.loads((scratch / "base.json").read_text())["registry"]
    adapter_config = json.loads((scratch / "model" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == f"registry://scratch-lora-base@{base['version']}"


def test_moving_the_alias_changes_the_train_fingerprint(chain, tmp_path):
    """A new production version means a new base: the cached adapter must not be reused."""
    from pipeline.config import build_config
    from pipeline.registry import aliases
    from pipeline.registry.store import push_folder
    from pipeline.stages import plan

    registry = str(chain["registry"])
    cfg = build_config(None, ["model.name=registry://lm@production", f"model.registry={registry}", "train.method=lora"])
    before = plan(cfg, "train")["train"]
    copy = tmp_path / "lm-v2"
    shutil.copytree(one_version(chain["registry"], "lm"), copy, ignore=shutil.ignore_patterns("manifest.json"))
    (copy / "metrics.json").write_text(json.dumps({"task": "causal_lm", "perplexity": 1.0, "gate": {"passed": True}}))
    push_folder(copy, registry, "lm", "v2")
    previous = aliases.target(registry, "lm", "production")
    aliases.move(registry, "lm", "production", "v2", reason="test")
    try:
        after = plan(cfg, "train")
    finally:
        aliases.move(registry, "lm", "production", previous, reason="test: back")
    assert after["train"] != before
    assert plan(cfg, "train")["train"] == before


def _offline_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TUNEPIPE_REGISTRY_CACHE": str(tmp_path / "empty-cache")}


def test_adapters_load_from_a_copy_of_the_registry_alone(chain, tmp_path):
    """A machine with only the registry: a copy of it, no workdir, no hub, an empty cache. The
    generation equals what the evaluate stage wrote for the same prompt (same model, greedy)."""
    registry = tmp_path / "elsewhere" / "registry"
    shutil.copytree(chain["registry"], registry)
    for model in ("scratch-lora", "bot-apple"):
        metrics = json.loads((one_version(registry, model) / "metrics.json").read_text())
        sample = metrics["generations"][0]
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "generate", f"{model}@latest", "--registry", str(registry), "--raw",
             "--prompt", sample["prompt"], "--max-new-tokens", "8"],
            cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == sample["tuned"] + "\n", (proc.stdout, sample)
    base = json.loads((one_version(registry, "scratch-lora") / "base.json").read_text())
    assert base["registry"]["model"] == "scratch-lora-base"


def test_pull_with_base_loads_with_nothing_else(chain, tmp_path):
    from pipeline.registry.loading import load_copy

    dest = tmp_path / "pulled"
    proc = registry_cli("registry", "pull", "scratch-lora@latest", str(dest), "--with-base", "--registry", str(chain["registry"]))
    assert "its base:" in proc.stdout
    assert (dest / "base" / "manifest.json").is_file() and (dest / "base" / "model" / "model.safetensors").is_file()
    loaded = load_copy(dest, registry=None)
    assert loaded.name == "scratch-lora" and type(loaded.model).__name__.startswith("Peft")


def test_export_merge_matches_the_adapter_models_logits(chain, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.registry.loading import load_version

    registry = str(chain["registry"])
    registry_cli("registry", "export", "bot-banana@latest", str(tmp_path / "merged"), "--merge", "--registry", registry)
    registry_cli("registry", "export", "bot-banana@latest", str(tmp_path / "adapter"), "--registry", registry)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (tmp_path / "adapter" / "base" / "config.json").is_file()
    adapter_model = load_version(registry, "bot-banana@latest").model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
    # Merged weights differ from the base's: the adapter did something to fold in.
    base = load_version(registry, "lm@production").model
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, got, atol=1e-4)

    from peft import AutoPeftModelForCausalLM

    plain = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)


def test_export_merge_refuses_a_soft_prompt(chain, tmp_path):
    proc = registry_cli("registry", "export", "bot-apple@latest", str(tmp_path / "x"), "--merge",
                        "--registry", str(chain["registry"]), check=False)
    assert proc.returncode == 1
    assert "prompt_tuning" in proc.stderr and "without --merge" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()


def _start_server(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    import re
    import time

    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", *args, "--port", "0"], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"serving \d+ models at (http://[\d.:]+/v1)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"tunepipe serve did not start:\n{log.read_text()[-3000:]}")


def test_serve_two_adapters_on_one_registry_base(chain, tmp_path):
    """The base (lm@production) once, a soft prompt and a LoRA adapter on it, through the OpenAI
    client: each answers as `tunepipe generate` does for that version, and they differ."""
    import signal

    from openai import OpenAI

    registry = str(chain["registry"])
    proc, url = _start_server(["--registry", registry, "--base", "lm@production",
                               "--adapter", "apple=bot-apple@latest", "--adapter", "banana=bot-banana@latest"], tmp_path)
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["lm@production", "apple", "banana"]
        prompt = "shop"
        answers = {}
        for name in ("lm@production", "apple", "banana"):
            done = client.completions.create(model=name, prompt=prompt, max_tokens=4)
            answers[name] = done.choices[0].text
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url + "/completions", data=b'{"model": "cherry", "prompt": "x"}',
                                                          headers={"Content-Type": "application/json"}))
        assert refused.value.code == 404
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    for name, reference in (("apple", "bot-apple@latest"), ("banana", "bot-banana@latest")):
        expected = registry_cli("generate", reference, "--registry", registry, "--prompt", prompt, "--max-new-tokens", "4").stdout
        assert answers[name] == expected[:-1], (name, answers[name], expected)
    # Each adapter really changes the model (the tiny base, 20 steps in, answers "s" to nearly
    # everything, so the texts may agree; tests/test_serve.py shows distinct texts on stronger weights).
    import torch

    from pipeline.registry.loading import load_version

    ids = load_version(registry, "lm@production").tokenizer("### Question:\nshop\n### Answer:\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        last = {ref: load_version(registry, ref).model(input_ids=ids).logits[0, -1]
                for ref in ("lm@production", "bot-apple@latest", "bot-banana@latest")}
    assert not torch.allclose(last["bot-apple@latest"], last["lm@production"], atol=1e-4)
    assert not torch.allclose(last["bot-banana@latest"], last["lm@production"], atol=1e-4)


def test_serve_refuses_an_adapter_of_another_base(chain):
    proc = registry_cli("serve", "--registry", str(chain["registry"]), "--base", "lm@production",
                        "--adapter", "s=scratch-lora@latest", "--port", "0", check=False)
    assert proc.returncode == 1
    assert "not on lm@" in proc.stderr and "scratch-lora-base@" in proc.stderr, proc.stderr


def test_generate_uses_the_versions_template(chain):
    from pipeline.registry.loading import load_version

    loaded = load_version(str(chain["registry"]), "bot-banana@latest")
    assert loaded.format_prompt("where is my order?") == "### Question:\nwhere is my order?\n### Answer:\n"
    prompt = "question number 7 about the shop"
    proc = registry_cli("generate", "bot-banana@latest", "--registry", str(chain["registry"]), "--prompt", prompt, "--max-new-tokens", "6")
    raw = registry_cli("generate", "bot-banana@latest", "--registry", str(chain["registry"]), "--raw",
                       "--prompt", loaded.format_prompt(prompt), "--max-new-tokens", "6")
    assert proc.stdout == raw.stdout and proc.stdout.strip("\n") != ""
    # --adapter: the adapter version applied on the base named first; here its own base, so the same tokens.
    on_base = registry_cli("generate", "lm@production", "--adapter", "bot-banana@latest", "--registry", str(chain["registry"]),
                           "--prompt", prompt, "--max-new-tokens", "6")
    assert on_base.stdout == proc.stdout and "warning" not in on_base.stderr
    # The model reads 64 positions: a longer answer is cut to fit (and said); a prompt that does not fit is refused.
    capped = registry_cli("generate", "bot-banana@latest", "--registry", str(chain["registry"]), "--prompt", prompt, "--max-new-tokens", "500")
    assert "tunepipe: note: generating" in capped.stderr and "not 500" in capped.stderr
    refused = registry_cli("generate", "bot-banana@latest", "--registry", str(chain["registry"]), "--prompt", "shop " * 200, check=False)
    assert refused.returncode == 1 and "shorten the prompt" in refused.stderr, refused
