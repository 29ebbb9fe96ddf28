"""PMoE's router (arXiv 2407.21571): ``G(x) = softmax(h_tau W_g + b)``, one column per expert.

The router is computed once per forward pass, at the boundary between the shallow and the deep
blocks, and the same gate weights every deep expert bank. :class:`GateState` is the one object
through which that gate travels: the model that owns the router writes it, and every deep bank
holds a reference to the same instance and reads it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_LAST_POSITIONS: contextvars.ContextVar[int | None] = contextvars.ContextVar("moecl_last_positions", default=None)


@contextlib.contextmanager
def computing_last_positions(n: int) -> Iterator[None]:
    """Inside: a block computes the last ``n`` positions of the pass alone (the model's last block
    when only their logits are wanted, :class:`moecl.backends.cpu.last_block.LastColumnsBlock`), so a
    :class:`GateState` hands an input of ``n`` positions those positions' gate."""
    token = _LAST_POSITIONS.set(n)
    try:
        yield
    finally:
        _LAST_POSITIONS.reset(token)


class GateState:
    """The gate of the forward pass in flight, shared by the router and the deep expert banks.

    ``probs`` has shape ``(batch, seq, num_experts)``: one distribution per token, over the
    experts that exist; a fixed gate (the same weights for every token) may be ``(1, 1,
    num_experts)``. It is overwritten by every forward pass; under gradient checkpointing
    the deep blocks' recomputation reads it again during backward, so call ``backward()``
    before the next forward (the usual training loop does).
    """

    def __init__(self) -> None:
        self.probs: torch.Tensor | None = None

    def read(self, x: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The gate for the tokens of ``x (..., d_in)``: ``(..., num_experts)``.

        Inside :func:`computing_last_positions` ``(n)``, an ``x`` of ``n`` positions gets the
        gate of the pass's last ``n``.
        Raises if no router has run for this input, which happens only when a deep block is
        called on its own rather than through the model that owns the router.
        """
        probs = self.probs
        n = _LAST_POSITIONS.get()
        if n is not None and probs is not None and probs.dim() == x.dim() == 3 and x.shape[1] == n < probs.shape[1]:
            probs = probs[:, -n:]
        if probs is None or probs.shape[-1] != num_experts or not _broadcasts(probs.shape[:-1], x.shape[:-1]):
            got = None if probs is None else tuple(probs.shape)
            raise RuntimeError(
                f"no router gate for an input of shape {tuple(x.shape)} over {num_experts} experts "
                f"(gate in flight: {got}); call the PMoEModel, not a deep block or its base model "
                "directly"
            )
        return probs


def _broadcasts(gate_shape: torch.Size, token_shape: torch.Size) -> bool:
    if len(gate_shape) != len(token_shape):
        return False
    return all(g in (1, n) for g, n in zip(gate_shape, token_shape, strict=True))


class Router(nn.Module):
    """Linear softmax router over a growing set of experts.

    Args:
        hidden_size: width of ``h_tau``.
        device: where the weights live.
        normalize: divide ``h_tau`` by its root mean square before the linear layer. The residual
            stream of a deep block can have norms in the hundreds, so a router weight of norm 0.5
            already saturates the softmax: measured on SmolLM2-135M, the first trained column
            took 98% of every task's gate and experts added later got 0.00, i.e. never trained.
            ``False`` is the paper's literal ``softmax(h_tau W_g)``.

    Tensors: ``weight (n_train, hidden)``, the columns that train (all of them, or only the
    newest when old columns are frozen); ``frozen (n_frozen, hidden)``, frozen columns, a buffer
    no optimizer sees; ``bias (num_experts,)``, fixed logit offsets set when an expert is added
    (zero unless growth copies an expert or gives it a set share; all zero is the paper's
    bias-free Eq. 4). Expert ``k``'s column is row ``k`` of ``cat([frozen, weight])``.

    Everything is kept in float32 whatever the model's dtype: it is tiny and a softmax over
    half-precision logits loses the small gate differences training relies on.
    """

    def __init__(self, hidden_size: int, device: torch.device | None = None, normalize: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.normalize = normalize
        self.weight = nn.Parameter(torch.zeros(0, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("frozen", torch.zeros(0, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(0, dtype=torch.float32, device=device))

    @property
    def num_experts(self) -> int:
        return self.frozen.shape[0] + self.weight.shape[0]

    def columns(self) -> torch.Tensor:
        """Every expert's column, ``(num_experts, hidden)``, expert ``k`` in row ``k``."""
        return torch.cat([self.frozen, self.weight], dim=0)

    # -- on disk: every column in one matrix --------------------------------------------------------

    LEGACY_NAMES = ("weight", "frozen", "bias")
    """The names folders saved before the stacked layout used; :meth:`from_legacy` reads them."""

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The router as saved: ``columns (T, hidden)`` (expert ``k`` in row ``k``, whether it
        trains or not) and ``bias (T,)``."""
        return {"columns": self.columns(), "bias": self.bias}

    @torch.no_grad()
    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved columns (and offsets, when the folder has them: older ones have none, i.e.
        zero) into this router, built with as many experts and split as it trains now."""
        n = self.frozen.shape[0]
        self.frozen.copy_(tensors["columns"][:n])
        self.weight.copy_(tensors["columns"][n:])
        if "bias" in tensors:
            self.bias.copy_(tensors["bias"])

    @staticmethod
    def from_legacy(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A pre-stack folder's tensors (``frozen`` rows first, then ``weight``; folders older
        still have neither ``frozen`` nor ``bias``) as :meth:`saved_tensors` names them."""
        columns = torch.cat([old["frozen"], old["weight"]]) if "frozen" in old else old["weight"]
        return {"columns": columns, **({"bias": old["bias"]} if "bias" in old else {})}

    def add_expert(self, column: torch.Tensor | None = None, bias: float = 0.0, freeze_old: bool = False) -> None:
        """Append one column (``column``, or zero) with logit offset ``bias``.

        A zero column gives the new expert the logit an untrained router gives every expert, so
        the new expert starts with a fair share of the gate rather than none or all of it.
        ``freeze_old`` moves the columns trained so far into the frozen buffer first, so only the
        new column trains.
        """
        old = self.weight.detach()
        if freeze_old:
            self.frozen = torch.cat([self.frozen, old], dim=0)
            old = old[:0]
        new = torch.zeros(1, self.hidden_size, dtype=old.dtype, device=old.device)
        if column is not None:
            new.copy_(column.detach().reshape(1, -1))
        self.weight = nn.Parameter(torch.cat([old, new], dim=0))
        self.bias = torch.cat([self.bias, self.bias.new_tensor([bias])])

    @torch.no_grad()
    def align_newest(self) -> None:
        """Rescale the newest column to the mean norm of the older non-zero columns (PyCIL's weight
        aligning: under a small replay memory the newest column grows larger than the old ones
        and takes every input). A no-op while no older column is non-zero."""
        cols = self.columns()
        old = cols[:-1].norm(dim=1)
        old = old[old > 0]
        newest = cols[-1].norm()
        if len(old) and newest > 0:
            self.weight[-1].mul_(old.mean() / newest)

    def refit(self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, steps: int, lr: float) -> None:
        """Fit every column at once, frozen ones included, by weighted cross-entropy on given tokens.

        A consolidation step between tasks (full batch, Adam from the current columns; the
        offsets stay). Deterministic for the same inputs on the same device.

        Args:
            hidden: the router's input on some tokens, ``(tokens, hidden)``.
            labels: the expert each token belongs to, ``(tokens,)``, values below ``num_experts``.
            weights: each token's weight in the loss, ``(tokens,)``, summing to 1.
            steps: Adam steps.
            lr: Adam's learning rate.
        """
        columns = self.columns().detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([columns], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                logp = F.log_softmax(self._linear(hidden, columns), dim=-1)  # (tokens, experts)
                loss = -(logp.gather(-1, labels[:, None]).squeeze(-1) * weights).sum()
                loss.backward()
                optimizer.step()
        self.load_saved({"columns": columns.detach()})

    def _linear(self, hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(columns.dtype)
        if self.normalize:
            hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        return F.linear(hidden, columns, self.bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (batch, seq, hidden)`` -> logits ``(batch, seq, num_experts)``."""
        return self._linear(hidden, self.columns())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (batch, seq, hidden)`` -> gate ``(batch, seq, num_experts)``, rows sum to 1."""
        return F.softmax(self.logits(hidden), dim=-1)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, experts={self.num_experts}, normalize={self.normalize}"
