"""Linear layers through oneDNN on CPU (`train.cpu_matmul`), where torch's BLAS leaves AVX-512 idle.

torch's CPU matmul calls MKL, and MKL picks its AVX-512 kernels only on Intel processors: on an
AMD EPYC (Zen 4 and 5 execute AVX-512) it runs its AVX2 ones. oneDNN, which torch also ships,
picks kernels by instruction set, not vendor. Measured on 2 cores of an EPYC (Zen 5): a
2048 x 2048 x 2048 fp32 matmul at 377 GFLOP/s through oneDNN against 118-167 through MKL; a linear
layer of the quickstart's GPT-2, forward and backward, about 2x faster ([2048 x 128] @ [128 x 384]:
1.75 ms against 3.4-3.5; [2048 x 64] @ [64 x 192], width 64: 0.60 against 0.93).

`install(model)` routes every plain `nn.Linear` and transformers `Conv1D` (GPT-2's layers, weight
stored [in, out]) through `_OneDnnLinear` whenever the call is fp32 on CPU outside autocast; any
other call (bf16, a GPU, eval under autocast) takes torch's path as before. Weights, their names
and the saved model are untouched: only the module's `forward` is replaced, on the instance.

`choose(setting)`: `auto` is oneDNN on a CPU that is not Intel's and has AVX-512 (the case
measured), else torch's. The choice is a function of the machine, not of a timing, so a resumed run
takes the path the interrupted one took, and its weights stay bit-identical.
"""

from __future__ import annotations

import types
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@lru_cache(maxsize=None)
def _cpu_flags() -> tuple[str, frozenset[str]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none (macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", frozenset()
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())


def onednn_available() -> bool:
    """torch built with oneDNN, and the ops used here present (internal ones: checked, not assumed)."""
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise) \
            and callable(torch.mkldnn_linear_backward_weights)
    except (AttributeError, RuntimeError):
        return False


def choose(setting: str) -> str:
    """`train.cpu_matmul` resolved for this machine: "onednn" or "torch"."""
    if setting == "onednn" and not onednn_available():
        raise ValueError("train.cpu_matmul is onednn, but this torch has no oneDNN (or lacks the ops used): set it to auto or torch")
    if setting != "auto":
        return setting
    if not onednn_available():
        return "torch"
    vendor, flags = _cpu_flags()
    return "onednn" if vendor and vendor != "GenuineIntel" and "avx512f" in flags else "torch"


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of x and weight can go through oneDNN here: fp32 on CPU, outside autocast and compiling."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def matmul_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), 2-D fp32 CPU tensors, in oneDNN on ordinary (strided) tensors, no autograd:
    no layout conversion, and a transposed view as the weight costs nothing (the op inductor itself
    calls for CPU linears)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _weight_grad(grad_rows: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """(grad_rows.T @ rows, grad_rows summed over rows or None) in oneDNN. Its own weight-gradient
    primitive, on oneDNN's layout, beat the same product on strided views (0.65 against 0.88 ms for
    [2048, 384] x [2048, 128], MKL 1.18)."""
    return torch.mkldnn_linear_backward_weights(grad_rows.contiguous().to_mkldnn(), rows.contiguous().to_mkldnn(), weight, has_bias)


class _OneDnnLinear(torch.autograd.Function):
    """x @ weight.T + bias, weight [out, in] (a transposed view is fine), forward and backward in oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        out = matmul_nt(rows, weight, bias)
        ctx.save_for_backward(rows, weight)
        ctx.input_shape, ctx.has_bias = x.shape, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # dx = grad @ weight: a linear layer whose [out, in] weight is weight.T (a view).
            grad_x = matmul_nt(grad_rows, weight.t()).view(ctx.input_shape)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_weight, grad_bias = _weight_grad(grad_rows, rows, weight, ctx.has_bias)
            grad_weight = grad_weight if ctx.needs_input_grad[1] else None
            grad_bias = grad_bias if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def matmul_tn(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a.T @ b for 2-D fp32 CPU tensors through oneDNN (a weight's gradient, shaped `like`), no autograd."""
    return _weight_grad(a, b, like, False)[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN where it applies (fp32 on CPU outside autocast)."""
    if applies(x, weight):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    # transformers' Conv1D stores its weight [in, out]: x @ W + b is linear(x, W.T, b).
    return linear(x, self.weight.t(), self.bias)


def install(model: nn.Module) -> int:
    """Route the model's `nn.Linear` and `Conv1D` layers through oneDNN (see the module docstring);
    returns how many. Subclasses (quantized layers, LoRA's wrappers) are left alone; a wrapper that
    calls a plain base layer gets it routed all the same."""
    from transformers.pytorch_utils import Conv1D

    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_linear_forward, module)
        elif type(module) is Conv1D:
            module.forward = types.MethodType(_conv1d_forward, module)
        else:
            continue
        routed += 1
    return routed
