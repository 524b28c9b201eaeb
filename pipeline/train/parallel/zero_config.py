"""DeepSpeed JSON presets (deepspeed_configs/) resolved against the train config.

`resolve_config` turns a preset name or a JSON path into the dict handed to `deepspeed.initialize`,
filling every "auto" from the train config (deepspeed_configs/README.md) and refusing a value that
contradicts it, naming the key. It imports neither DeepSpeed nor torch.distributed, so the
orchestrator's preflight calls it before any stage runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any


from pipeline.config import TrainConfig

def _shipped_presets() -> Path:
    # An installed copy carries them as pipeline/deepspeed_configs (setup.py); a checkout has them
    # at the top of the repo, where users look for them.
    installed = Path(__file__).resolve().parents[2] / "deepspeed_configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[3] / "deepspeed_configs"


CONFIG_DIR = _shipped_presets()
# Built by the trainer from train.*; a file that brings its own would silently win or clash.
_FORBIDDEN_SECTIONS = ("optimizer", "scheduler")


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON that cannot be used with this train config."""


def config_path(name_or_path: str) -> Path:
    """The file behind `train.deepspeed_config`: a shipped preset by name, else a path."""
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    path = shipped if shipped.is_file() else Path(name_or_path).expanduser()
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise DeepSpeedConfigError(f"train.deepspeed_config={name_or_path!r}: neither one of {names} nor an existing JSON file")
    return path


def config_digest(name_or_path: str) -> str:
    """sha256 of the chosen JSON: part of the train stage's fingerprint (an edited preset retrains)."""
    return hashlib.sha256(config_path(name_or_path).read_bytes()).hexdigest()


def _load_json(name_or_path: str) -> tuple[dict, str]:
    path = config_path(name_or_path)
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path}: not valid JSON ({e})") from None

def _wants_bf16(cfg: TrainConfig, device_type: str) -> bool:
    if cfg.precision == "bf16":
        return True
    if cfg.precision == "auto":
        import torch  # here, not at the top: config_digest is on a cached run's path, which skips torch

        return device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def _fill(ds: dict, key_path: str, wanted: Any, source: str, where: str) -> None:
    """Set ds[key_path] to `wanted` when it is "auto" or absent; refuse a different hard-coded value."""
    *parents, leaf = key_path.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise DeepSpeedConfigError(f"{where}: {'.'.join(parents)} must be an object")
    given = node.get(leaf, "auto")
    if given == "auto":
        node[leaf] = wanted
        return
    if isinstance(wanted, (bool, int)):
        same = type(given) is type(wanted) and given == wanted  # 1 is not true, 8.0 is not a batch size
    else:
        same = isinstance(given, (int, float)) and not isinstance(given, bool) and math.isclose(given, wanted)
    if not same:
        raise DeepSpeedConfigError(
            f"{where}: {key_path} = {given!r} contradicts {source} = {wanted!r}; "
            f'set it to "auto" so it is filled from the train config'
        )


def _leftover_autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _leftover_autos(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _leftover_autos(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def resolve_config(name_or_path: str, cfg: TrainConfig, world_size: int, device_type: str) -> dict:
    """The DeepSpeed config dict for `deepspeed.initialize`: the named file with every "auto" filled.

    `name_or_path`: zero1 | zero2 | zero3 | zero3_offload (deepspeed_configs/) or a JSON path.
    Raises DeepSpeedConfigError naming the key when a value contradicts `cfg` or an "auto" is left.
    """
    raw, where = _load_json(name_or_path)
    if not isinstance(raw, dict):
        raise DeepSpeedConfigError(f"{where}: must hold a JSON object")
    ds = copy.deepcopy(raw)
    for section in _FORBIDDEN_SECTIONS:
        if section in ds:
            raise DeepSpeedConfigError(
                f"{where}: has an {section!r} section; the trainer builds its own AdamW and warmup-cosine "
                "schedule from train.lr / weight_decay / warmup_steps / min_lr_ratio, remove it"
            )
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "train.micro_batch_size", where)
    _fill(ds, "gradient_accumulation_steps", cfg.grad_accum_steps, "train.grad_accum_steps", where)
    _fill(ds, "gradient_clipping", float(cfg.max_grad_norm), "train.max_grad_norm", where)
    if "train_batch_size" in ds:  # optional; DeepSpeed derives it, but a stated one must agree
        global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * world_size
        _fill(ds, "train_batch_size", global_batch, "micro_batch_size x grad_accum_steps x world size", where)
    bf16, fp16 = _wants_bf16(cfg, device_type), cfg.precision == "fp16"
    _fill(ds, "bf16.enabled", bf16, f"train.precision={cfg.precision!r} on {device_type}", where)
    if fp16 or "fp16" in ds:
        _fill(ds, "fp16.enabled", fp16, f"train.precision={cfg.precision!r}", where)
        if fp16:
            ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling, as the precision docstring promises
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise DeepSpeedConfigError(f"{where}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    left = _leftover_autos(ds)
    if left:
        raise DeepSpeedConfigError(f"{where}: no train setting fills {', '.join(left)}; replace \"auto\" with a value")
    return ds
