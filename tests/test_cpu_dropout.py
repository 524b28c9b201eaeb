"""pipeline/train/cpu_dropout.py: the cheaper CPU dropout keeps dropout's statistics, and its attention
path computes exactly transformers' sdpa when nothing is dropped."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pipeline.train import cpu_dropout


def test_mask_drops_the_asked_fraction_and_follows_the_torch_seed():
    torch.manual_seed(0)
    mask = cpu_dropout.drop_mask(torch.Size([1000, 1001]), 0.1, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (1000, 1001)
    assert abs(mask.float().mean().item() - 0.1) < 0.002
    torch.manual_seed(0)
    assert torch.equal(cpu_dropout.drop_mask(torch.Size([1000, 1001]), 0.1, torch.device("cpu")), mask)
    assert not cpu_dropout.drop_mask(torch.Size([10_000]), 0.0, torch.device("cpu")).any()


def test_dropout_scales_what_it_keeps_and_passes_gradients_through_the_same_mask():
    torch.manual_seed(1)
    x = (torch.rand(200_000) + 1.0).requires_grad_()
    y = cpu_dropout.dropout(x, 0.25)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.005
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert cpu_dropout.dropout(x, 0.25, training=False) is x
    # bf16 (CPU autocast): the same elements kept, scaled in fp32 arithmetic, not by a rounded bf16 1/0.75.
    x16 = x.detach().bfloat16()
    torch.manual_seed(1)
    torch.rand(200_000)  # the same draws as before the fp32 call above
    y16 = cpu_dropout.dropout(x16, 0.25)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16 != 0, kept)
    torch.testing.assert_close(y16[kept], (x16[kept].float() / 0.75).bfloat16(), rtol=0, atol=0)


class _Module(torch.nn.Module):
    def __init__(self, is_causal: bool, num_key_value_groups: int):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = num_key_value_groups  # transformers' sdpa repeats key/value heads by this


CASES = ["causal_no_mask", "padding_bool_mask", "grouped_query", "bidirectional", "additive_float_mask"]


def _nothing_dropped(n, device):
    return torch.full((n,), 2**15 - 1, dtype=torch.int16, device=device)


@pytest.mark.parametrize("query_block", [64, 4], ids=["one_block", "blocks_of_4"])
@pytest.mark.parametrize("case", CASES)
def test_attention_with_nothing_dropped_equals_transformers_sdpa(case, query_block, monkeypatch):
    module, q, k, v, mask = _qkv_and_mask(case, seed=2, length=9)
    # Nothing dropped: the 1/(1-p) scale is the only effect of p left, so compare at p and undo it.
    monkeypatch.setattr(cpu_dropout, "_uniform_bits", _nothing_dropped)
    monkeypatch.setattr(cpu_dropout, "QUERY_BLOCK", query_block)
    ours, _ = cpu_dropout.attention(module, q, k, v, mask, dropout=0.2)
    ref, _ = sdpa_attention_forward(module.eval(), q, k, v, mask, dropout=0.0)
    torch.testing.assert_close(ours * 0.8, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((ours * 0.8).square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def _qkv_and_mask(case: str, seed: int, length: int = 11):
    """q, k, v [3, heads, length, 8] and the mask of `case`: rows of `length`, 6 and 3 real tokens."""
    torch.manual_seed(seed)
    b, h, kv_heads, t, d = 3, 4, 2 if case == "grouped_query" else 4, length, 8
    q = torch.randn(b, h, t, d, requires_grad=True)
    k = torch.randn(b, kv_heads, t, d, requires_grad=True)
    v = torch.randn(b, kv_heads, t, d, requires_grad=True)
    module = _Module(is_causal=case != "bidirectional", num_key_value_groups=h // kv_heads).train()
    mask = None
    if case in ("padding_bool_mask", "additive_float_mask"):
        lengths = torch.tensor([t, 6, 3])
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = (causal[None] & (torch.arange(t)[None, None, :] < lengths[:, None, None]))[:, None]  # [b, 1, t, t]
        if case == "additive_float_mask":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return module, q, k, v, mask


@pytest.mark.parametrize("case", ["causal_no_mask", "padding_bool_mask", "grouped_query", "additive_float_mask"])
def test_causal_blocks_drop_what_the_dense_path_drops_and_match_it(case, monkeypatch):
    """Blocks of 4 queries over 11 positions (the last block partial) against the dense math path,
    under the same seed: the same outputs and gradients, so the same elements were kept."""
    module, q, k, v, mask = _qkv_and_mask(case, 5)
    grad_out = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    def run():
        torch.manual_seed(9)
        out, _ = cpu_dropout.attention(module, q, k, v, mask, dropout=0.3)
        return out, torch.autograd.grad(out, (q, k, v), grad_out)

    monkeypatch.setattr(cpu_dropout, "QUERY_BLOCK", 4)
    blocked, blocked_grads = run()
    with monkeypatch.context() as m:
        m.setattr(cpu_dropout, "_blockable_bias", lambda *a: None)
        dense, dense_grads = run()
    undropped, _ = sdpa_attention_forward(module.eval(), q, k, v, mask, dropout=0.0)
    assert (blocked - undropped).abs().max() > 0.1  # something was dropped
    assert cpu_dropout._blockable_bias(module, q, k, mask, None) is not None  # and the blocks ran
    torch.testing.assert_close(blocked, dense, rtol=1e-5, atol=1e-6)
    for ours, ref in zip(blocked_grads, dense_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_blocks_are_not_used_where_they_would_be_wrong():
    module, q, k, v, mask = _qkv_and_mask("bidirectional", 1)
    assert cpu_dropout._blockable_bias(module, q, k, None, None) is None  # an encoder sees every key
    module.is_causal = True
    assert cpu_dropout._blockable_bias(module, q[:, :, -1:], k, None, None) is None  # a KV cache
    assert cpu_dropout._blockable_bias(module, q.double(), k.double(), None, None) is None  # not fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_dropout._blockable_bias(module, q, k, None, None) is None
    key_padding_only = torch.ones(q.shape[0], 1, 1, q.shape[2], dtype=torch.bool)  # not per query
    assert cpu_dropout._blockable_bias(module, q, k, key_padding_only, None) is None
    assert cpu_dropout._blockable_bias(module, q, k, None, None) is not None


def tiny_models():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32, attn_implementation="sdpa"))
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                                         intermediate_size=32, vocab_size=50, attention_dropout=0.1, attn_implementation="sdpa"))
    return {"gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_install_keeps_eval_outputs_and_saves_a_plain_config(arch, tmp_path):
    torch.manual_seed(3)
    model = tiny_models()[arch].eval()
    ids = torch.randint(0, 50, (2, 12))
    before = model(input_ids=ids).logits
    swapped = cpu_dropout.install(model)
    assert swapped == (7 if arch == "gpt2" else 0)  # GPT-2: embeddings + 3 per block; Llama has no nn.Dropout
    assert model.config._attn_implementation == cpu_dropout.ATTENTION
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, before, rtol=0, atol=0)
    # Training with dropout: reproducible under the same seed, different from eval.
    model.train()
    torch.manual_seed(4)
    a = model(input_ids=ids).logits
    torch.manual_seed(4)
    torch.testing.assert_close(model(input_ids=ids).logits, a, rtol=0, atol=0)
    assert not torch.allclose(a, before)
    a.sum().backward()
    model.save_pretrained(tmp_path)
    assert cpu_dropout.ATTENTION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_causal_bias_for_every_length_is_a_slice_of_one_square():
    cpu_dropout._masks.clear()
    long = cpu_dropout._causal_bias(12, 12, torch.float32, torch.device("cpu"))
    short = cpu_dropout._causal_bias(5, 5, torch.float32, torch.device("cpu"))
    assert len(cpu_dropout._masks) == 1 and short.shape == (5, 5)
    assert torch.equal(short == 0, torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(long[:5, :5], short)
    # Fewer queries than keys (a cache): the queries are the last positions.
    rect = cpu_dropout._causal_bias(2, 5, torch.float32, torch.device("cpu"))
    assert torch.equal(rect == 0, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
