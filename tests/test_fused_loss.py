"""pipeline/train/fused_loss.py: the chunked linear + cross-entropy gives the unfused graph's loss and
gradients (fp32, bf16 autocast, tied weights, ignored targets, per-row), and never holds [N, V]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.train.fused_loss import MAX_CHUNK_ROWS, chunk_rows_for, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, V = 37, 16, 53


def _problem(dtype=torch.float32, seed=0, ignored=(0, 5, 6, 36)):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=generator) / D**0.5).requires_grad_()
    bias = torch.randn(V, generator=generator).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[list(ignored)] = -100
    return hidden, weight, bias, targets


def _unfused(hidden, weight, bias, targets, reduction="sum"):
    """What the trainer computes without the fused loss (objectives.summed_loss)."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100, reduction=reduction)


def _float64_reference(hidden, weight, bias, targets, reduction="sum"):
    """The unfused graph in float64 throughout, so only the fused side's fp32 rounding shows."""
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100, reduction=reduction)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def _float64_copies(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("chunk_rows", [1, 7, N, N + 5, None])
def test_summed_loss_and_gradients_match_the_unfused_graph(chunk_rows):
    hidden, weight, bias, targets = _problem()
    # 3.0: backward must scale the gradients it computed in forward by grad_output.
    loss = 3.0 * linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=chunk_rows)
    h64, w64, b64 = _float64_copies(hidden, weight, bias)
    expected = 3.0 * _float64_reference(h64, w64, b64, targets)

    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    for got, want in zip(_grads(loss, hidden, weight, bias), _grads(expected, h64, w64, b64)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_per_row_losses_and_their_gradients_under_a_different_factor_per_row():
    hidden, weight, bias, targets = _problem(seed=1)
    rows = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=5, reduction="none")
    h64, w64, b64 = _float64_copies(hidden, weight, bias)
    expected = _float64_reference(h64, w64, b64, targets, reduction="none")

    assert rows.dtype == torch.float32 and rows.shape == (N,)
    assert (rows[targets == -100] == 0).all() and (rows[targets != -100] > 0).all()
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)
    factor = torch.arange(N, dtype=torch.float32)
    got = _grads((rows * factor).sum(), hidden, weight, bias)
    want = _grads((expected * factor.double()).sum(), h64, w64, b64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(reduction):
    hidden, weight, bias, targets = _problem(ignored=range(N))
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=8, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in _grads(loss.sum(), hidden, weight, bias):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_bf16_autocast_follows_the_unfused_autocast_graph():
    hidden, weight, bias, targets = _problem(dtype=torch.bfloat16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=10)
        expected = _unfused(hidden, weight, bias, targets)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)
    for got, want in zip(_grads(loss, hidden, weight, bias), _grads(expected, hidden, weight, bias)):
        assert got.dtype == want.dtype  # bf16 for hidden, fp32 for the fp32 weight and bias
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_a_bf16_model_without_autocast_gets_bf16_gradients(reduction):
    *fp32_leaves, targets = _problem(seed=8)
    hidden, weight, bias = (t.detach().bfloat16().requires_grad_() for t in fp32_leaves)
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=10, reduction=reduction)
    expected = _unfused(hidden, weight, bias, targets, reduction=reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    for g, w in zip(_grads(loss.sum(), hidden, weight, bias), _grads(expected.sum(), hidden, weight, bias)):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_a_head_tied_to_the_embedding_gets_the_gradient_of_both_uses():
    def loss_through(head_loss):
        torch.manual_seed(3)
        embedding = torch.nn.Embedding(V, D)
        mix = torch.nn.Linear(D, D)
        ids = torch.randint(0, V, (N,))
        targets = torch.roll(ids, -1)
        targets[-1] = -100
        hidden = torch.tanh(mix(embedding(ids)))
        head_loss(hidden, embedding.weight, targets).backward()
        return embedding.weight.grad, mix.weight.grad

    fused = loss_through(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=6))
    unfused = loss_through(lambda h, w, t: _unfused(h, w, None, t))
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _OpLog(TorchDispatchMode):
    """Counts matmuls, the dtypes they ran in, and the largest tensor any op returned."""

    def __init__(self):
        super().__init__()
        self.matmuls = 0
        self.matmul_dtypes = set()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.matmuls += 1
            self.matmul_dtypes.add(args[-1].dtype)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fp32_inputs_under_autocast_multiply_in_the_autocast_dtype_like_f_linear(reduction):
    hidden, weight, bias, targets = _problem(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _OpLog() as unfused_ops:
            expected = _unfused(hidden, weight, bias, targets, reduction=reduction)
        with _OpLog() as fused_ops:
            loss = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=10, reduction=reduction)
    assert unfused_ops.matmul_dtypes == fused_ops.matmul_dtypes == {torch.bfloat16}
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)

    # Backward runs after autocast is left, as in a training step.
    with _OpLog() as backward_ops:
        got = _grads(loss.sum(), hidden, weight, bias)
    if reduction == "sum":
        assert backward_ops.matmuls == 0  # the gradients were made in forward
    else:
        assert backward_ops.matmul_dtypes == {torch.bfloat16}  # recomputed as in forward
    for g, w in zip(got, _grads(expected.sum(), hidden, weight, bias)):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_without_grad_mode_the_loss_is_the_same_and_no_gradient_is_computed():
    hidden, weight, bias, targets = _problem(seed=4)
    with_grad = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=10)
    with torch.no_grad(), _OpLog() as ops:
        without = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=10)
    assert without.grad_fn is None
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
    assert ops.matmuls == 4  # one per chunk of 10 rows out of 37: the logits, no gradient matmuls


def test_only_the_inputs_that_require_grad_get_gradient_matmuls():
    hidden, weight, _, targets = _problem(seed=5)
    with _OpLog() as ops:
        loss = linear_cross_entropy(hidden, weight.detach(), targets, chunk_rows=10)
    assert ops.matmuls == 4 * 2  # per chunk: the logits and the gradient of hidden
    (grad,) = _grads(loss, hidden)
    assert grad.abs().sum() > 0


def test_chunk_rows_fit_the_budget():
    assert chunk_rows_for(50_257) == 667  # GPT-2: 667 rows x 50,257 x 4 bytes x 2 <= 256 MiB
    assert 667 * 50_257 * 8 <= 256 << 20 < 668 * 50_257 * 8
    assert chunk_rows_for(100) == MAX_CHUNK_ROWS
    assert chunk_rows_for(10**9) == 1
    assert chunk_rows_for(1000, budget_bytes=80_000) == 10


def test_no_tensor_of_all_the_logits_is_made_or_saved_for_backward():
    n, d, v, chunk = 4096, 64, 8192, 256
    torch.manual_seed(6)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) / d**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))

    def largest_made_and_saved(loss_of):
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with _OpLog() as ops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of().sum().backward()
        return ops.largest, max(saved)

    # The check must trip on the unfused graph, or it proves nothing about the fused one.
    made, saved = largest_made_and_saved(lambda: _unfused(hidden, weight, None, targets))
    assert made >= n * v and saved >= n * v
    for reduction in ("sum", "none"):
        made, saved = largest_made_and_saved(
            lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk, reduction=reduction)
        )
        assert made <= chunk * v, reduction
        assert saved <= max(n, v) * d, reduction


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_ignore_index_skips_the_mask_and_changes_nothing_when_every_target_is_real(reduction):
    torch.manual_seed(7)
    hidden, weight = torch.randn(33, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (33,))
    grads = []
    for ignore in (-100, None):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=7, reduction=reduction, ignore_index=ignore)
        (loss * torch.arange(1.0, 34.0)).sum().backward() if reduction == "none" else loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad, weight.grad = None, None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
