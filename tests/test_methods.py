"""Training methods on tiny models built from configs: what trains, what stays bit-identical, the
optimizer groups, adapter-only save/load, two adapters on one base, and LoRA on the real MiniLM.

    .venv/bin/python -m pytest -q tests/test_methods.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import MINILM
from torch import nn
from transformers import (
    AutoModelForSequenceClassification, BartConfig, BartForConditionalGeneration, BartForSequenceClassification, BertConfig, BertForSequenceClassification,
    BertModel, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration,
)

from pipeline.config import TrainConfig
from pipeline.train.methods import (
    ADAPTER_WEIGHTS, apply_method, base_load_kwargs, check_method_runtime, count_parameters, embedding_modules,
    head_modules, load_adapters, load_trained, parameter_groups, save_trained, transformer_blocks, virtual_tokens,
)

TASKS = ("causal_lm", "classification", "seq2seq")
METHODS = ("full", "freeze", "lora", "prompt_tuning", "adapters")
VOCAB, LABELS = 100, 3
pytestmark = pytest.mark.usefixtures("one_thread")  # tensors this small only lose from a second thread


def gpt2_config():
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)


def bert_config():
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=LABELS)


def t5_config():
    return T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build(task: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if task == "causal_lm":
        return GPT2LMHeadModel(gpt2_config())
    if task == "classification":
        return BertForSequenceClassification(bert_config())
    return T5ForConditionalGeneration(t5_config())


def batch(task: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (4, 8), generator=g)
    if task == "causal_lm":
        return {"input_ids": ids, "labels": ids.clone()}
    mask = torch.ones_like(ids)
    if task == "classification":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, LABELS, (4,), generator=g)}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, VOCAB, (4, 5), generator=g)}


def train(model: nn.Module, cfg: TrainConfig, task: str, steps: int = 3, seed: int = 1) -> None:
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
    model.train()
    for step in range(steps):
        model(**batch(task, seed + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def outputs(model: nn.Module, task: str) -> torch.Tensor:
    inputs = {k: v for k, v in batch(task, seed=99).items() if task == "seq2seq" or k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def method_cfg(method: str, **extra) -> TrainConfig:
    values = dict(method=method, lr=1e-2, trainable_blocks=1, num_virtual_tokens=4, adapter_size=8, lora_dropout=0.0)
    return TrainConfig(**(values | extra))


# What each method changes in the BASE model's own parameters (by name); everything else must stay
# bit-identical. PEFT's classification head trains as a copy (modules_to_save), so its original stays.
FREEZE_TRAINS = {
    "causal_lm": ("transformer.h.1.", "transformer.ln_f."),  # lm_head is wte (tied): frozen
    "classification": ("bert.encoder.layer.1.", "bert.pooler.", "classifier."),
    "seq2seq": ("decoder.block.1.", "decoder.final_layer_norm."),  # lm_head tied to `shared`: frozen
}


def expected_changes(task: str, method: str) -> tuple[str, ...] | None:
    if method == "full":
        return None  # everything
    if method == "freeze":
        return FREEZE_TRAINS[task]
    if method == "adapters" and task == "classification":
        return ("bert.pooler.", "classifier.")
    return ()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_exactly_its_parameters(task, method, capsys):
    model = build(task)
    base = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    cfg = method_cfg(method)
    trained = apply_method(model, cfg, task, None)
    assert capsys.readouterr().out == ""
    groups = parameter_groups(trained, cfg)
    in_groups = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in in_groups}) == len(in_groups) == sum(p.requires_grad for p in trained.parameters())
    assert sum(p.numel() for p in in_groups) == count_parameters(trained)[0] > 0
    train(trained, cfg, task)

    prefixes = expected_changes(task, method)
    for name, (p, before) in base.items():
        should_change = prefixes is None or name.startswith(prefixes)
        assert (not torch.equal(p, before)) == should_change, f"{method}/{task}: {name} changed={not should_change}"
    base_ids = {id(p) for p, _ in base.values()}
    new = {n: p for n, p in trained.named_parameters() if id(p) not in base_ids}
    assert bool(new) == (method in ("lora", "prompt_tuning", "adapters"))
    for name, p in new.items():
        assert p.requires_grad and p.abs().sum() > 0, name
    if task == "classification" and method in ("lora", "prompt_tuning"):  # the head trains as PEFT copies
        assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in new if "modules_to_save" in n} == {"pooler", "classifier"}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", ["adapters", "lora"])
def test_new_modules_start_as_the_identity(task, method):
    reference = outputs(build(task).eval(), task)
    model = apply_method(build(task), method_cfg(method), task, None).eval()
    assert torch.equal(outputs(model, task), reference)


def test_layerwise_learning_rates_and_weight_decay():
    cfg = TrainConfig(lr=1e-3, layer_lr_decay=0.5, head_lr=5e-3, weight_decay=0.1)
    model = apply_method(build("causal_lm"), cfg, "causal_lm", None)
    groups = parameter_groups(model, cfg)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"embeddings": 1e-3 * 0.5**3, "block_0": 1e-3 * 0.5**2, "block_0_no_decay": 1e-3 * 0.5**2,
                   "block_1": 1e-3 * 0.5, "block_1_no_decay": 1e-3 * 0.5, "head_no_decay": 5e-3}
    for g in groups:
        assert g["initial_lr"] == g["lr"] and g["params"]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.1)
        assert all((p.ndim < 2) == g["name"].endswith("_no_decay") for p in g["params"])
    embeddings = next(g for g in groups if g["name"] == "embeddings")["params"]
    assert any(p is model.lm_head.weight for p in embeddings)  # the tied head: once, with the embeddings
    head = next(g for g in groups if g["name"] == "head_no_decay")["params"]
    assert {id(p) for p in head} == {id(p) for p in model.transformer.ln_f.parameters()}

    t5 = build("seq2seq")  # encoder blocks are the lower layers, the decoder's top block the highest
    names = [g["name"] for g in parameter_groups(t5, cfg) if g["name"].startswith("block_") and "no_decay" not in g["name"]]
    assert names == ["block_0", "block_1", "block_2", "block_3"]
    assert parameter_groups(t5, cfg)[-2]["lr"] == 1e-3 * 0.5  # block_3 = decoder.block[1]
    assert t5.decoder.block[1].layer[0].SelfAttention.q.weight in parameter_groups(t5, cfg)[-3]["params"]


def test_block_discovery_per_architecture():
    gpt2, bert, t5 = build("causal_lm"), build("classification"), build("seq2seq")
    assert transformer_blocks(gpt2) == list(gpt2.transformer.h)
    assert transformer_blocks(GPT2ForSequenceClassification(gpt2_config()))[1].__class__.__name__ == "GPT2Block"
    assert transformer_blocks(bert) == list(bert.bert.encoder.layer)
    assert transformer_blocks(t5) == [*t5.encoder.block, *t5.decoder.block]
    bart = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=2,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64))
    assert transformer_blocks(bart) == [*bart.model.encoder.layers, *bart.model.decoder.layers]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    assert transformer_blocks(llama) == list(llama.model.layers)
    peft_model = apply_method(llama, method_cfg("lora"), "causal_lm", None)
    assert transformer_blocks(peft_model) == list(llama.model.layers)

    assert set(head_modules(bert)) == {"bert.pooler", "classifier"}
    assert set(head_modules(t5)) == {"lm_head"}
    assert {id(m) for m in embedding_modules(gpt2)} >= {id(gpt2.transformer.wte), id(gpt2.transformer.wpe)}
    assert any(m is bert.bert.embeddings for m in embedding_modules(bert))
    # PEFT itself only knows `classifier` and `score`: BART's head must be named for it to train.
    bart_classifier = BartForSequenceClassification(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=LABELS))
    lora = apply_method(bart_classifier, method_cfg("lora"), "classification", None)
    assert any(n.startswith("base_model.model.classification_head.modules_to_save") for n, p in lora.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="unknown architecture Sequential"):
        transformer_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_freeze_trains_an_untied_head_and_caps_trainable_blocks():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    apply_method(llama, method_cfg("freeze", trainable_blocks=1), "causal_lm", None)
    trains = {n.split(".")[0] + "." + n.split(".")[1] for n, p in llama.named_parameters() if p.requires_grad}
    assert trains == {"model.layers", "model.norm", "lm_head.weight"}
    assert not any(p.requires_grad for p in llama.model.layers[0].parameters())
    gpt2 = apply_method(build("causal_lm"), method_cfg("freeze", trainable_blocks=9), "causal_lm", None)
    assert all(p.requires_grad for p in gpt2.transformer.h.parameters())
    assert not gpt2.transformer.wte.weight.requires_grad and not gpt2.lm_head.weight.requires_grad


def write_base(task: str, folder: Path) -> Path:
    """The base checkpoint a user starts from; classification: an encoder without the task's head."""
    model = BertModel(bert_config()) if task == "classification" else build(task)
    model.save_pretrained(folder)
    return folder


def load_base(task: str, folder: Path) -> nn.Module:
    if task == "classification":
        torch.manual_seed(5)  # the new classifier's init
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=LABELS)
    return type(build(task)).from_pretrained(folder)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(task, method, tmp_path):
    base_dir = write_base(task, tmp_path / "base")
    cfg = method_cfg(method)
    model = apply_method(load_base(task, base_dir), cfg, task, None)
    train(model, cfg, task)
    expected = outputs(model, task)
    save_trained(model, tmp_path / "out")
    loaded = load_trained(tmp_path / "out", task)
    assert torch.equal(outputs(loaded, task), expected)

    files = {f.name: f.stat().st_size for f in (tmp_path / "out").iterdir()}
    if method in ("full", "freeze"):
        assert files["model.safetensors"] > 4 * count_parameters(model)[1] * 0.9
        return
    weights = files["adapter_model.safetensors" if method != "adapters" else ADAPTER_WEIGHTS]
    trainable = count_parameters(model)[0]
    assert 4 * trainable <= weights <= 4 * trainable + 8192, (files, trainable)  # fp32 + a small header
    assert "model.safetensors" not in files
    assert weights < (base_dir / "model.safetensors").stat().st_size / 4


def test_load_trained_needs_a_base_for_adapters_trained_on_a_scratch_model(tmp_path):
    model = apply_method(build("causal_lm"), method_cfg("adapters"), "causal_lm", None)  # no name_or_path
    save_trained(model, tmp_path / "out")
    with pytest.raises(ValueError, match="pass base="):
        load_trained(tmp_path / "out", "causal_lm")
    write_base("causal_lm", tmp_path / "base")  # the same seed: the same weights the adapters were trained on
    loaded = load_trained(tmp_path / "out", "causal_lm", base=tmp_path / "base")
    assert torch.equal(outputs(loaded, "causal_lm"), outputs(model.eval(), "causal_lm"))


def test_two_lora_adapters_share_one_base_and_switch(tmp_path):
    base_dir = write_base("causal_lm", tmp_path / "base")
    expected = {}
    for name, seed in (("support", 1), ("sales", 7)):
        model = apply_method(load_base("causal_lm", base_dir), method_cfg("lora"), "causal_lm", None)
        train(model, method_cfg("lora"), "causal_lm", seed=seed)
        save_trained(model, tmp_path / name)
        expected[name] = outputs(model, "causal_lm")
    both = load_adapters(load_base("causal_lm", base_dir), {n: tmp_path / n for n in expected})
    prompt = batch("causal_lm", seed=99)["input_ids"][:1]
    generated = {}
    for name in ("support", "sales"):
        both.set_adapter(name)
        assert torch.equal(outputs(both, "causal_lm"), expected[name])
        generated[name] = both.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated[name].shape == (1, prompt.shape[1] + 4)
    assert not torch.equal(expected["support"], expected["sales"])


def test_qlora_refuses_cpu_before_any_work():
    cfg = TrainConfig(method="qlora")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        check_method_runtime(cfg, "cpu")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
            check_method_runtime(cfg, "cuda")
    check_method_runtime(TrainConfig(method="lora"), "cpu")
    quant = base_load_kwargs(cfg)["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4"
    assert base_load_kwargs(TrainConfig(method="lora")) == {}
    with pytest.raises(ValueError, match="4-bit"):
        apply_method(build("causal_lm"), cfg, "causal_lm", None)


def word_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "summarize", "the", "following"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


def test_prompt_tuning_text_init_and_logit_positions(tmp_path):
    cfg = method_cfg("prompt_tuning", num_virtual_tokens=5, prompt_init_text="summarize the following")
    model = apply_method(build("causal_lm"), cfg, "causal_lm", word_tokenizer(tmp_path / "tok"))
    prompt = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, model.get_base_model().transformer.wte.weight[[2, 3, 4, 2, 3]])  # text, repeated
    ids = batch("causal_lm")["input_ids"]
    assert model(input_ids=ids).logits.shape == (4, 5 + 8, VOCAB) and virtual_tokens(model) == 5
    with pytest.warns(UserWarning, match="Position ids are not supported"):  # PEFT drops them
        model(input_ids=ids, position_ids=torch.arange(8).repeat(4, 1))
    t5 = apply_method(build("seq2seq"), cfg, "seq2seq", tmp_path / "tok")
    assert t5(**batch("seq2seq")).logits.shape == (4, 5, VOCAB) and virtual_tokens(t5) == 0
    assert t5.prompt_encoder["default"].embedding.weight.shape == (5, 32)  # no unused decoder rows


def test_lora_on_real_minilm_classifier():
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    query_before = query.detach().clone()
    cfg = TrainConfig(method="lora", lr=1e-2)
    peft_model = apply_method(model, cfg, "classification", None)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"query", "value"}
    assert sum(hasattr(m, "lora_A") for m in peft_model.modules()) == 12  # 6 layers x (query, value)
    head = peft_model.base_model.model.classifier.modules_to_save["default"].weight
    head_before = head.detach().clone()
    optimizer = torch.optim.AdamW(parameter_groups(peft_model, cfg))
    ids = torch.randint(1000, 2000, (2, 8))
    peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert not torch.equal(head, head_before) and torch.equal(query, query_before)
