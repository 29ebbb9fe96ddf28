"""PMoE's adapter layers on CPU as single fused products, computing what the stock layers do.

- :class:`MergedLoRALinear`: the shared LoRA of the shallow blocks as one product with the
  merged weight ``W + s B A`` (:class:`_MergedLoRA`); at evaluation the merged weight is kept
  until ``W``, ``A`` or ``B`` changes (one extra copy per adapted layer, on this backend only).
- :class:`FusedExpertBank`: a deep block's expert bank with its mixture accumulated into the base
  product's own output (:class:`_BankLinear`).

Both take their fused path only where it is the same function (a frozen float32 ``nn.Linear``
base, no dropout) and are their stock layer otherwise; :func:`convert` swaps the classes of one
model's adapter layers in place, and its :class:`~moecl.backends.Applied` swaps them back.
"""

from __future__ import annotations

import torch
from torch import nn

from moecl.adapters.expert_bank import LoRAExpertBank, _gated
from moecl.adapters.lora import LoRALinear
from moecl.backends import Applied
from moecl.backends.cpu.linear import linear


class _MergedLoRA(torch.autograd.Function):
    """``x (W + s B A)^T + b``: the adapted layer as one product with the merged weight.

    Forward and input gradient each become one large product instead of the base product, two
    low-rank ones and an addition over the ``(tokens, out)`` activations: on CPU those extra
    passes over memory cost more than building ``W + s B A`` (``out x in``, once per call). The
    gradients of ``A (r, in)`` and ``B (out, r)`` are those of the separate form::

        dA = s (g B)^T x        dB = s g^T (x A^T)        dx = g (W + s B A)

    The backward's low-rank products take the ``M`` tokens as their columns: ``(g B)^T`` and
    ``(x A^T)^T`` are ``(r, M)`` products, and ``dA``, ``dB^T`` then read them row by row. With the
    tokens as rows instead (``(M, r)`` results), MKL's kernel gets an output panel only ``r = 8``
    wide: on SmolLM2-135M's shapes (968 tokens, two cores, operands cold) the four products of a
    layer took 15-26% longer, 194 against 159 ms of low-rank products per 8 x 121-token step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)  # (out, in), freed after the product
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, out), (M, in)
        grad_x = None
        if ctx.needs_input_grad[0]:  # built again (out x in x r, small) rather than kept from the forward
            grad_x = linear(grad, torch.addmm(weight, lora_b, lora_a, alpha=ctx.scaling).t())
        grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            g_b = linear(lora_b.t(), g)  # (r, M) = (g B)^T
            grad_a = linear(g_b, x2.t()) * ctx.scaling  # (r, in) = (g B)^T x
        if ctx.needs_input_grad[4]:
            h = linear(lora_a, x2)  # (r, M) = (x A^T)^T
            grad_b = linear(h, g.t()).t() * ctx.scaling  # (out, r) = g^T (x A^T)
        return grad_x, None, None, grad_a, grad_b, None


class MergedLoRALinear(LoRALinear):
    """A :class:`~moecl.adapters.lora.LoRALinear` computed as one product with its merged weight
    where that is the same function (:meth:`mergeable`)."""

    def mergeable(self) -> bool:
        """The merged form computes the same function: a frozen ``nn.Linear`` base of the
        adapters' own dtype (the merged product passes no gradient to ``W`` or ``b``) and no
        dropout on the adapter's input (which the base path does not see)."""
        layer = self.base_layer
        return (
            isinstance(layer, nn.Linear)
            and isinstance(self.dropout, nn.Identity)
            and layer.weight.dtype == self.lora_A.dtype
            and not any(p.requires_grad for p in layer.parameters())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mergeable() and x.dtype == self.lora_A.dtype:
            layer = self.base_layer
            if torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad or x.requires_grad):
                self._merged = None
                return _MergedLoRA.apply(x, layer.weight, layer.bias, self.lora_A, self.lora_B, self.scaling)
            return linear(x, self.merged_weight(), layer.bias)
        return super().forward(x)

    def merged_weight(self) -> torch.Tensor:
        """``W + s B A`` for evaluation, built again only when ``W``, ``A`` or ``B`` changed."""
        tensors = (self.base_layer.weight, self.lora_A, self.lora_B)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if getattr(self, "_merged", None) is None or self._merged[0] != key:
            with torch.no_grad():
                self._merged = (key, torch.addmm(tensors[0], self.lora_B, self.lora_A, alpha=self.scaling))
        return self._merged[1]


class _BankLinear(torch.autograd.Function):
    """``x W^T + b + (z * g s) B_cat^T`` with ``z = x A_cat^T``: the bank's layer with its mixture
    accumulated into the base product's own output.

    The separate form writes a ``(tokens, out)`` delta and then adds it to the base output; here
    the low-rank product adds into that output in place (a GEMM with ``beta = 1``), and in the
    backward the mixture's share of the input gradient adds into the base's the same way: two
    passes over ``(tokens, out)`` fewer forward and two over ``(tokens, in)`` backward, and one
    autograd node instead of about ten. With ``M`` tokens, ``gs (M, T)`` the gate times ``s``
    spread over each expert's ``r`` channels and ``dy`` the output gradient::

        dz = dy B_cat        dx = dy W + (dz gs) A_cat        dA_cat = (dz gs)^T x
        dB_cat = dy^T (z gs)                                  dg_k = s sum_r (dz z)_k

    Measured on SmolLM2-135M's 56 deep layers (one expert, 1,000 tokens): forward + backward 296
    -> 275 ms (150 tokens: 61.5 -> 56.6 ms); a whole PMoE step gains about 1%.

    ``z`` and ``dz`` are computed as ``(T*r, M)`` products and used through their transposes, for
    the reason :class:`_MergedLoRA` gives: an output panel ``T*r`` wide with
    the tokens as rows is MKL's slow case; ``dA_cat`` and ``dB_cat`` then read ``(z gs)^T`` and
    ``(dz gs)^T`` row by row.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_cat, b_cat, gate, scaling):
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        z = linear(a_cat, x2).t().view(*x.shape[:-1], -1)  # (..., T*r), a view of (T*r, M)
        y = linear(x2, weight, bias)  # (M, out), a fresh tensor
        y.addmm_(_gated(z, gate, scaling).reshape(x2.shape[0], -1), b_cat.t())
        ctx.save_for_backward(x, weight, a_cat, b_cat, gate, z)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, a_cat, b_cat, gate, z = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (M, in), (M, out)
        dz = linear(b_cat.t(), g2).t().view(*x.shape[:-1], -1)  # (..., T*r) = dy B_cat, a view of (T*r, M)
        dzg = _gated(dz, gate, ctx.scaling).reshape(x2.shape[0], -1)  # (M, T*r)
        grad_x = grad_a = grad_b = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(g2, weight.t())  # (M, in) = dy W, a fresh tensor
            grad_x.addmm_(dzg, a_cat)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_a = linear(dzg.t(), x2.t())  # (T*r, in)
        if ctx.needs_input_grad[4]:
            zg = _gated(z, gate, ctx.scaling).reshape(x2.shape[0], -1)
            grad_b = linear(zg.t(), g2.t()).t()  # (out, T*r)
        if ctx.needs_input_grad[5]:
            t = gate.shape[-1]
            dg = (dz.unflatten(-1, (t, -1)) * z.unflatten(-1, (t, -1))).sum(-1) * ctx.scaling  # (..., T)
            grad_gate = dg.sum_to_size(gate.shape).to(gate.dtype)
        return grad_x, None, None, grad_a, grad_b, grad_gate, None


class FusedExpertBank(LoRAExpertBank):
    """A :class:`~moecl.adapters.expert_bank.LoRAExpertBank` whose mixture is accumulated into the
    base product (:class:`_BankLinear`) where that is the same function (:meth:`fusable`)."""

    def fusable(self, x: torch.Tensor) -> bool:
        """:class:`_BankLinear` computes the same function for ``x``: a frozen ``nn.Linear`` base and
        ``x`` of the experts' dtype, and no dropout on the experts' input (which the base path
        does not see)."""
        layer = self.base_layer
        return (
            isinstance(layer, nn.Linear)
            and isinstance(self.dropout, nn.Identity)
            and layer.weight.dtype == x.dtype == self.frozen_A.dtype
            and not any(p.requires_grad for p in layer.parameters())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expert_A is None:
            return self.base_layer(x)
        gate = self.gate.read(x, self.num_experts)
        if self.fusable(x):
            a_cat, b_cat = self.stacked_weights()
            layer = self.base_layer
            return _BankLinear.apply(x, layer.weight, layer.bias, a_cat, b_cat, gate, self.scaling)
        return self.reference_forward(x, gate)


SWAPS = ((LoRALinear, MergedLoRALinear), (LoRAExpertBank, FusedExpertBank))


def convert(model: nn.Module) -> Applied:
    """Give ``model``'s stock adapter layers their fused class, in place; undone by restoring it."""
    converted: list[tuple[nn.Module, type]] = []
    for module in model.modules():
        for stock, fused in SWAPS:
            if type(module) is stock:
                module.__class__ = fused
                converted.append((module, stock))

    def undo() -> None:
        for module, stock in converted:
            module.__class__ = stock
            module.__dict__.pop("_merged", None)

    return Applied("cpu", {"adapters": len(converted)} if converted else {}, [undo])
