"""What a second adapter costs a `tunepipe serve` process, against serving it from a second process.

    python bench/serve_memory.py                  # a GPT-2-small-sized base (124M parameters, ~500 MB fp32)
    python bench/serve_memory.py --layers 4       # smaller and quicker

Builds a random base of GPT-2 small's shape and two LoRA adapters (r=8 on c_attn, non-zero, so
each really changes the answers), then starts `python -m pipeline.serve` (what `tunepipe serve`
runs once it has the registry copies) three times: the base alone, the base with one adapter,
the base with both. Each server answers one completion per model before its resident memory is
read from its own /health. The peer is the plain way to serve two fine-tunes: one process per
adapter, each holding its own base (twice the one-adapter server). Prints each figure and, as
the last line, one JSON object: {"base_params", "base_mib", "rss_base_only_mib",
"rss_one_adapter_mib", "rss_two_adapters_mib", "second_adapter_mib", "two_adapters_over_one",
"one_process_over_two"}.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running this file puts bench/ first on sys.path, where a sibling script named like a stdlib
# module (bench/tokenize.py) would shadow it for everything imported after this line.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import re
import subprocess
import tempfile
import time
import urllib.request

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def make_models(root: Path, layers: int) -> tuple[Path, dict[str, Path], int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline.data.text_tokenizer import EOS, train_byte_level_bpe

    texts = [f"question {i}: how do I reset my password on device {i % 7}?" for i in range(400)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_level_bpe(texts, 1000, [EOS]),
                                        eos_token=EOS, bos_token=EOS, pad_token=EOS)
    torch.manual_seed(0)
    # GPT-2 small's shape, its 50,257-token vocabulary included (the embeddings are a third of it).
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=layers, n_head=12)
    base = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in base.parameters())
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {}
    for i, name in enumerate(("support", "docs")):
        torch.manual_seed(100 + i)
        peft = get_peft_model(GPT2LMHeadModel.from_pretrained(root / "base"),
                              LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], task_type="CAUSAL_LM"))
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # LoRA starts B at zero: a no-op adapter
        peft.save_pretrained(root / name)
        adapters[name] = root / name
    return root / "base", adapters, params


def server_rss(base: Path, adapters: dict[str, Path], log: Path) -> int:
    argv = [sys.executable, "-m", "pipeline.serve", "--base", str(base), "--port", "0",
            *[a for name, folder in adapters.items() for a in ("--adapter", f"{name}={folder}")]]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            found = re.search(r"serving \d+ models at (http://[\d.:]+)/v1", log.read_text())
            url = found.group(1) if found else None
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.2)
        for name in ["base", *adapters]:
            body = json.dumps({"model": name, "prompt": "how do I reset my password?", "max_tokens": 8}).encode()
            urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})).read()
        return json.loads(urllib.request.urlopen(url + "/health").read())["rss_bytes"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="transformer blocks of the base (GPT-2 small: 12)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-memory-") as tmp:
        root = Path(tmp)
        base, adapters, params = make_models(root, args.layers)
        base_only = server_rss(base, {}, root / "base.log")
        one = server_rss(base, dict(list(adapters.items())[:1]), root / "one.log")
        two = server_rss(base, adapters, root / "two.log")
    result = {
        "base_params": params,
        "base_mib": round(params * 4 / MIB, 1),
        "rss_base_only_mib": round(base_only / MIB, 1),
        "rss_one_adapter_mib": round(one / MIB, 1),
        "rss_two_adapters_mib": round(two / MIB, 1),
        "second_adapter_mib": round((two - one) / MIB, 1),
        "two_adapters_over_one": round(two / one, 3),
        # The peer: each adapter in a process of its own, each with its own copy of the base.
        "one_process_over_two": round(two / (2 * one), 3),
    }
    print(f"base: {params:,} parameters ({result['base_mib']} MiB fp32)")
    print(f"resident memory: base only {result['rss_base_only_mib']} MiB, one adapter {result['rss_one_adapter_mib']} MiB, "
          f"two adapters {result['rss_two_adapters_mib']} MiB (the second adds {result['second_adapter_mib']} MiB)")
    print(f"two adapters in one server / one process per adapter: {result['one_process_over_two']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
