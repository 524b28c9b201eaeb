"""Cross-entropy of a linear head that never holds all the logits: `linear_cross_entropy`.

Why: the unfused `F.cross_entropy(F.linear(hidden, weight).float(), targets)` materialises the
fp32 logits [tokens, vocab] and keeps log-softmax's output of the same size for backward, then
allocates its gradient. GPT-2's 50,257-token head over a 16k-token step is 3.3 GB of fp32 logits
and as much again for their gradient: more than the whole 124M-parameter model with its Adam state.
Here the rows go through in chunks, and at most one chunk's fp32 logits (turned in place into their
gradient) are alive at a time. This is Liger Kernel's fused linear cross entropy
(linkedin/Liger-Kernel, `fused_linear_cross_entropy.py`) in plain PyTorch, so it runs on CPU and CUDA.

The math, for a row h with logits z = W h + b (W is [V, d]) and target y:

    loss     = logsumexp(z) - z[y]
    dloss/dz = softmax(z) - onehot(y)         (the whole row is 0 where y == ignore_index)
    dloss/dh = dloss/dz @ W                   [d]
    dloss/dW = sum over rows of outer(dloss/dz, h)   [V, d]
    dloss/db = sum over rows of dloss/dz      [V]

dloss/dz needs only the chunk's logits and their logsumexp, so each chunk's share of every
gradient is finished before the next chunk starts.

- reduction="sum": the chain rule's factor (the loss's grad_output) is one scalar for all rows, so
  the forward pass computes the gradients right away (as Liger does) and backward only scales them:
  three matmuls per chunk in total, as many as the unfused graph does. Holding them from forward to
  backward costs [N, d] + [V, d], about what the unfused graph saves anyway (hidden and the weight).
- reduction="none": grad_output differs per row and is only known in backward, so backward
  recomputes each chunk's logits from the saved inputs and their saved logsumexp (one more matmul
  per chunk than "sum").
- With grad mode off (evaluation) no gradient work is done at all.

Precision follows the unfused graph under autocast: the matmul runs in the autocast dtype (else in
hidden's dtype), and its result is upcast to fp32 before log-softmax, as `logits.float()` does. The
weight is cast to that dtype once per call, not per chunk: every chunk needs all of it, and a bf16
copy of the head is what autocast's own F.linear caches too. Gradients of the weight and bias are
summed over chunks in fp32, then cast to the inputs' dtypes.

    from pipeline.train.fused_loss import linear_cross_entropy

    hidden = model.transformer(input_ids).last_hidden_state[:, :-1].flatten(0, 1)   # [N, d]
    loss = linear_cross_entropy(hidden, model.lm_head.weight, labels[:, 1:].flatten())  # summed
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from pipeline.train import cpu_matmul

# Past this many rows a chunk's matmul is already large enough to keep the device busy, and more
# rows only raise the peak memory.
MAX_CHUNK_ROWS = 8192
_FP32_BYTES = 4


def chunk_rows_for(vocab: int, budget_bytes: int = 256 << 20) -> int:
    """Rows per chunk such that one chunk's fp32 logits and their gradient fit in `budget_bytes`
    (at least 1, at most MAX_CHUNK_ROWS). GPT-2's vocabulary with the default budget: 667 rows."""
    bytes_per_row = 2 * vocab * _FP32_BYTES  # the logits, and their gradient
    return max(1, min(MAX_CHUNK_ROWS, budget_bytes // bytes_per_row))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    reduction: str = "sum",
    ignore_index: int | None = -100,
    onednn: bool = False,
) -> torch.Tensor:
    """fp32 cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, in chunks of rows.

    hidden [N, d], weight [V, d], bias [V], targets int64 [N]. reduction="sum" returns a scalar,
    "none" a float32 [N] with 0 on ignored rows. chunk_rows=None picks `chunk_rows_for(V)`.
    ignore_index=None: every target is real (the trainer passes only target positions), which
    saves a masking pass over each chunk's [rows, V] gradient (10 % of the loss on CPU).
    onednn=True: fp32 matmuls on CPU through oneDNN (train/cpu_matmul.py, `train.cpu_matmul`)."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', not {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, d] and weight [V, d] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected for hidden {tuple(hidden.shape)}, got {tuple(targets.shape)}")
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")

    device_type = hidden.device.type
    # Decided here, outside the Function, because forward turns autocast off to do its own casts.
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype

    inputs = (hidden, weight, bias)
    # Checked here and not in forward: inside a Function, ctx.needs_input_grad still says True under
    # torch.no_grad() for an input that requires grad.
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        with torch.autocast(device_type, enabled=False):
            row_loss, _ = _losses_and_grads(hidden, weight, bias, targets, compute_dtype, chunk_rows, ignore_index, None, onednn)
        return row_loss.sum() if reduction == "sum" else row_loss
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, compute_dtype, chunk_rows, ignore_index, reduction, onednn)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk_rows, ignore_index, reduction, onednn):
        ctx.device_type, ctx.onednn = hidden.device.type, onednn
        ctx.compute_dtype, ctx.chunk_rows, ctx.ignore_index, ctx.reduction = compute_dtype, chunk_rows, ignore_index, reduction
        with torch.autocast(ctx.device_type, enabled=False):
            if reduction == "none":
                row_loss, lse = _losses_and_grads(hidden, weight, bias, targets, compute_dtype, chunk_rows, ignore_index, None, onednn)
                ctx.save_for_backward(hidden, weight, bias, targets, lse)
                return row_loss
            grads = _GradSums(hidden, weight, bias, ctx.needs_input_grad[:3], onednn)
            row_loss, _ = _losses_and_grads(hidden, weight, bias, targets, compute_dtype, chunk_rows, ignore_index, grads, onednn)
            ctx.save_for_backward(*grads.finish())
            return row_loss.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        unused = (None, None, None, None, None, None)  # targets, compute_dtype, chunk_rows, ignore_index, reduction, onednn
        if ctx.reduction == "sum":
            # A 0-dim fp32 factor keeps each gradient in its own dtype.
            scaled = tuple(None if g is None else g * grad_output for g in ctx.saved_tensors)
            return (*scaled, *unused)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        with torch.autocast(ctx.device_type, enabled=False):
            grads = _GradSums(hidden, weight, bias, ctx.needs_input_grad[:3], ctx.onednn)
            weight_c, bias_c = _cast_head(weight, bias, ctx.compute_dtype)
            grad_output = grad_output.float()
            for rows in _row_chunks(hidden.shape[0], ctx.chunk_rows):
                hidden_c = hidden[rows].to(ctx.compute_dtype)
                logits = _fp32_logits(hidden_c, weight_c, bias_c, ctx.onednn)
                grad_logits = _logits_to_their_grad_(logits, lse[rows], targets[rows], ctx.ignore_index)
                grads.add(rows, hidden_c, weight_c, grad_logits.mul_(grad_output[rows].unsqueeze(1)))
            return (*grads.finish(), *unused)


def _losses_and_grads(hidden, weight, bias, targets, compute_dtype, chunk_rows, ignore_index, grads, onednn):
    """(loss per row fp32 [N], logsumexp per row fp32 [N]); adds each chunk's gradients into `grads`
    unless it is None."""
    row_loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.zeros_like(row_loss)
    weight_c, bias_c = _cast_head(weight, bias, compute_dtype)
    for rows in _row_chunks(hidden.shape[0], chunk_rows):
        hidden_c = hidden[rows].to(compute_dtype)
        targets_c = targets[rows]
        logits = _fp32_logits(hidden_c, weight_c, bias_c, onednn)
        kept = targets_c != (-1 if ignore_index is None else ignore_index)  # None: no target is ignored
        # clamp: gather cannot index with ignore_index (-100); those rows are masked out anyway.
        picked = targets_c.clamp(min=0).unsqueeze(1)
        # log_softmax is one fused pass (logsumexp is several, each allocating): the loss is
        # -logp[target], the gradient exp(logp) - onehot, and logsumexp = logit - logp at the target.
        logp = torch.log_softmax(logits, dim=1)
        target_logp = logp.gather(1, picked).squeeze(1)
        row_loss[rows] = torch.where(kept, -target_logp, 0.0)
        lse[rows] = logits.gather(1, picked).squeeze(1) - target_logp
        del logits
        if grads is not None:
            grads.add(rows, hidden_c, weight_c, _log_probabilities_to_their_grad_(logp, targets_c, ignore_index))
    return row_loss, lse


def _row_chunks(rows: int, chunk_rows: int):
    for start in range(0, rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, rows))


def _cast_head(weight, bias, compute_dtype):
    return weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)


def _fp32_logits(hidden_c, weight_c, bias_c, onednn: bool) -> torch.Tensor:
    """The chunk's logits in fp32, from a matmul in the compute dtype (what autocast's F.linear
    followed by `.float()` gives). The result is a fresh tensor the caller may overwrite."""
    if onednn and cpu_matmul.applies(hidden_c, weight_c):
        return cpu_matmul.matmul_nt(hidden_c, weight_c, bias_c)
    logits = hidden_c @ weight_c.T if bias_c is None else torch.addmm(bias_c, hidden_c, weight_c.T)
    return logits.float()


def _logits_to_their_grad_(logits, lse, targets_c, ignore_index) -> torch.Tensor:
    """softmax - onehot(target), rows of ignored targets zeroed; computed in place in `logits` so
    the chunk never holds two fp32 [rows, V] tensors."""
    return _log_probabilities_to_their_grad_(logits.sub_(lse.unsqueeze(1)), targets_c, ignore_index)


def _log_probabilities_to_their_grad_(logp, targets_c, ignore_index) -> torch.Tensor:
    """exp(logp) - onehot(target), rows of ignored targets zeroed, in place in `logp`."""
    grad = logp.exp_()
    if ignore_index is None:  # every row a target (the trainer selects them first): no masking pass over [rows, V]
        grad.scatter_add_(1, targets_c.unsqueeze(1), torch.full((len(targets_c), 1), -1.0, dtype=grad.dtype, device=grad.device))
        return grad
    kept = targets_c != ignore_index
    grad.masked_fill_(~kept.unsqueeze(1), 0.0)
    grad.scatter_add_(1, targets_c.clamp(min=0).unsqueeze(1), -kept.to(grad.dtype).unsqueeze(1))
    return grad


class _GradSums:
    """Gradients of hidden, weight and bias built chunk by chunk; only those `wanted`."""

    def __init__(self, hidden, weight, bias, wanted, onednn: bool):
        want_hidden, want_weight, want_bias = wanted
        self.onednn = onednn
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        # Each row of hidden belongs to one chunk, so its gradient is written once, in its own
        # dtype; the weight's and bias's are sums over all chunks and are kept in fp32 until the end.
        self.hidden = torch.empty_like(hidden) if want_hidden else None
        self.weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        self.bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None

    def add(self, rows, hidden_c, weight_c, grad_logits):
        if self.bias is not None:
            self.bias += grad_logits.sum(0)
        if self.hidden is None and self.weight is None:
            return
        # The matmuls run in the compute dtype, as the unfused graph's backward does (bf16 tensor
        # cores on GPU); only this chunk's copy of the gradient is in that dtype.
        grad_logits = grad_logits.to(hidden_c.dtype)
        if self.onednn and cpu_matmul.applies(hidden_c, weight_c):
            if self.hidden is not None:
                self.hidden[rows] = cpu_matmul.matmul_nt(grad_logits, weight_c.t())  # a view: no copy of the head
            if self.weight is not None:
                self.weight += cpu_matmul.matmul_tn(grad_logits, hidden_c, like=weight_c)
            return
        if self.hidden is not None:
            self.hidden[rows] = grad_logits @ weight_c
        if self.weight is not None:
            if grad_logits.dtype == torch.float32:
                self.weight.addmm_(grad_logits.T, hidden_c)  # no [V, d] temporary
            else:
                self.weight += grad_logits.T @ hidden_c

    def finish(self):
        sums = (self.hidden, self.weight, self.bias)
        return tuple(None if g is None else g.to(dtype) for g, dtype in zip(sums, self.dtypes))
