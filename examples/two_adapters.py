"""Two LoRA adapters from two datasets on one base model: train, publish, then serve both from one process.

    .venv/bin/python examples/two_adapters.py --workdir /tmp/two-adapters          # ~2 minutes on 2 CPU cores
    .venv/bin/python examples/two_adapters.py --base gpt2 --method prompt_tuning   # with a hub model, given network

1. The base: `--base` (a hub id or folder) or, offline, a small GPT-2 with a BPE tokenizer made here.
2. The pipeline runs twice with `train.method: lora` (or `prompt_tuning`): on the bundled support
   answers, and on Python's stdlib docstrings. Each publishes a registry version whose `model/`
   holds the adapter only (kilobytes), with lineage back to its data.
3. Both versions are pulled (sha256-verified), the base is loaded once, both adapters are attached,
   and each prompt is answered by either adapter: `set_adapter(name)` picks the one that runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docstring_corpus import build_rows, write_csv  # noqa: E402

from pipeline.config import build_config  # noqa: E402
from pipeline.train.methods import load_adapters  # noqa: E402
from pipeline.registry.store import pull_version  # noqa: E402
from pipeline.stages import run_stages  # noqa: E402
from pipeline.data.text_tokenizer import EOS, train_byte_level_bpe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUPPORT = REPO / "examples" / "data" / "support.csv"


def make_base(folder: Path, texts: list[str], vocab_size: int = 1000) -> Path:
    """A small GPT-2 and its tokenizer, saved like any hub checkpoint (offline stand-in for `gpt2`)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(texts, vocab_size, [EOS]), eos_token=EOS, bos_token=EOS, pad_token=EOS
    )
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def adapter_config(name: str, data: dict, base: str, method: str, registry: Path, steps: int) -> dict:
    return {
        "data": data,
        "sample": {"count": 400, "validation_fraction": 0.1},
        "preprocess": {"template": "text"} if "text_column" in data else {},
        "tokenize": {"block_size": 64},
        "model": {"init": "pretrained", "name": base},
        "train": {"method": method, "lr": 5e-3, "max_steps": steps, "warmup_steps": 5, "micro_batch_size": 8,
                  "lora_r": 8, "num_virtual_tokens": 8, "save_every_steps": steps, "tensorboard": False},
        "evaluate": {"num_generations": 1, "max_new_tokens": 16},
        "registry": {"url": str(registry), "model_name": name},
    }


def train_and_publish(name: str, cfg: dict, workdir: Path) -> Path:
    results = run_stages(build_config(cfg), str(workdir), log=lambda line: print(f"[{name}] {line}", flush=True))
    published = results[-1].stats
    return pull_version(cfg["registry"]["url"], name, published["version"], workdir / "pulled" / name)


def answer_with_each(base: str, adapters: dict[str, Path], prompts: list[str], max_new_tokens: int = 20) -> dict[str, list[str]]:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_adapters(AutoModelForCausalLM.from_pretrained(base), {name: path / "model" for name, path in adapters.items()})
    answers = {}
    for name in adapters:
        model.set_adapter(name)
        answers[name] = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers[name].append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/two-adapters"))
    p.add_argument("--base", help="hub id or folder of the base model (default: a small GPT-2 made offline)")
    p.add_argument("--method", choices=["lora", "prompt_tuning"], default="lora")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    docstrings = workdir / "docstrings.csv"
    docstrings.parent.mkdir(parents=True, exist_ok=True)
    rows = build_rows(("email", "tarfile", "asyncio", "logging"), max_per_class=150)
    write_csv(docstrings, rows)
    base = args.base
    if base is None:
        support_texts = SUPPORT.read_text(encoding="utf-8").splitlines()
        base = str(make_base(workdir / "base", support_texts + [text for text, _ in rows]))
    registry = workdir / "registry"
    datasets = {
        "support-answers": {"source": str(SUPPORT)},
        "stdlib-docs": {"source": str(docstrings), "text_column": "text"},
    }
    pulled = {
        name: train_and_publish(name, adapter_config(name, data, base, args.method, registry, args.steps), workdir)
        for name, data in datasets.items()
    }
    for name, folder in pulled.items():
        size = sum(f.stat().st_size for f in (folder / "model").rglob("*") if f.is_file())
        print(f"{name}: published adapter {size / 1024:.0f} KiB at {folder}")
    prompts = ["### Question:\nHow long is the warranty on the NovaSound headset?\n### Answer:\n", "Return the"]
    for name, outputs in answer_with_each(base, pulled, prompts).items():
        for prompt, text in zip(prompts, outputs):
            print(f"[{name}] {prompt.splitlines()[-2] if '###' in prompt else prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
