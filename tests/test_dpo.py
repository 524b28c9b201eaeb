"""Preference tuning (DPO), tested as TRL tests its trainer: the first step's loss is ln 2 with
zero rewards while the policy is the reference; one batch of 8 equals 8 accumulated batches of 1;
a tiny set is overfit to reward accuracy 1; every trainable parameter moves; and what it learned
holds on held-out pairs. Plus the pieces: the loss, pair tokenization and truncation, the loader,
the reference stage's reuse across hyperparameters, the chat form and its rejects.

    python -m pytest -q tests/test_dpo.py
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import read_jsonl, read_rejects, trainer_args

LN2 = math.log(2.0)


def pairs_jsonl(path: Path, rows: int = 160, seed: int = 0) -> Path:
    """Polite, helpful answers chosen over curt ones: a preference a 1-layer model learns in steps."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            item = rng.choice(["lamp", "kettle", "chair", "phone", "bike"])
            f.write(json.dumps({"prompt": f"Can you help me with my {item} number {i}?",
                                "chosen": f"Yes, happy to help with your {item}. Thank you for asking.",
                                "rejected": rng.choice(["No.", "Go away.", "Not my problem."])}) + "\n")
    return path


def dpo_config(tmp: Path, source: Path, **extra):
    from pipeline.config import build_config

    raw = {
        "task": "preference",
        "data": {"source": str(source)},
        "sample": {"validation_fraction": 0.2},
        "tokenize": {"block_size": 64, "vocab_size": 300},
        "model": {"init": "scratch", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 24, "lr": 5e-3, "warmup_steps": 0, "micro_batch_size": 8, "save_every_steps": 100,
                  "log_every_steps": 5},
        "evaluate": {"num_generations": 1, "max_new_tokens": 8, "min_reward_accuracy": 0.9},
        "registry": {"url": str(tmp / "registry"), "model_name": "dpo-tiny"},
    }
    return build_config(raw, [f"{k}={v}" for k, v in extra.items()])


# ---------------------------------------------------------------- the loss


def test_the_loss_is_ln2_and_the_rewards_zero_while_the_policy_is_the_reference():
    from pipeline.train.objectives import preference_loss, reward_metrics, sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(6, 10, 50)
    labels = torch.randint(0, 50, (6, 10))
    labels[:, :4] = -100
    reference = sequence_logps(logits, labels).double()
    loss, sums = preference_loss(logits, labels, reference, beta=0.1)
    assert abs(loss.item() / 3 - LN2) < 1e-6
    metrics = reward_metrics(sums, 3)
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0 and metrics["rewards/accuracies"] == 0.0


def test_the_loss_is_the_papers_formula():
    from pipeline.train.objectives import preference_loss, sequence_logps

    torch.manual_seed(1)
    logits, labels = torch.randn(4, 7, 30), torch.randint(0, 30, (4, 7))
    labels[:, :2] = -100
    reference = torch.tensor([-40.0, -42.0, -39.0, -41.0], dtype=torch.float64)
    beta = 0.5
    policy = sequence_logps(logits, labels).double()
    margin = beta * ((policy[:2] - reference[:2]) - (policy[2:] - reference[2:]))
    expected = -torch.log(torch.sigmoid(margin)).sum()
    loss, sums = preference_loss(logits, labels, reference, beta)
    assert abs(loss.item() - expected.item()) < 1e-4
    assert sums[2].item() == float((margin > 0).sum())


def test_sequence_log_probabilities_sum_the_labelled_next_tokens():
    from pipeline.train.objectives import sequence_logps

    torch.manual_seed(2)
    logits, labels = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, 4:] = -100  # right padding
    logp = torch.log_softmax(logits, -1)
    by_hand = [sum(logp[r, t - 1, labels[r, t]].item() for t in range(1, 6) if labels[r, t] != -100) for r in range(3)]
    assert torch.allclose(sequence_logps(logits, labels), torch.tensor(by_hand), atol=1e-5)
    # A soft prompt's positions in front are skipped.
    assert torch.allclose(sequence_logps(torch.cat([torch.randn(3, 4, 11), logits], 1), labels), torch.tensor(by_hand), atol=1e-5)


def test_the_head_on_target_positions_only_gives_the_same_log_probabilities():
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.train.objectives import TargetPositionsOnly, sequence_logps

    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 40, (4, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    full = sequence_logps(model(input_ids=ids).logits, labels)
    only = TargetPositionsOnly(model.get_output_embeddings())
    with only.selecting(labels):
        selected = model(input_ids=ids).logits
    assert selected.dim() == 2
    assert torch.allclose(sequence_logps(selected, labels), full, atol=1e-5)


# ---------------------------------------------------------------- pairs as tokens


def _ragged_prompts(lengths):
    ids = np.arange(sum(lengths), dtype=np.int32) % 50 + 10
    return ids, np.array(lengths, np.int64)


def test_pairs_alternate_chosen_and_rejected_with_only_the_answers_labelled():
    from pipeline.data.preference_tokens import text_pairs

    class Encoder:  # one token per character: lengths are checkable by eye
        def encode_batch(self, texts, add_special_tokens=False):
            return [type("E", (), {"ids": [ord(c) for c in t]}) for t in texts]

    rows = {"prompt": ["Q1?", "Q22?"], "chosen": ["yes", "sure"], "rejected": ["no", "nah!"]}
    pairs = text_pairs(rows, Encoder(), eos_id=0)
    assert pairs.lengths.tolist() == [3 + 3 + 1, 3 + 2 + 1, 4 + 4 + 1, 4 + 4 + 1]
    first = pairs.ids[pairs.offsets[0]:pairs.offsets[1]].tolist()
    assert first == [ord(c) for c in "Q1?yes"] + [0]
    labels = pairs.labels[pairs.offsets[1]:pairs.offsets[2]].tolist()
    assert labels == [-100] * 3 + [ord("n"), ord("o"), 0]


def test_truncation_keeps_pairs_whole(tmp_path):
    from pipeline.config import TokenizeConfig
    from pipeline.data.packing import Ragged, offsets_of
    from pipeline.data.preference_tokens import write_pairs

    def pair(prompt, chosen, rejected):
        seqs = []
        for answer in (chosen, rejected):
            seqs.append((np.ones(prompt + answer, np.int32), np.r_[np.full(prompt, -100), np.ones(answer)].astype(np.int32)))
        return seqs

    seqs = pair(4, 3, 2) + pair(20, 3, 3) + pair(6, 9, 2) + pair(2, 14, 2)  # block 12: fits, long prompt, long total, long answer
    flat = Ragged(np.concatenate([s[0] for s in seqs]), np.concatenate([s[1] for s in seqs]), offsets_of(np.array([len(s[0]) for s in seqs])))
    kept = {}
    for mode in ("right", "left", "prompt", "drop"):
        (tmp_path / mode).mkdir()
        stats = write_pairs(tmp_path / mode, flat, TokenizeConfig(block_size=12, truncation=mode))
        offsets = np.load(tmp_path / mode / "offsets.npy")
        labels = np.load(tmp_path / mode / "labels.npy")
        assert len(offsets) - 1 == 2 * stats["rows"]  # whole pairs only
        learned = [int((labels[a:b] != -100).sum()) for a, b in zip(offsets[:-1], offsets[1:])]
        assert all(n > 0 for n in learned), (mode, learned)  # every sequence keeps answer tokens
        kept[mode] = (stats["rows"], stats["dropped"], learned)
    assert kept["drop"][:2] == (1, 3)
    assert kept["right"][:2] == (3, 1)  # the 20-token prompt would leave no answer
    assert kept["prompt"][:2] == (3, 1) and kept["prompt"][2] == [3, 2, 3, 3, 9, 2]  # answers whole; the 14-token one dropped
    assert kept["left"][:2] == (4, 0)
    # An answer of exactly block_size tokens with a prompt before it cannot fit either.
    edge = pair(3, 12, 2)
    flat = Ragged(np.concatenate([s[0] for s in edge]), np.concatenate([s[1] for s in edge]), offsets_of(np.array([len(s[0]) for s in edge])))
    (tmp_path / "edge").mkdir()
    assert write_pairs(tmp_path / "edge", flat, TokenizeConfig(block_size=12, truncation="prompt"))["dropped"] == 1


def test_the_loader_puts_the_chosen_first_and_hands_each_row_its_reference(tmp_path):
    from pipeline.data.loader import REFERENCE_LOGPS, open_split

    (tmp_path / "tok" / "train").mkdir(parents=True)
    lengths = [3, 2, 4, 5, 2, 2]
    np.save(tmp_path / "tok" / "train" / "input_ids.npy", np.arange(1, sum(lengths) + 1, dtype=np.int32))
    np.save(tmp_path / "tok" / "train" / "labels.npy", np.arange(1, sum(lengths) + 1, dtype=np.int32))
    np.save(tmp_path / "tok" / "train" / "offsets.npy", np.r_[0, np.cumsum(lengths)].astype(np.int64))
    (tmp_path / "tok" / "meta.json").write_text(json.dumps({"task": "preference", "packing": "none", "block_size": 8, "pad_id": 0}))
    (tmp_path / "ref" / "train").mkdir(parents=True)
    np.save(tmp_path / "ref" / "train" / REFERENCE_LOGPS, np.array([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]))
    pairs = open_split(tmp_path / "tok" / "train", tmp_path / "ref")
    assert len(pairs) == 3 and pairs.lengths.tolist() == [3, 5, 2]
    batch = pairs.batch([2, 0])
    assert batch["input_ids"].tolist() == [[15, 16, 0], [1, 2, 3], [17, 18, 0], [4, 5, 0]]
    assert batch["reference_logps"].tolist() == [-5.0, -1.0, -6.0, -2.0]
    assert pairs.real_tokens([2, 0]) == 2 + 3 + 2 + 2


# ---------------------------------------------------------------- preprocess: both forms, rejects


def test_the_chat_form_renders_prompts_and_rejects_bad_answers_naming_the_column(tmp_path):
    from pipeline.stages import run_stages

    rows = [
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Help with my lamp?"}],
         "chosen": [{"role": "assistant", "content": "Gladly, here is how."}], "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": "A plain question?", "chosen": "A plain, kind answer.", "rejected": "Meh."},
        {"prompt": [{"role": "user", "content": "Two answers?"}],
         "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": "x"},
        {"prompt": [{"role": "user", "content": "Same?"}], "chosen": "same", "rejected": "same"},
    ] * 6
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dpo_config(tmp_path, source, **{"preprocess.template": "chat", "sample.validation_fraction": 0.0,
                                          "data.max_reject_fraction": 1.0})
    results = {r.name: r for r in run_stages(cfg, str(tmp_path / "runs"), until="tokenize", log=lambda _: None)}
    reasons = sorted({r["reason"].split(":")[0] + ":" + r["reason"].split(":")[1] for r in read_rejects(Path(results["preprocess"].output))})
    assert reasons == ["invalid_messages: chosen", "same_answers: chosen and rejected are the same text"]
    tok = Path(results["tokenize"].output)
    assert json.loads((tok / "meta.json").read_text())["splits"]["train"]["rows"] == 12
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok / "tokenizer")
    ids, labels, offsets = (np.load(tok / "train" / f"{n}.npy") for n in ("input_ids", "labels", "offsets"))
    texts = {tokenizer.decode(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])}
    answers = {tokenizer.decode(ids[a:b][labels[a:b] != -100]) for a, b in zip(offsets[:-1], offsets[1:])}
    assert any("Be kind." in t and "Help with my lamp?" in t for t in texts)
    assert {a.replace("<|im_end|>", "").strip() for a in answers} == {"Gladly, here is how.", "No.", "A plain, kind answer.", "Meh."}


def test_a_preference_config_names_what_is_wrong():
    from pipeline.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="preprocess.template 'instruction'"):
        build_config({"task": "preference", "preprocess": {"template": "instruction"}}, [])
    cfg = build_config({"task": "preference"}, [])
    assert cfg.fingerprint_section("train")["dpo_beta"] == 0.1
    plain = build_config({}, [])
    assert "dpo_beta" not in plain.fingerprint_section("train")
    assert "min_reward_accuracy" not in plain.fingerprint_section("evaluate")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    from pipeline.stages import run_stages

    root = tmp_path_factory.mktemp("dpo")
    source = pairs_jsonl(root / "pairs.jsonl")
    cfg = dpo_config(root, source)
    results = {r.name: r for r in run_stages(cfg, str(root / "runs"), log=lambda _: None)}
    return {"root": root, "source": source, "cfg": cfg, "results": results}


@pytest.mark.integration
def test_the_first_step_is_ln2_and_a_tiny_set_is_overfit_to_reward_accuracy_1(dpo_run):
    log = read_jsonl(Path(dpo_run["results"]["train"].output) / "train_log.jsonl")
    assert abs(log[0]["loss"] - LN2) < 1e-5
    assert abs(log[0]["rewards/chosen"]) < 1e-4 and abs(log[0]["rewards/rejected"]) < 1e-4
    assert log[-1]["rewards/accuracies"] == 1.0 and log[-1]["loss"] < 0.05
    assert log[-1]["rewards/margins"] > log[4]["rewards/margins"] > 0


@pytest.mark.integration
def test_held_out_pairs_are_ranked_right_and_the_gate_reads_them(dpo_run):
    metrics = json.loads((Path(dpo_run["results"]["evaluate"].output) / "metrics.json").read_text())
    reference = dpo_run["results"]["reference"].stats["splits"]["validation"]
    assert metrics["task"] == "preference" and metrics["split"] == "validation" and metrics["examples"] == 32
    # The reference (the scratch initialisation) ranks held-out pairs by chance or worse; DPO ranks them all.
    assert reference["reference_prefers_chosen"] < 0.9
    assert metrics["rewards/accuracies"] == 1.0 and metrics["rewards/margins"] > 1.0
    assert metrics["eval_loss"] < 0.1 < LN2
    assert metrics["gate"] == {"thresholds": {"min_reward_accuracy": 0.9}, "passed": True, "failed": []}
    assert dpo_run["results"]["publish"].stats["rewards/accuracies"] == 1.0


@pytest.mark.integration
def test_every_trainable_parameter_changes(dpo_run):
    from transformers import AutoModelForCausalLM

    from pipeline.train.modeling import build_model

    tok = Path(dpo_run["results"]["tokenize"].output)
    meta = json.loads((tok / "meta.json").read_text())
    cfg = dpo_run["cfg"]
    start = dict(build_model(cfg.model, "causal_lm", meta, cfg.train.seed).named_parameters())
    trained = AutoModelForCausalLM.from_pretrained(Path(dpo_run["results"]["train"].output) / "model")
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p.detach(), start[n].detach())]
    assert not unchanged
    assert len(start) == len(dict(trained.named_parameters()))


@pytest.mark.integration
def test_a_second_run_with_another_beta_reuses_the_reference(dpo_run):
    from pipeline.stages import plan

    first = dpo_run["results"]
    other = dpo_config(dpo_run["root"], dpo_run["source"], **{"train.dpo_beta": 0.5, "train.lr": 1e-3})
    planned = plan(other)
    assert planned["reference"] == first["reference"].fingerprint
    assert planned["train"] != first["train"].fingerprint
    # Another base (here another scratch seed) is another reference.
    assert plan(dpo_config(dpo_run["root"], dpo_run["source"], **{"train.seed": 1}))["reference"] != first["reference"].fingerprint
    # Configs of other tasks never see the stage.
    from pipeline.config import build_config

    assert "reference" not in plan(build_config({}, []))


@pytest.mark.integration
def test_one_batch_of_8_equals_8_accumulated_batches_of_1_and_2_ranks_of_4(dpo_run, tmp_path):
    """Accumulation and data parallelism change nothing: the loss is divided by the pairs of the
    whole global step, and the reward sums are all-reduced (2 ranks through real torchrun, gloo)."""
    import subprocess
    import sys

    from pipeline.train import recipe

    results = dpo_run["results"]
    tok, ref = results["tokenize"].output, results["reference"].output
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": "preference", "model": dpo_run["cfg"].model.model_dump(), "train": dpo_run["cfg"].train.model_dump()}))
    runs = {}
    for name, micro, accum in (("8x1", 8, 1), ("1x8", 1, 8)):
        args = trainer_args(tok, tmp_path / name, f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}",
                            "train.max_steps=3", "train.tensorboard=false", config=config)
        assert recipe.main([*args, "--reference", ref]) == 0
        runs[name] = read_jsonl(tmp_path / name / "out" / "train_log.jsonl")
    args = trainer_args(tok, tmp_path / "2x4", "train.micro_batch_size=4", "train.max_steps=3", "train.tensorboard=false", config=config)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline.train",
                    *args, "--reference", ref], check=True, capture_output=True, timeout=300)
    runs["2x4"] = read_jsonl(tmp_path / "2x4" / "out" / "train_log.jsonl")
    assert len(runs["8x1"]) == len(runs["1x8"]) == len(runs["2x4"]) == 3
    for other in ("1x8", "2x4"):
        for a, b in zip(runs["8x1"], runs[other]):
            for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"):
                assert abs(a[key] - b[key]) < 1e-5, (other, key, a, b)
    assert abs(runs["8x1"][0]["loss"] - LN2) < 1e-5
