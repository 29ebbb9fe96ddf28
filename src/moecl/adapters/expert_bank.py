"""A progressive bank of LoRA experts around one linear layer (PMoE's deep blocks).

``y = base(x) + sum_k g_k (alpha/r) B_k A_k x`` with ``g`` the router's gate for the token.

The mixture is computed in a fused form: stacking the experts gives one rank
``T*r`` LoRA, ``sum_k g_k B_k A_k x = B_cat (expand_r(g) * (A_cat x))``, i.e. two matmuls and
one elementwise scale, whatever ``T`` is. Neither a Python loop over experts nor a
``(tokens, T, d_out)`` tensor appears. :meth:`LoRAExpertBank.reference_delta` is the plain loop,
kept as the test oracle.

Only the newest expert is an ``nn.Parameter``; earlier experts live in buffers, so no
optimizer can see them (not even AdamW's weight decay) and they stay bit-identical. On disk the
split does not show: every expert sits in one stack, ``experts_A``/``experts_B``
(:meth:`LoRAExpertBank.saved_tensors`), whichever of them was training when it was saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecl.adapters.lora import adapter_dtype, init_lora_pair, linear_features, make_dropout
from moecl.adapters.router import GateState


def _gated(z: torch.Tensor, gate: torch.Tensor, scaling: float) -> torch.Tensor:
    """``z (..., T*r)`` with expert ``k``'s ``r`` channels times ``scaling * gate[..., k]``, for a
    gate ``(..., T)`` per token or ``(1, 1, T)`` fixed: a view ``(..., T, r)``, no copy of the gate."""
    g = gate.to(device=z.device, dtype=z.dtype) * scaling  # (..., T)
    return (z.unflatten(-1, (g.shape[-1], -1)) * g.unsqueeze(-1)).flatten(-2)


class LoRAExpertBank(nn.Module):
    """Gate-weighted LoRA experts, one per task, of which only the newest trains.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to adapt; it stays frozen.
        rank: ``r`` of every expert.
        alpha: the delta of each expert is scaled by ``alpha / r``.
        gate: the :class:`GateState` the owning model writes the router's output to.
        dropout: dropout on the experts' input.

    Tensors: ``frozen_A (n_frozen*r, in)`` and ``frozen_B (out, n_frozen*r)`` (buffers),
    ``expert_A (n_new*r, in)`` and ``expert_B (out, n_new*r)`` (parameters, the task being
    learned; ``n_new`` is 1 for PMoE, up to a budget of sub-experts for MoSEs).

    ``gate`` is anything with ``read(x, num_experts) -> (..., num_experts)``: PMoE's shared
    :class:`GateState`, or a per-layer router module such as MoSEs' top-k router (which then
    becomes a submodule of the bank).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, gate: GateState, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = linear_features(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank
        self.scaling = alpha / rank
        self.gate = gate
        self.dropout = make_dropout(dropout)
        weight = base_layer.weight
        dtype = adapter_dtype(base_layer)
        self.register_buffer("frozen_A", torch.zeros(0, in_features, dtype=dtype, device=weight.device))
        self.register_buffer("frozen_B", torch.zeros(out_features, 0, dtype=dtype, device=weight.device))
        self.register_parameter("expert_A", None)  # opened by add_expert()
        self.register_parameter("expert_B", None)

    @property
    def num_experts(self) -> int:
        trainable = 0 if self.expert_A is None else self.expert_A.shape[0]
        return (self.frozen_A.shape[0] + trainable) // self.rank

    @property
    def num_frozen(self) -> int:
        return self.frozen_A.shape[0] // self.rank

    def add_expert(self, count: int = 1, copy_from: int | None = None) -> None:
        """Freeze the trainable experts (move them to the buffers) and open ``count`` new ones:
        fresh (``B = 0``, an exact no-op) or, with ``copy_from = k``, each a copy of expert ``k``."""
        if self.expert_A is not None:
            self.frozen_A = torch.cat([self.frozen_A, self.expert_A.detach()], dim=0)
            self.frozen_B = torch.cat([self.frozen_B, self.expert_B.detach()], dim=1)
        self.expert_A, self.expert_B = init_lora_pair(
            count * self.rank, self.in_features, self.out_features, self.frozen_A, self.frozen_A.dtype
        )
        if copy_from is not None:
            if not 0 <= copy_from < self.num_frozen:
                raise ValueError(f"expert {copy_from} does not exist to copy: the bank has {self.num_frozen}")
            rows = slice(copy_from * self.rank, (copy_from + 1) * self.rank)
            with torch.no_grad():
                self.expert_A.copy_(self.frozen_A[rows].repeat(count, 1))
                self.expert_B.copy_(self.frozen_B[:, rows].repeat(1, count))

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_cat (T*r, in)`` and ``B_cat (out, T*r)``, expert ``k`` in rows/columns ``k*r:(k+1)*r``."""
        if self.expert_A is None:
            return self.frozen_A, self.frozen_B
        return (
            torch.cat([self.frozen_A, self.expert_A], dim=0),
            torch.cat([self.frozen_B, self.expert_B], dim=1),
        )

    # -- on disk: one stack of every expert ------------------------------------------------------

    LEGACY_NAMES = ("frozen_A", "frozen_B", "expert_A", "expert_B")
    """The names folders saved before the stacked layout used (they split the stack at the
    training expert); :meth:`from_legacy` reads them."""

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The bank as saved: ``experts_A (T*r, in)`` and ``experts_B (out, T*r)``, expert ``k`` in
        rows/columns ``k*r:(k+1)*r``; the count is the model config's."""
        a_cat, b_cat = self.stacked_weights()
        return {"experts_A": a_cat, "experts_B": b_cat}

    @torch.no_grad()
    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a saved stack into this bank (built with as many experts), split as it trains now."""
        n = self.frozen_A.shape[0]
        self.frozen_A.copy_(tensors["experts_A"][:n])
        self.frozen_B.copy_(tensors["experts_B"][:, :n])
        if self.expert_A is not None:
            self.expert_A.copy_(tensors["experts_A"][n:])
            self.expert_B.copy_(tensors["experts_B"][:, n:])

    @staticmethod
    def from_legacy(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A pre-stack folder's tensors (:data:`LEGACY_NAMES`) as :meth:`saved_tensors` names them."""
        a = [old[k] for k in ("frozen_A", "expert_A") if k in old]
        b = [old[k] for k in ("frozen_B", "expert_B") if k in old]
        return {"experts_A": torch.cat(a, dim=0), "experts_B": torch.cat(b, dim=1)}

    def delta(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Fused mixture for ``x (..., in)`` and ``gate (..., T)`` -> ``(..., out)``."""
        a_cat, b_cat = self.stacked_weights()
        z = F.linear(self.dropout(x.to(a_cat.dtype)), a_cat)  # (..., T*r)
        return F.linear(_gated(z, gate, self.scaling), b_cat)  # (..., out)

    def reference_delta(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The same mixture as :meth:`delta`, one expert at a time; slow, obvious, for tests."""
        a_cat, b_cat = self.stacked_weights()
        x = self.dropout(x.to(a_cat.dtype))
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for k in range(self.num_experts):
            rows = slice(k * self.rank, (k + 1) * self.rank)
            expert = (x @ a_cat[rows].T) @ b_cat[:, rows].T * self.scaling
            out = out + gate[..., k : k + 1].to(x.dtype) * expert
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expert_A is None:
            return self.base_layer(x)
        return self.reference_forward(x, self.gate.read(x, self.num_experts))

    def reference_forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``base(x) + delta(x, gate)`` computed apart: the stock form (the CPU backend's fused
        layer is tested against it)."""
        result = self.base_layer(x)
        return result + self.delta(x, gate).to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"experts={self.num_experts}, scaling={self.scaling:g}"
        )
