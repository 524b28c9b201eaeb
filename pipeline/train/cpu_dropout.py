"""Dropout that costs less on CPU (`train.fast_cpu_dropout`, opt-in, CPU only; CUDA is left alone).

Measured on the quickstart's GPT-2 (2 x 128, blocks of 256, batch 8, 2 cores): torch's CPU
`bernoulli_` took 25% of a training step, most of it the attention-probability masks
(batch x heads x T x T elements, drawn one at a time from mt19937). Here a mask takes 16 random
bits per element, drawn 64 at a time with `torch.randint`, and attention dropout runs in a math
path of ours instead of SDPA's fallback: the step is 1.2-1.4x faster (alternating runs), the model unchanged.

What differs from `torch.nn.Dropout`: the drop probability is rounded to a multiple of 1/65536
(0.1 -> 0.100006), and masks come from another stream of the same torch generator, so a run is as
reproducible as before (the trainer seeds every step) but draws other masks than a run without it.

`install(model)` swaps every `nn.Dropout` module (LoRA's included) for `BitsDropout` and, for
models that call attention through transformers' interface with `sdpa`, sets the attention
implementation to ours: in eval mode, or at dropout 0, it is exactly transformers' sdpa. The
name is not saved: `config.json` never holds the internal attention setting.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "tunepipe_cpu_sdpa"
_BITS = 16
_masks: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> the causal square, see _causal_bias
_last_bool_mask: list = [None, None]  # (bool mask, its additive form), see _additive


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of `shape`, True with probability round(p * 2^16) / 2^16 (the elements to drop)."""
    n = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    bits = words.view(torch.int16)[:n]  # four uniform 16-bit draws per 64-bit word
    return (bits < -(2 ** (_BITS - 1)) + round(p * 2**_BITS)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    keep = ~drop_mask(x.shape, p, x.device)
    # x * bool: autograd keeps the 1-byte mask for backward; the scale goes on in place after.
    return (x * keep).mul_(1.0 / (1.0 - p))


class BitsDropout(nn.Module):
    """`nn.Dropout` with the cheaper mask above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _causal_bias(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[q, k] additive mask: 0 where a query may attend (bottom-right aligned), dtype-min elsewhere.

    Training has q == k: those are top-left slices of one cached square, grown to the longest seen
    (one tensor per dtype and device, not one per length)."""
    if q_len != k_len:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    square = _masks.get((dtype, device))
    if square is None or square.shape[0] < q_len:
        allowed = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        square = _masks[(dtype, device)] = torch.zeros(q_len, q_len, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return square[:q_len, :q_len]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = may attend) as an additive one. Every layer of a forward gets the same
    mask object, so the last conversion is kept and reused instead of redone per layer."""
    if _last_bool_mask[0] is not mask or _last_bool_mask[1].dtype != dtype:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        _last_bool_mask[:] = [mask, bias]
    return _last_bool_mask[1]


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: softmax(q k^T * scale + mask), dropout, @ v.

    Without dropout (eval, generation) this is transformers' own sdpa. With it, it is what SDPA's
    math fallback computes on CPU, with the cheaper mask and the 1/(1-p) scale applied to the
    [T, head_dim] output instead of the [T, T] probabilities. Shapes in: [batch, heads, T, d].
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not dropout or not module.training or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // value.shape[1])
    b, h, q_len, d = query.shape
    k_len = key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    q, k_t = query.reshape(b * h, q_len, d), key.reshape(b * h, k_len, d).transpose(1, 2)
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_len > 1:
            scores = torch.baddbmm(_causal_bias(q_len, k_len, query.dtype, query.device), q, k_t, alpha=scaling)
        else:
            scores = torch.bmm(q, k_t) * scaling
    else:
        if attention_mask.dtype == torch.bool:  # True = may attend (padding and packed documents masked)
            attention_mask = _additive(attention_mask, query.dtype)
        scores = (torch.bmm(q, k_t) * scaling).view(b, h, q_len, k_len).add_(attention_mask).view(b * h, q_len, k_len)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = probs * ~drop_mask(probs.shape, dropout, probs.device)
    out = torch.bmm(probs, value.reshape(b * h, k_len, -1)).mul_(1.0 / (1.0 - dropout))
    return out.view(b, h, q_len, -1).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks sdpa gets: bool, or None for plain causal


def install(model: nn.Module) -> int:
    """Swap the model's dropout for the cheaper one (see the module docstring); returns how many
    dropout modules were swapped. Call before wrapping the model for DDP or DeepSpeed."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, BitsDropout(child.p))
                swapped += 1
    _register()
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = ATTENTION
    return swapped
