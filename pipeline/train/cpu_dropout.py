"""Dropout that costs less on CPU (`train.fast_cpu_dropout`, opt-in, CPU only; CUDA is left alone).

Measured on the quickstart's GPT-2 (2 x 128, blocks of 256, batch 8, 2 cores): torch's CPU
`bernoulli_` took 25% of a training step, most of it the attention-probability masks
(batch x heads x T x T elements, drawn one at a time from mt19937). Here a mask takes 16 random
bits per element, drawn 64 at a time with `torch.randint`, and attention dropout runs in a math
path of ours instead of SDPA's fallback: the step is 1.2-1.4x faster (alternating runs), the model unchanged.
Causal attention (training, fp32) goes further: `_CausalBlocksAttention` works in blocks of queries and
skips most of the [T, T] square above the diagonal, with the same masks (35 % less time a layer).

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


def _uniform_bits(n: int, device: torch.device) -> torch.Tensor:
    """n uniform int16 draws: four per 64-bit word of one `torch.randint` (the torch generator's stream)."""
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n]


def _drop_below(p: float) -> int:
    """A draw below this is dropped: probability round(p * 2^16) / 2^16."""
    return -(2 ** (_BITS - 1)) + round(p * 2**_BITS)


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of `shape`, True with probability round(p * 2^16) / 2^16 (the elements to drop)."""
    return (_uniform_bits(shape.numel(), device) < _drop_below(p)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.dtype not in (torch.float32, torch.float64):
        # bf16 could not hold 1/(1-p) exactly (1.109375 for 1.1111): a bool mask, then the scale.
        return (x * ~drop_mask(x.shape, p, x.device)).mul_(1.0 / (1.0 - p))
    # Multipliers (0 or 1/(1-p)), kept by autograd for backward: a product with a bool mask casts
    # it first, forward and backward (0.35 against 0.55 ms for [8, 256, 128], both ways).
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ge(_uniform_bits(x.numel(), x.device).view(x.shape), _drop_below(p), out=keep)
    return x * keep.mul_(1.0 / (1.0 - p))


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
    bias = _blockable_bias(module, query, key, attention_mask, is_causal)
    if bias is not None:
        shape = (b * h, q_len, d)
        out = _CausalBlocksAttention.apply(query.reshape(shape), key.reshape(shape), value.reshape(shape), bias, scaling, dropout, h)
        return out.view(b, h, q_len, d).transpose(1, 2).contiguous(), None
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


# ---------------------------------------------------------------- causal attention in blocks of queries

QUERY_BLOCK = 64
"""Queries per block. Block i's queries see only keys up to its last row, so the [T, T] work above
the diagonal (scores, softmax, dropout, their gradients: half of it) is mostly skipped: at T = 256,
4 blocks do 10/16 of the dense work. Measured on 2 cores (8 x 4 heads x 256 x 32, p = 0.1, forward
+ backward): 9.4-11.2 ms against the dense path's 15.2-15.9; blocks of 128 gave 10.5-12.4, of 32
10.4-11.7 (more, smaller calls)."""


def _blockable_bias(module, query, key, attention_mask, is_causal) -> torch.Tensor | None:
    """The additive bias for `_CausalBlocksAttention`, or None where it does not apply: not causal
    (an encoder), a KV cache (queries != keys), a mask not given per query, or not plain fp32
    (autocast and half precision keep the dense path, whose softmax runs in fp32)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len != k_len or query.dtype != torch.float32 or torch.is_autocast_enabled(query.device.type):
        return None
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return _causal_bias(q_len, k_len, query.dtype, query.device) if causal and q_len > 1 else None
    # A mask (padding, packed documents) combined with causality: transformers builds it causal for
    # a causal module, so keys after a block's last query are masked anyway.
    if getattr(module, "is_causal", False) is not True or attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q_len, k_len):
        return None
    if attention_mask.shape[1] not in (1, query.shape[1]):
        return None
    return _additive(attention_mask, query.dtype) if attention_mask.dtype == torch.bool else attention_mask


def _spans(length: int) -> list[tuple[int, int]]:
    return [(start, min(length, start + QUERY_BLOCK)) for start in range(0, length, QUERY_BLOCK)]


def _keep_multipliers(batch_heads: int, length: int, p: float, device: torch.device, spans) -> list[torch.Tensor]:
    """Per block, fp32 0 or 1/(1-p): drawn from one [batch_heads, T, T] square of bits, as the dense
    path draws (`drop_mask`), so both keep the same elements. fp32 multipliers, not bool: a product
    with a bool tensor casts it first, 6x the cost of a plain one here."""
    bits = _uniform_bits(batch_heads * length * length, device).view(batch_heads, length, length)
    masks = []
    for start, end in spans:
        keep = torch.empty(batch_heads, end - start, end, dtype=torch.float32, device=device)
        torch.ge(bits[:, start:end, :end], _drop_below(p), out=keep)
        masks.append(keep.mul_(1.0 / (1.0 - p)))
    return masks


def _block_scores(q, k, bias, scaling: float, heads: int, start: int, end: int) -> torch.Tensor:
    """softmax(q k^T * scale + bias) of the queries [start, end) over the keys [0, end)."""
    keys_t = k[:, :end].transpose(1, 2)
    if bias.dim() == 2:  # the causal square: one bias for every (batch, head)
        scores = torch.baddbmm(bias[start:end, :end], q[:, start:end], keys_t, alpha=scaling)
    else:  # [batch, 1 or heads, T, T]
        rows = end - start
        scores = torch.bmm(q[:, start:end], keys_t).mul_(scaling)
        scores = scores.view(-1, heads, rows, end).add_(bias[:, :, start:end, :end]).view(-1, rows, end)
    return scores.softmax(-1)


class _CausalBlocksAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) with dropout, @ v, over [batch * heads, T, d] in blocks of
    queries (QUERY_BLOCK), with a hand-written backward: it keeps the probabilities and the fp32
    keep multipliers of the blocks (8 bytes an element of the lower triangle, against autograd's 9
    of the whole square: probabilities, dropped probabilities, bool mask)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scaling: float, p: float, heads: int):
        spans = _spans(q.shape[1])
        keeps = _keep_multipliers(q.shape[0], q.shape[1], p, q.device, spans)
        out = torch.empty_like(q)
        probs = []
        for (start, end), keep in zip(spans, keeps):
            block = _block_scores(q, k, bias, scaling, heads, start, end)
            out[:, start:end] = torch.bmm(block * keep, v[:, :end])
            probs.append(block)
        ctx.save_for_backward(q, k, v, *probs, *keeps)
        ctx.scaling, ctx.spans = scaling, spans
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *saved = ctx.saved_tensors
        probs, keeps = saved[: len(ctx.spans)], saved[len(ctx.spans):]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (start, end), block, keep in zip(ctx.spans, probs, keeps):
            g = grad[:, start:end]
            # bmm, then add_: an in-place baddbmm_ into the [:, :end] slice (not contiguous) falls
            # back to one matmul per batch entry on CPU (2,700 calls a step for the quickstart).
            dv[:, :end] += torch.bmm((block * keep).transpose(1, 2), g)
            d_probs = torch.bmm(g, v[:, :end].transpose(1, 2)).mul_(keep)
            d_scores = torch._softmax_backward_data(d_probs, block, -1, block.dtype)
            dq[:, start:end] = torch.bmm(d_scores, k[:, :end])
            dk[:, :end] += torch.bmm(d_scores.transpose(1, 2), q[:, start:end])
        return dq.mul_(ctx.scaling), dk.mul_(ctx.scaling), dv, None, None, None, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks sdpa gets: bool, or None for plain causal


def install(model: nn.Module) -> int:
    """Swap the model's dropout for the cheaper one (see the module docstring); returns how many
    dropout modules were swapped. Call before wrapping the model for DDP or DeepSpeed."""
    from pipeline.train.modeling import replace_children

    swapped = replace_children(model, lambda child: BitsDropout(child.p) if type(child) is nn.Dropout and child.p > 0 else None)
    _register()
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = ATTENTION
    return swapped
