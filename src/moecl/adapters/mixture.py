"""A mixture of LoRA experts on one linear layer, mixed per token by its own router (LoRAMoE).

``y = base(x) + (alpha / r) * sum_e g_e(x) B_e A_e x`` with ``g(x) = softmax(W_g x)`` over
``E`` experts (*LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via
MoE-Style Plugin*, arXiv 2312.09979). Every expert and the router train on every task: the bank
is fixed, it does not grow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moecl.adapters.lora import adapter_dtype, linear_features, make_dropout


class LoRAMixtureLinear(nn.Module):
    """``E`` LoRA experts of rank ``r`` on ``base_layer`` and a token router over them.

    Tensors: ``lora_A (E*r, in)`` (expert ``e``'s ``A`` is rows ``e*r:(e+1)*r``, Kaiming-uniform
    as PEFT's), ``lora_B (out, E*r)`` (zero: the mixture starts as a no-op), ``router
    (E, in)`` (``nn.Linear``'s default init). ``last_gate`` keeps the gate of the last
    training forward, ``(..., E)``, for the balancing constraint.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, experts: int, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.rank, self.experts, self.scaling = rank, experts, alpha / rank
        dtype, device = adapter_dtype(base_layer), base_layer.weight.device
        a = torch.empty(experts * rank, self.in_features, dtype=dtype, device=device)
        for e in range(experts):
            nn.init.kaiming_uniform_(a[e * rank : (e + 1) * rank], a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, experts * rank, dtype=dtype, device=device))
        router = torch.empty(experts, self.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))
        self.router = nn.Parameter(router)
        self.dropout = make_dropout(dropout)
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in)`` -> ``(..., out)`` in the base's dtype."""
        result = self.base_layer(x)
        h = x.to(self.lora_A.dtype)
        gate = F.softmax(F.linear(h, self.router), dim=-1)  # (..., E)
        if self.training and torch.is_grad_enabled():
            self.last_gate = gate
        low = F.linear(self.dropout(h), self.lora_A)  # (..., E*r)
        low = (low.unflatten(-1, (self.experts, self.rank)) * gate[..., None]).flatten(-2)
        return result + F.linear(low, self.lora_B * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.experts}, rank={self.rank}"


def localized_balance(
    gate: torch.Tensor, kinds: torch.Tensor, attention_mask: torch.Tensor, delta: float
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint for one layer: ``var(Z) / mean(Z)``.

    ``Q[e, j]`` sums expert ``e``'s gate over the real tokens of the batch's examples of kind
    ``j`` (two kinds, each owning one half of the experts); ``Z = I * Q`` with ``I[e, j] = 1 +
    delta`` where expert ``e`` belongs to kind ``j``, else ``1 - delta``. Only kinds present in
    the batch count.

    Args:
        gate: ``(batch, seq, E)``.
        kinds: ``(batch,)`` in {0, 1}.
        attention_mask: ``(batch, seq)``.
        delta: in [0, 1).
    """
    experts = gate.shape[-1]
    mask = attention_mask.to(gate.dtype)[..., None]
    per_example = (gate * mask).sum(1)  # (batch, E)
    columns = []
    owner = (torch.arange(experts, device=gate.device) >= experts // 2).long()  # expert -> its kind
    for kind in (0, 1):
        rows = kinds == kind
        if bool(rows.any()):
            weight = torch.where(owner == kind, 1.0 + delta, 1.0 - delta).to(gate.dtype)
            columns.append(per_example[rows].sum(0) * weight)
    z = torch.stack(columns, -1)  # (E, kinds present)
    return z.var(unbiased=False) / z.mean()
