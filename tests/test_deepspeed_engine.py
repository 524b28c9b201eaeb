"""DeepSpeed config resolution (fast) and DeepSpeedReplica under real torchrun (integration, slow).

    .venv/bin/python -m pytest -q -m "not integration" tests/test_deepspeed_engine.py  # fast tier
    .venv/bin/python -m pytest -q tests/test_deepspeed_engine.py                       # + 2 gloo ranks, ZeRO-3

The integration test runs this file as the torchrun worker (see `worker` at the bottom): one
launch of 2 CPU ranks that checks ZeRO-3 against torch DDP after a step with gradient
accumulation, and that 2 steps + save + load into a fresh engine + 2 steps equals 4 straight
steps bit for bit. About 20 s on a quiet machine, over a minute on a busy 2-core one; the first
DeepSpeed run on a machine adds ~1 min while it compiles its shared-memory comm op into
~/.cache/torch_extensions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.train.parallel.zero import DeepSpeedReplica  # noqa: E402
from pipeline.train.parallel.zero_config import DeepSpeedConfigError, resolve_config  # noqa: E402

SHIPPED = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


# ---------------------------------------------------------------- resolve_config (fast)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_is_filled_from_the_train_config(name):
    cfg = TrainConfig(micro_batch_size=3, grad_accum_steps=5, max_grad_norm=0.7, precision="fp32")
    ds = resolve_config(name, cfg, world_size=2, device_type="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == SHIPPED[name]
    assert [k for k, v in _leaves(ds) if v == "auto"] == []
    assert "optimizer" not in ds and "scheduler" not in ds


def test_the_shipped_file_is_not_modified():
    before = (ROOT / "deepspeed_configs" / "zero2.json").read_text()
    resolve_config("zero2", TrainConfig(micro_batch_size=7), 1, "cpu")
    assert (ROOT / "deepspeed_configs" / "zero2.json").read_text() == before


@pytest.mark.parametrize(
    ("precision", "device", "cuda_bf16", "bf16"),
    [("fp32", "cuda", True, False), ("bf16", "cpu", False, True), ("auto", "cpu", True, False), ("auto", "cuda", True, True), ("auto", "cuda", False, False)],
)
def test_bf16_follows_train_precision(monkeypatch, precision, device, cuda_bf16, bf16):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    ds = resolve_config("zero3", TrainConfig(precision=precision), 2, device)
    assert ds["bf16"]["enabled"] is bf16


def test_fp16_turns_on_dynamic_loss_scaling():
    ds = resolve_config("zero2", TrainConfig(precision="fp16"), 2, "cuda")
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0}
    assert ds["bf16"]["enabled"] is False


def _write(tmp_path, **overrides) -> str:
    base = json.loads((ROOT / "deepspeed_configs" / "zero2.json").read_text())
    base.update(overrides)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(base))
    return str(path)


def test_a_hard_coded_micro_batch_that_disagrees_names_the_key(tmp_path):
    path = _write(tmp_path, train_micro_batch_size_per_gpu=16)
    with pytest.raises(DeepSpeedConfigError, match=r"train_micro_batch_size_per_gpu = 16 contradicts train.micro_batch_size = 8"):
        resolve_config(path, TrainConfig(micro_batch_size=8), 2, "cpu")


def test_hard_coded_values_that_agree_are_accepted(tmp_path):
    path = _write(tmp_path, train_micro_batch_size_per_gpu=8, gradient_clipping=1, train_batch_size=8 * 2 * 4)
    ds = resolve_config(path, TrainConfig(micro_batch_size=8, grad_accum_steps=2, max_grad_norm=1.0), 4, "cpu")
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps = 4 contradicts train.grad_accum_steps = 1"),
        ({"gradient_clipping": 0.5}, "gradient_clipping = 0.5 contradicts train.max_grad_norm = 1.0"),
        ({"train_batch_size": 10}, "train_batch_size = 10 contradicts"),
        ({"bf16": {"enabled": True}}, "bf16.enabled = True contradicts train.precision='fp32'"),
        ({"fp16": {"enabled": True}}, "fp16.enabled = True contradicts train.precision='fp32'"),
        ({"train_micro_batch_size_per_gpu": True}, "train_micro_batch_size_per_gpu = True contradicts"),
    ],
)
def test_contradictions_are_refused(tmp_path, overrides, key):
    with pytest.raises(DeepSpeedConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
        resolve_config(_write(tmp_path, **overrides), TrainConfig(micro_batch_size=8, precision="fp32"), 2, "cpu")


def test_an_auto_no_train_setting_fills_is_named(tmp_path):
    path = _write(tmp_path, zero_optimization={"stage": 2, "reduce_bucket_size": "auto"})
    with pytest.raises(DeepSpeedConfigError, match=r"no train setting fills zero_optimization\.reduce_bucket_size"):
        resolve_config(path, TrainConfig(), 2, "cpu")


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_an_optimizer_or_scheduler_section_is_refused(tmp_path, section):
    with pytest.raises(DeepSpeedConfigError, match=f"has an '{section}' section"):
        resolve_config(_write(tmp_path, **{section: {"type": "AdamW"}}), TrainConfig(), 2, "cpu")


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(DeepSpeedConfigError, match=r"zero4.*\['zero1', 'zero2', 'zero3', 'zero3_offload'\]"):
        resolve_config("zero4", TrainConfig(), 2, "cpu")


def test_a_missing_zero_stage_is_refused(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.stage must be 1, 2 or 3"):
        resolve_config(_write(tmp_path, zero_optimization={"stage": 0}), TrainConfig(), 2, "cpu")


# ---------------------------------------------------------------- load guards (fast, no engine)


class _NoEngine:
    """Stands in for a DeepSpeed engine: load() must refuse before it is ever used."""

    def zero_optimization_stage(self):
        return 3

    def fp16_enabled(self):
        return False

    module = None

    def load_checkpoint(self, *a, **k):
        raise AssertionError("load_checkpoint reached")


def _fake_checkpoint(folder: Path, world_size: int, shards: int) -> None:
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "deepspeed_replica.json").write_text(json.dumps({"world_size": world_size, "zero_stage": 3, "tag": "deepspeed"}))
    for r in range(shards):
        (folder / "deepspeed" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")


def _info(world_size):
    import torch

    from pipeline.train.parallel.dist import DistInfo

    return DistInfo(0, 0, world_size, "gloo", torch.device("cpu"))


def test_loading_at_another_world_size_names_both(tmp_path):
    _fake_checkpoint(tmp_path, world_size=2, shards=2)
    replica = DeepSpeedReplica(_NoEngine(), _info(4), grad_accum_steps=1)
    with pytest.raises(RuntimeError, match="saved by 2 ranks but this run has 4"):
        replica.load(tmp_path)


def test_a_checkpoint_missing_a_shard_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, world_size=2, shards=1)
    with pytest.raises(RuntimeError, match="says world size 2 but 1 optimizer shards"):
        DeepSpeedReplica(_NoEngine(), _info(2), grad_accum_steps=1).load(tmp_path)


def test_a_ddp_checkpoint_is_not_mistaken_for_a_deepspeed_one(tmp_path):
    (tmp_path / "replica.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="train.strategy=ddp"):
        DeepSpeedReplica(_NoEngine(), _info(2), grad_accum_steps=1).load(tmp_path)


# ---------------------------------------------------------------- 2 ranks under torchrun


@pytest.mark.integration
@pytest.mark.slow
def test_zero3_matches_ddp_and_resumes_bit_exact(tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "worker", str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())

    # Same gradient as DDP (sum over micro-steps of the rank average). Letting DeepSpeed divide
    # by grad_accum again measured: half the norm, and weights 9e-5 off instead of 2e-8.
    assert result["grad_norm_ddp"] == pytest.approx(result["grad_norm_zero3"], rel=1e-5)
    assert result["max_abs_diff_vs_ddp"] < 1e-5
    assert result["max_abs_change"] > 1e-4  # the step did move the weights
    # Resume: bit-identical weights and the same grad norms after the reload.
    assert result["keys_match_module"] and result["rank1_got_none"] and result["all_fp32_cpu"]
    assert result["bit_identical"], result["max_abs_diff_resume"]
    assert result["norms_resumed"] == result["norms_straight"][2:]
    files = sorted(p.name for p in (tmp_path / "ckpt" / "deepspeed").iterdir())
    assert [f for f in files if f.endswith("optim_states.pt")] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]


def worker(out: Path) -> None:
    """torchrun side of the integration test (2 gloo ranks)."""
    from contextlib import nullcontext

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.train.parallel.zero import deepspeed_replica
    from pipeline.train.parallel.dist import init_distributed

    info = init_distributed()
    rank, world, accum, micro, lr = info.rank, info.world_size, 2, 2, 1e-3
    cfg = TrainConfig(micro_batch_size=micro, grad_accum_steps=accum, max_grad_norm=1.0, lr=lr, precision="fp32",
                      strategy="deepspeed", deepspeed_config="zero3")

    def model():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2)).train()

    def groups(m):
        decay = [p for p in m.parameters() if p.ndim >= 2]
        rest = [p for p in m.parameters() if p.ndim < 2]
        return [{"params": decay, "lr": lr, "initial_lr": lr, "weight_decay": 0.01},
                {"params": rest, "lr": 2 * lr, "initial_lr": 2 * lr, "weight_decay": 0.0}]

    def train(forward, backward, step_fn, steps, micro_step=lambda last: nullcontext()):
        norms = []
        for s in steps:
            torch.manual_seed(10_007 * s + rank)  # the trainer's per-step dropout seed (seed 0)
            g = torch.Generator().manual_seed(100 * s + rank)
            batches = [torch.randint(0, 96, (micro, 16), generator=g) for _ in range(accum)]
            labels = [b.clone() for b in batches]
            for m, y in enumerate(labels):
                y[:, : 2 + m + 3 * rank] = -100  # targets differ per rank and micro-step
            count = torch.tensor([float(sum(int((y[:, 1:] != -100).sum()) for y in labels))], dtype=torch.float64)
            dist.all_reduce(count)
            for m, (ids, y) in enumerate(zip(batches, labels)):
                with micro_step(m == accum - 1):
                    logits = forward(input_ids=ids, use_cache=False).logits
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100, reduction="sum")
                    backward(loss * world / count.item(), m == accum - 1)
            norms.append(step_fn(0.5 + 0.25 * s))
        return norms

    # DDP reference: one step, exactly what pipeline.train.parallel.ddp does.
    ref = model()
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    ddp = torch.nn.parallel.DistributedDataParallel(ref)
    opt = torch.optim.AdamW(groups(ref), betas=(0.9, 0.95), eps=1e-8)

    def ddp_micro_step(last):  # DDP reads the flag in forward: the context covers forward + backward
        return nullcontext() if last else ddp.no_sync()

    def ddp_step(mult):
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        for grp in opt.param_groups:
            grp["lr"] = grp["initial_lr"] * mult
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    ddp_norm = train(ddp, lambda loss, last: loss.backward(), ddp_step, range(1), ddp_micro_step)
    ddp_state = ref.state_dict()

    # One engine for both checks (each engine costs seconds to start): its first step against
    # DDP's, then on to step 4 for the resume comparison. Gathering the full state is read-only.
    m2 = model()
    straight = deepspeed_replica(m2, groups(m2), cfg, info)
    zero_norm = train(straight.forward, straight.backward, straight.step, range(1))
    zero_state = straight.full_state_dict()
    norms_straight = zero_norm + train(straight.forward, straight.backward, straight.step, range(1, 4))
    final_straight = straight.full_state_dict()

    m3 = model()
    first = deepspeed_replica(m3, groups(m3), cfg, info)
    train(first.forward, first.backward, first.step, range(2))
    first.save(out / "ckpt")
    m4 = model()
    second = deepspeed_replica(m4, groups(m4), cfg, info)  # a fresh engine: nothing carried over
    second.load(out / "ckpt")
    norms_resumed = train(second.forward, second.backward, second.step, range(2, 4))
    final_resumed = second.full_state_dict()

    if rank == 0:
        def diff(a, b):
            return max((a[k] - b[k]).abs().max().item() for k in a)

        result = {
            "grad_norm_ddp": ddp_norm[0],
            "grad_norm_zero3": zero_norm[0],
            "max_abs_diff_vs_ddp": diff(ddp_state, zero_state),
            "max_abs_change": diff(initial, zero_state),
            "keys_match_module": list(final_resumed) == list(m4.state_dict()),
            "all_fp32_cpu": all(v.dtype == torch.float32 and v.device.type == "cpu" for v in final_resumed.values()),
            "bit_identical": all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight),
            "max_abs_diff_resume": diff(final_straight, final_resumed),
            "norms_straight": norms_straight,
            "norms_resumed": norms_resumed,
        }
    got_none = [None] * world
    dist.all_gather_object(got_none, final_resumed is None and zero_state is None)
    if rank == 0:
        result["rank1_got_none"] = got_none[1]
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(Path(sys.argv[2]))
