"""pipeline/train/cpu_matmul.py: linear layers through oneDNN compute what torch's do, forward and
backward, leave the saved model alone, step aside where they do not apply, and `auto` follows the CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.train import cpu_matmul
from pipeline.train.fused_loss import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_layout", ["out_in", "transposed_view"])
def test_onednn_linear_matches_torch_forward_and_backward(bias, weight_layout):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    stored = torch.randn(24, 16) if weight_layout == "transposed_view" else torch.randn(16, 24)  # Conv1D keeps [in, out]
    stored.requires_grad_()
    weight = stored.t() if weight_layout == "transposed_view" else stored
    b = torch.randn(16, requires_grad=True) if bias else None
    grad_out = torch.randn(3, 5, 16)
    inputs = [t for t in (x, stored, b) if t is not None]

    ours = cpu_matmul.linear(x, weight, b)
    ours_grads = torch.autograd.grad(ours, inputs, grad_out)
    ref = F.linear(x, weight, b)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    assert ours.grad_fn.name().startswith("_OneDnnLinear")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(ours_grads, ref_grads):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["transposed", "strided_columns"])
def test_inputs_that_are_views_give_torchs_results(layout):
    torch.manual_seed(3)
    x = torch.randn(5, 3, 24).transpose(0, 1) if layout == "transposed" else torch.randn(10, 48)[:, ::2]
    x = x.detach().requires_grad_()  # a view still: detach keeps the strides
    assert not x.is_contiguous()
    weight = torch.randn(16, 24, requires_grad=True)
    ours, ref = cpu_matmul.linear(x, weight), F.linear(x, weight)
    grad_out = torch.randn_like(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(torch.autograd.grad(ours, (x, weight), grad_out), torch.autograd.grad(ref, (x, weight), grad_out)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_the_input_still_does():
    x = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(4, 8)  # frozen (LoRA's base layer)
    out = cpu_matmul.linear(x, weight)
    (grad_x,) = torch.autograd.grad(out.square().sum(), (x,))
    torch.testing.assert_close(grad_x, 2 * (x @ weight.T) @ weight, rtol=1e-5, atol=1e-5)


def test_calls_outside_fp32_cpu_take_torchs_path():
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_matmul.linear(x, weight).dtype == torch.bfloat16  # autocast's own F.linear
    assert cpu_matmul.linear(x.double(), weight.double()).dtype == torch.float64
    assert cpu_matmul.linear(x.requires_grad_(), weight).grad_fn.name().startswith("_OneDnnLinear")


def test_installed_gpt2_trains_like_torchs_and_saves_a_plain_model(tmp_path):
    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    reference = GPT2LMHeadModel(config)
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    # Per block: attention's c_attn and c_proj, the MLP's c_fc and c_proj (Conv1D); and lm_head (nn.Linear).
    assert cpu_matmul.install(model) == 2 * 4 + 1
    assert list(model.state_dict()) == keys

    ids = torch.randint(0, 64, (4, 16))
    ours, ref = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-5, atol=1e-5)
    ours.loss.backward()
    ref.loss.backward()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)

    model.save_pretrained(tmp_path)
    assert "mkldnn" not in json.dumps(json.loads((tmp_path / "config.json").read_text())).lower()
    torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(tmp_path)(input_ids=ids).logits, ours.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_loss_through_onednn_matches_torchs_matmuls(reduction):
    torch.manual_seed(2)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (50,))

    def run(onednn):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16, reduction=reduction, ignore_index=None, onednn=onednn)
        total = loss if reduction == "sum" else (loss * torch.linspace(0.5, 1.5, 50)).sum()
        return (loss, *torch.autograd.grad(total, (hidden, weight)))

    for ours, ref in zip(run(True), run(False)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vendor,flags,expected", [
    ("AuthenticAMD", {"avx2", "avx512f"}, "onednn"),  # Zen 4/5: MKL would run its AVX2 kernels
    ("AuthenticAMD", {"avx2"}, "torch"),
    ("GenuineIntel", {"avx2", "avx512f"}, "torch"),  # MKL's own AVX-512 kernels
    ("", set(), "torch"),  # no /proc/cpuinfo
])
def test_auto_follows_the_cpu(monkeypatch, vendor, flags, expected):
    monkeypatch.setattr(cpu_matmul, "_cpu_flags", lambda: (vendor, frozenset(flags)))
    assert cpu_matmul.choose("auto") == expected
    assert cpu_matmul.choose("torch") == "torch" and cpu_matmul.choose("onednn") == "onednn"


def test_lora_run_through_onednn_trains_torchs_curve(tmp_path, monkeypatch):
    """The whole trainer, LoRA on GPT-2 (frozen base layers routed, adapters on top): the losses of
    cpu_matmul=torch to rounding, and the oneDNN path really ran."""
    import numpy as np
    from tiny import train_on_blocks

    run = ("model.vocab_multiple=1", "train.method=lora", "model.dropout=0", "train.lora_dropout=0")
    torch_losses = train_on_blocks(tmp_path / "torch", *run, "train.cpu_matmul=torch")
    calls = []
    apply = cpu_matmul._OneDnnLinear.apply
    monkeypatch.setattr(cpu_matmul._OneDnnLinear, "apply", lambda *args: calls.append(1) or apply(*args))
    onednn_losses = train_on_blocks(tmp_path / "onednn", *run, "train.cpu_matmul=onednn")
    assert calls, "no layer went through oneDNN"
    np.testing.assert_allclose(onednn_losses, torch_losses, rtol=1e-4)


def test_onednn_asked_for_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: False)
    with pytest.raises(ValueError, match="train.cpu_matmul is onednn"):
        cpu_matmul.choose("onednn")
    assert cpu_matmul.choose("auto") == "torch"
