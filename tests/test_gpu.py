"""CUDA pulse tests: the same recipe on a GPU, bf16 autocast where the device supports it."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_blocks, train_losses, train_on_blocks, trainer_args

from pipeline.config import TrainConfig
from pipeline.train.recipe import autocast_context

pytestmark = pytest.mark.gpu


def test_bf16_autocast_is_chosen_on_a_capable_gpu():
    context = autocast_context(TrainConfig(), torch.device("cuda", 0))
    if torch.cuda.is_bf16_supported():
        assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    else:
        assert not isinstance(context, torch.autocast)


def test_training_on_cuda_learns(tmp_path, capsys):
    losses = train_on_blocks(tmp_path)
    assert "device cuda:0" in capsys.readouterr().out
    assert losses[-1] < losses[0] - 0.3


def test_fp16_with_dynamic_loss_scaling_learns(tmp_path):
    losses = train_on_blocks(tmp_path, "train.precision=fp16")
    assert losses[-1] < losses[0] - 0.3


def test_qlora_trains_lora_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.train import recipe

    make_blocks(tmp_path / "tok")  # vocab 97, blocks of 16
    base = tmp_path / "base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(base)
    args = trainer_args(tmp_path / "tok", tmp_path, "model.init=pretrained", f"model.name={base}", "train.method=qlora",
                        "train.max_steps=20", "train.lr=1e-2", "train.warmup_steps=2", "train.micro_batch_size=8", "train.save_every_steps=10")
    assert recipe.main(args) == 0
    stats = json.loads((tmp_path / "out" / "train_stats.json").read_text())
    assert stats["method"] == "qlora" and stats["trainable_params"] < stats["total_params"]
    assert (tmp_path / "out" / "model" / "adapter_model.safetensors").exists()
    losses = train_losses(tmp_path / "out")
    assert losses[-1] < losses[0]
