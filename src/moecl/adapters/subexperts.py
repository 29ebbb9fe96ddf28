"""MoSEs' token-level top-k router over a pool of LoRA sub-experts, with task-aware routing
(our reading of the MoSEs paper, arXiv 2511.06237).

Per adapted projection, the pool's sub-experts live in a :class:`LoRAExpertBank` (the same
fused maths as PMoE's experts, ``rank`` = the sub-expert rank); this router is the bank's gate.
For a token ``x`` of an example routed as task ``t``::

    logits_j = <rms(x), key_j> + bias_t[j]      (bias_t[j] = -inf: sub-expert j is not task t's)
    gate     = softmax over the k largest logits, 0 elsewhere           # exactly k per token

``key_j`` belongs to sub-expert ``j`` and is frozen with it; ``bias_t`` is task ``t``'s key over
the pool: learned while ``t`` trains (over every sub-expert that exists then, so ``t`` can reuse
earlier ones) and frozen afterwards, with ``-inf`` for sub-experts opened later. Routing a
finished task therefore never changes, which isolates it; reuse shows in its bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskRouting:
    """The task whose routing each example of the batch in flight uses; shared by every router
    of a model, set by whoever knows the task (the trainer, the evaluator, task inference)."""

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None  # (batch,) long
        self.bypass = False  # True: every router gates 0, i.e. the adapters are off

    def ids(self, batch: int) -> torch.Tensor:
        ids = self.task_ids
        if ids is None or ids.shape != (batch,):
            got = None if ids is None else tuple(ids.shape)
            raise RuntimeError(
                f"no task routing for a batch of {batch} (task ids in flight: {got}); set "
                "MoSEsModel.given_task, pass task_ids= to its forward, or call its generate()"
            )
        return ids


class TopKRouter(nn.Module):
    """Top-k gate over a growing pool of sub-experts, with one bias row (key) per task.

    Args:
        in_features: width of the projection's input ``x``.
        top_k: sub-experts that contribute to each token.
        routing: the model's shared :class:`TaskRouting`.

    Tensors: ``frozen_keys (n_frozen, in)`` and ``frozen_bias (finished tasks, n_frozen)``
    (buffers); ``keys (n_new, in)`` and ``bias (pool,)`` (parameters of the task in training).
    """

    def __init__(self, in_features: int, top_k: int, routing: TaskRouting, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.top_k, self.routing = in_features, top_k, routing
        self.register_buffer("frozen_keys", torch.zeros(0, in_features, device=device))
        self.register_buffer("frozen_bias", torch.zeros(0, 0, device=device))
        self.register_parameter("keys", None)
        self.register_parameter("bias", None)

    @property
    def pool(self) -> int:
        return self.frozen_keys.shape[0] + (0 if self.keys is None else self.keys.shape[0])

    @property
    def num_tasks(self) -> int:
        return self.frozen_bias.shape[0] + (self.bias is not None)

    def add_task(self, new_experts: int) -> None:
        """Freeze the current task's keys and bias row; open ``new_experts`` keys and a new task row."""
        device = self.frozen_keys.device
        if self.keys is not None:
            self.frozen_keys = torch.cat([self.frozen_keys, self.keys.detach()])
            self.frozen_bias = torch.cat([self.frozen_bias, self.bias.detach()[None]])
        if self.pool + new_experts < self.top_k:
            raise ValueError(f"a pool of {self.pool + new_experts} sub-experts cannot route top_k={self.top_k}")
        unreachable = torch.full((self.frozen_bias.shape[0], new_experts), float("-inf"), device=device)
        self.frozen_bias = torch.cat([self.frozen_bias, unreachable], dim=1)  # old tasks never see new ones
        self.keys = nn.Parameter(torch.randn(new_experts, self.in_features, device=device) / self.in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(self.frozen_keys.shape[0] + new_experts, device=device))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x (batch, seq, in)`` -> ``(batch, seq, pool)``: token-key affinity plus the task's bias."""
        keys = torch.cat([self.frozen_keys, self.keys])
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        bias = torch.cat([self.frozen_bias, self.bias[None]])[self.routing.ids(x.shape[0])]  # (batch, pool)
        return F.linear(h, keys) + bias[:, None, :]

    def read(self, x: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The bank's gate: ``(batch, seq, pool)`` with exactly ``top_k`` non-zeros per token."""
        if num_experts != self.pool:
            raise RuntimeError(f"router has {self.pool} sub-experts, its bank {num_experts}")
        if self.routing.bypass:
            return x.new_zeros(*x.shape[:-1], num_experts, dtype=torch.float32)
        logits = self.logits(x)
        top, index = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, index, F.softmax(top, dim=-1))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, pool={self.pool}, tasks={self.num_tasks}, top_k={self.top_k}"


class TaskPrototypes(nn.Module):
    """One key per finished task for task-agnostic inference: the mean pooled hidden state of its
    training prompts, ``(tasks, hidden)``; a prompt is given the task of the most similar one."""

    def __init__(self, hidden_size: int, device: torch.device | None = None):
        super().__init__()
        self.register_buffer("keys", torch.zeros(0, hidden_size, device=device))
        self.register_buffer("known", torch.zeros(0, dtype=torch.bool, device=device))

    def add_task(self) -> None:
        self.keys = torch.cat([self.keys, self.keys.new_zeros(1, self.keys.shape[1])])
        self.known = torch.cat([self.known, self.known.new_zeros(1)])

    def set(self, task_index: int, key: torch.Tensor) -> None:
        self.keys[task_index] = key.to(self.keys)
        self.known[task_index] = True

    def nearest(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled (batch, hidden)`` -> the most cosine-similar known task per row, ``(batch,)``."""
        if not bool(self.known.any()):
            raise RuntimeError("no task key is known yet: task inference needs at least one finished task")
        sim = F.normalize(pooled.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T
        return sim.masked_fill(~self.known, float("-inf")).argmax(-1)
