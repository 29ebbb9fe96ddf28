"""Linear products on CPU at the machine's rate: MKL's fast kernels where they run, else oneDNN.

PyTorch multiplies float32 matrices on CPU with MKL's ``sgemm``. On the AMD EPYC (Zen 5) machines
this project runs on, MKL takes a generic path (about 215 GFLOP/s on two cores at the model's
projection shapes) unless :mod:`moecl.backends.cpu.mkl` has given it its Intel kernels (about 495). oneDNN,
also inside every PyTorch CPU build, reaches about 450 either way (``benchmarks/throughput.py``
measures both). Nearly all of a training step is such products, so :func:`linear` runs them on
MKL when :func:`moecl.backends.cpu.mkl.unlocked` (faster than oneDNN at nearly every shape of a step here,
and by 4.5% over a whole step) and otherwise on ``torch.ops.mkldnn._linear_pointwise``: the
forward ``x W^T + b`` and, in the backward, the input gradient ``g W`` (the same kernel on the
transposed view of ``W``) and, for a trainable weight (the adapters' ``A`` and ``B``), its
gradient ``g^T x``.

The fast path is taken only where it is the same computation: float32 input and weight on the
CPU. Anything else, e.g. a GPU or a bf16 model, is plain ``F.linear``. Under ``torch.compile``
the oneDNN products go through the custom operator ``moecl::onednn_linear`` (the same kernels,
with its shape function and gradient registered), which the compiler keeps as one opaque call
while it fuses what lies between them; eager mode uses the cheaper ``autograd.Function``.
Results equal ``F.linear``'s up to float rounding (a different summation order); the tests hold
both paths to that.

:func:`convert` converts a model's ``nn.Linear`` layers in place; the backend's adapter
layers (:mod:`moecl.backends.cpu.adapters`) call :func:`linear` for their own products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecl.backends import Applied
from moecl.backends.cpu import mkl

ENABLED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
"""Whether :func:`linear` may leave plain ``F.linear`` for oneDNN, or MKL's folded form once MKL is
unlocked (off where PyTorch lacks oneDNN; tests switch it off to compare)."""


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (..., in) @ weight (out, in)^T + bias`` by oneDNN, without autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """``F.linear`` whose forward and input gradient run on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return _onednn(x, weight.detach(), None if bias is None else bias.detach())

    @staticmethod
    def backward(ctx, grad):
        return _linear_grads(ctx, grad, _onednn)


def _linear_grads(ctx, grad: torch.Tensor, product) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``x W^T + b`` for both oneDNN paths, ``product(a, b, None) = a b^T``
    (the eager kernel, or the compiler's operator): ``g W`` for ``x`` and ``g^T x (out, in)`` for
    ``W``, with the smaller of out and in as oneDNN's rows."""
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = product(grad, weight.detach().t(), None)  # g W = g (W^T)^T
    if ctx.needs_input_grad[1]:
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if g2.shape[1] <= x2.shape[1]:
            grad_w = product(g2.t(), x2.t(), None)
        else:
            grad_w = product(x2.t(), g2.t(), None).t().contiguous()
    if ctx.bias_grad:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


@torch.library.custom_op("moecl::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear` as an operator ``torch.compile`` can trace: ``x (..., in) -> (..., out)``."""
    return _onednn(x, weight, bias)


@onednn_linear.register_fake
def _onednn_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x if weight.requires_grad else None, weight)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _onednn_linear_backward(ctx, grad):
    return _linear_grads(ctx, grad, onednn_linear)


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_context)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the faster CPU kernel where that is the same computation:
    MKL once :mod:`moecl.backends.cpu.mkl` unlocked it, else oneDNN (module docstring)."""
    if not (ENABLED and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.is_cpu and weight.is_cpu):
        return F.linear(x, weight, bias)
    if mkl.unlocked():
        return _mkl_linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return onednn_linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Linear.apply(x, weight, bias)
    return _onednn(x, weight, bias)  # nothing to differentiate: evaluation, or frozen layer on frozen input


def _mkl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on MKL with ``x`` folded to ``(rows, in)``: given a strided view (the rows a
    model keeps logits for), ``F.linear`` would multiply batch by batch against an expanded weight."""
    if x.dim() == 2:
        return F.linear(x, weight, bias)
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` computed by :func:`linear`: same parameters, state dict and outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def convert(model: nn.Module) -> Applied:
    """Make every plain ``nn.Linear`` inside ``model`` an :class:`OneDNNLinear`, in place (the same
    module objects and parameters, so tied weights stay tied); undone by restoring the class."""
    converted = [m for m in model.modules() if type(m) is nn.Linear]
    for module in converted:
        module.__class__ = OneDNNLinear

    def undo() -> None:
        for module in converted:
            module.__class__ = nn.Linear

    return Applied("cpu", {"linear": len(converted)}, [undo])
