"""CUDA tests: the same recipe on a GPU, bf16 autocast where the device supports it; fp16, QLoRA,
DDP on NCCL, DeepSpeed ZeRO-2, compile + exact resume, the fused loss's memory, FlashAttention-2
on packed blocks, and a step loop that never synchronises with the host. Skipped without CUDA
(conftest.py), so they are written and run where a GPU is at hand: say which ran in the note."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import crash_at_step, make_blocks, train_losses, train_on_blocks, trainer_args

from pipeline.config import TrainConfig
from pipeline.train.precision import autocast_context

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


def two_gpus():
    return pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def test_the_step_loop_never_synchronises_with_the_host(tmp_path, monkeypatch):
    """torch's sync debug mode raises on any host-device synchronisation inside a step (a read of
    the loss, a boolean mask, a blocking copy); settle's read every log_every_steps is outside."""
    from pipeline.train import recipe, step

    plain = step.train_step

    def strict_step(run, state, checkpoints):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return plain(run, state, checkpoints)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(recipe, "train_step", strict_step)
    losses = train_on_blocks(tmp_path, "train.log_every_steps=4")
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_compiled_training_resumes_bit_identically_on_gpu(tmp_path, monkeypatch):
    from pipeline.train import recipe

    run = ("train.compile=true", "train.save_every_steps=6", "model.dropout=0.1")
    whole = train_on_blocks(tmp_path / "whole", *run)
    with crash_at_step(monkeypatch, 9), pytest.raises(RuntimeError, match="simulated crash"):
        train_on_blocks(tmp_path / "stopped", *run)
    from tiny import BLOCKS_RUN

    stopped = tmp_path / "stopped"
    assert recipe.main(trainer_args(stopped / "tok", stopped, *BLOCKS_RUN, *run)) == 0
    assert train_losses(stopped / "out") == whole


def _step_peak_memory(fused: bool) -> tuple[float, int]:
    """(loss, peak bytes) of one forward + backward of a GPT-2 with GPT-2's padded vocabulary on 8 x 1024 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.train import objectives

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=1024, n_embd=256, n_layer=2, n_head=4)).cuda()
    ids = torch.randint(0, 50257, (8, 1024))
    batch = objectives.split_batch({"input_ids": ids, "labels": ids.clone()}, "causal_lm", torch.device("cuda"))
    head = objectives.TargetPositionsOnly(model.get_output_embeddings(), fused=fused)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16), head.selecting(batch.targets):
        loss, _ = objectives.batch_loss(model(**batch.inputs).logits, batch, "causal_lm", 0.1, head)
    loss.backward()
    torch.cuda.synchronize()
    return loss.item() / batch.count, torch.cuda.max_memory_allocated()


def test_the_fused_loss_needs_less_memory_for_the_same_loss():
    plain_loss, plain_peak = _step_peak_memory(fused=False)
    fused_loss, fused_peak = _step_peak_memory(fused=True)
    print(f"peak memory of the step: plain {plain_peak / 2**30:.2f} GiB, fused {fused_peak / 2**30:.2f} GiB")
    assert abs(fused_loss - plain_loss) < 1e-3 * plain_loss
    # The plain step holds [8 x 1023, 50304] logits in bf16 and fp32 and their gradient (~5 GiB).
    assert fused_peak < 0.6 * plain_peak


@pytest.mark.parametrize("kernel", ["sdpa", "flash_attention_2"])
def test_packed_examples_attend_only_to_themselves_on_gpu(kernel):
    """A `bins` block's examples, as the trainer calls the model (restarting position_ids, no mask,
    no cache): the second example's logits equal those of the example alone. flash_attention_2
    runs them as variable-length sequences (no padding, no mask)."""
    if kernel == "flash_attention_2":
        pytest.importorskip("flash_attn")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=64, attn_implementation=kernel)
    model = GPT2LMHeadModel(config).cuda().eval().to(torch.bfloat16)
    first, second = torch.randint(0, 128, (1, 9)).cuda(), torch.randint(0, 128, (1, 13)).cuda()
    positions = torch.cat([torch.arange(9), torch.arange(13)]).unsqueeze(0).cuda()
    with torch.no_grad():
        alone = model(input_ids=second, use_cache=False).logits.float()
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits[:, 9:].float()
    torch.testing.assert_close(packed, alone, atol=3e-2, rtol=3e-2)


def test_flash_attention_is_chosen_where_installed():
    from pipeline.config import ModelConfig
    from pipeline.train.modeling import attention_kernel

    expected = "flash_attention_2" if _installed("flash_attn") and torch.cuda.is_bf16_supported() else "sdpa"
    assert attention_kernel(ModelConfig(), torch.device("cuda", 0), "auto") == expected
    assert attention_kernel(ModelConfig(), torch.device("cuda", 0), "fp32") == "sdpa"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_deepspeed_zero2_trains_on_gpu(tmp_path):
    losses = train_on_blocks(tmp_path, "train.strategy=deepspeed", "train.deepspeed_config=zero2")
    assert losses[-1] < losses[0] - 0.3


@two_gpus()
def test_ddp_on_nccl_matches_one_gpu(tmp_path):
    """2 ranks x micro-batch 2 on two GPUs train the same steps as 1 rank x micro-batch 4 (bf16: close, not equal)."""
    from tiny import BLOCKS_RUN, make_blocks

    make_blocks(tmp_path / "tok")
    one = train_on_blocks(tmp_path / "one")
    two = tmp_path / "two"
    args = trainer_args(tmp_path / "tok", two, *BLOCKS_RUN, "train.micro_batch_size=2", "train.nproc_per_node=2")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "pipeline.train", *args], check=True, timeout=600)
    np.testing.assert_allclose(train_losses(two / "out"), one, rtol=2e-2)
