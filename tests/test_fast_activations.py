"""pipeline/train/fast_activations.py: GPT-2's GELU swapped for torch's one-kernel tanh GELU computes the
same function, and the trained model saves and loads as plain GPT-2."""

from __future__ import annotations

import json

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from pipeline.train import fast_activations


def test_swapped_gpt2_computes_the_same_outputs_and_gradients(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(0, 64, (4, 16))
    before = model(input_ids=ids, labels=ids)
    grads_before = torch.autograd.grad(before.loss, list(model.parameters()))

    assert fast_activations.install(model) == 3  # one per block
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    after = model(input_ids=ids, labels=ids)
    grads_after = torch.autograd.grad(after.loss, list(model.parameters()))
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_after, grads_before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert isinstance(reloaded.transformer.h[0].mlp.act, NewGELUActivation)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, after.logits, rtol=1e-5, atol=1e-5)


def test_models_without_gelu_new_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.SiLU())
    assert fast_activations.install(model) == 0
    assert isinstance(model[1], torch.nn.GELU) and model[1].approximate == "none"
