"""PMoE on a Hugging Face causal LM: surgery, the router's place, growth, save and load (arXiv 2407.21571).

Reading order of a forward pass::

    input -> blocks 1..tau      (q/v wrapped in LoRALinear: one shared adapter)
          -> block tau's output h_tau --[forward hook PMoEModel._route]--> router -> self.gate
          -> blocks tau+1..N    (q/v wrapped in LoRAExpertBank, each reading self.gate)
          -> LM head

``self.gate`` (a :class:`~moecl.adapters.router.GateState`) is created here and handed to every
deep bank at construction; it is the only path by which the gate reaches the deep blocks.
Because the router runs inside the base model's own forward, ``generate()`` with a KV cache,
left-padded batches and gradient checkpointing work unchanged: every call routes exactly the
tokens it processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.adapters.lora import LoRALinear
from moecl.adapters.router import GateState, Router
from moecl.models.adapter_model import AdapterModel
from moecl.models.architectures import (
    hidden_size,
)
from moecl.models.pmoe_config import PMoEConfig


class _Routed(Exception):
    """Ends a forward pass once the router has run (see :meth:`PMoEModel._route_pass`)."""


class PMoEModel(AdapterModel):
    """A causal LM with PMoE adapters; the base model's weights stay frozen.

    Args:
        base_model: a Hugging Face decoder-only causal LM (``AutoModelForCausalLM``).
        config: where to split, what to adapt, and the LoRA hyper-parameters.

    The model starts with no experts: call :meth:`add_task` before training each task. At
    construction (and after every ``add_task``) outputs equal the base model's, since every new
    ``B`` is zero.
    """

    FORMAT = "moecl.pmoe"
    CONFIG = PMoEConfig
    CONFIG_KEY = "pmoe"
    TASKS_KEY = "num_experts"
    # Folders saved before the router had logit offsets lack them; zero offsets are what those
    # routers were.
    OPTIONAL_KEYS = frozenset({"router.bias"})

    def __init__(self, base_model: PreTrainedModel, config: PMoEConfig | None = None):
        self.adapter_config = config or PMoEConfig()
        super().__init__(base_model, self.adapter_config.target_modules)
        self.tau = self.adapter_config.shallow_blocks(self.num_blocks)
        self.gate = GateState()
        self._num_experts = 0
        self._active_task = 0
        self._keep_hidden, self._hidden_tau = False, None  # h_tau of a probe (see add_task)
        self._route_only = False  # end the pass at the router (see _route_pass)
        self._recording, self._recorded = False, None  # a pass's first gate (see recording_gates)
        self.router: Router | None = (
            Router(
                hidden_size(base_model),
                device=base_model.get_input_embeddings().weight.device,
                normalize=self.adapter_config.router_norm,
            )
            if self.adapter_config.gate == "router"
            else None
        )
        cfg = self.adapter_config
        self.wrap_targets(
            lambda index, layer: (
                LoRALinear(layer, cfg.rank, cfg.alpha, cfg.dropout)
                if index < self.tau
                else LoRAExpertBank(layer, cfg.rank, cfg.alpha, self.gate, cfg.dropout)
            )
        )
        # The router reads h_tau: block tau's output, or the embeddings entering block 1 if tau = 0.
        # A fixed gate (config.gate "sum" or "task") needs no hook: it is set when it changes.
        if self.router is not None and self.tau > 0:
            self.blocks[self.tau - 1].register_forward_hook(self._route)
        elif self.router is not None:
            self.blocks[0].register_forward_pre_hook(self._route_input, with_kwargs=True)

    # -- structure -------------------------------------------------------------------------

    def deep_banks(self) -> Iterator[LoRAExpertBank]:
        return (m for m in self.base_model.modules() if isinstance(m, LoRAExpertBank))

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def num_tasks(self) -> int:
        return self._num_experts

    @property
    def active_task(self) -> int:
        """The task whose expert the ``"task"`` gate selects (ignored by the other gates)."""
        return self._active_task

    @active_task.setter
    def active_task(self, task_index: int) -> None:
        if not 0 <= task_index < max(1, self.num_experts):
            raise ValueError(f"task {task_index} has no expert: the model has {self.num_experts}")
        self._active_task = task_index
        self._set_fixed_gate()

    # -- routing -----------------------------------------------------------------------------

    def _route(self, module: nn.Module, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        self._set_gate(hidden)

    def _route_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self._set_gate(hidden)

    def _set_gate(self, hidden: torch.Tensor) -> None:
        routed = hidden.detach() if self.adapter_config.router_detach else hidden
        self.gate.probs = self.router(routed) if self.num_experts else None
        self._hidden_tau = hidden if self._keep_hidden else None
        if self._recording and self._recorded is None:
            self._recorded = self.gate.probs.detach()
        if self._route_only:
            raise _Routed

    def _set_fixed_gate(self) -> None:
        """``(1, 1, experts)`` weights broadcast over every token: all ones, or one-hot of the task."""
        if self.router is not None or not self.num_experts:
            return
        device = self.base_model.get_input_embeddings().weight.device
        if self.adapter_config.gate == "sum":
            probs = torch.ones(1, 1, self.num_experts, device=device)
        else:
            probs = torch.zeros(1, 1, self.num_experts, device=device)
            probs[..., self._active_task] = 1.0
        self.gate.probs = probs

    # -- growth and training -----------------------------------------------------------------

    def add_task(self, probe: dict[str, torch.Tensor] | None = None) -> int:
        """Open expert ``t`` in every deep bank and router column ``t``; freeze expert ``t-1``
        (and, with ``freeze_router``, the old router columns). With the ``"task"`` gate the
        active task stays where it was (set :attr:`active_task`).

        Args:
            probe: a batch of the new task's prompts (``input_ids``, ``attention_mask``). Copy and
                share growth (``expert_init``/``router_init``) measure on it which expert the
                router already sends the task to and its logits; without it they take the
                newest expert and an untrained router's logits.

        Returns:
            ``t``, the 0-based index of the new expert (its router column).
        """
        cfg, router = self.adapter_config, self.router
        grows_from_data = cfg.expert_init == "copy" or cfg.router_init != "zero"
        source, log_z = self.num_experts - 1, None
        if router is not None and self.num_experts and grows_from_data:
            source, log_z = self._probe(probe)
        copy_expert = source if cfg.expert_init == "copy" and self.num_experts else None
        for bank in self.deep_banks():
            bank.add_expert(copy_from=copy_expert)
        if router is not None:
            column, bias = None, 0.0
            if self.num_experts and cfg.router_init == "copy":
                column = router.columns()[source].clone()
                if copy_expert is not None:  # the two halves of the old gate: output unchanged
                    router.bias[source] -= math.log(2.0)
                bias = float(router.bias[source])
            elif self.num_experts and cfg.router_init == "share":
                share = cfg.router_share
                bias = math.log(share / (1.0 - share)) + log_z
            router.add_expert(column, bias, freeze_old=cfg.freeze_router)
        self._num_experts += 1
        self._set_fixed_gate()
        return self.num_experts - 1

    @torch.no_grad()
    def _probe(self, probe: dict[str, torch.Tensor] | None) -> tuple[int, float]:
        """The most-used expert on ``probe``'s tokens and the mean log-partition of the router's
        logits there (the offset a new expert's logit needs for a given share)."""
        if probe is None:
            return self.num_experts - 1, float(torch.logsumexp(self.router.bias, 0))
        mask = probe["attention_mask"].bool()
        logits = self.router.logits(self.hidden_tau(probe["input_ids"], probe["attention_mask"]))[mask]
        source = int(logits.softmax(-1).mean(0).argmax())
        return source, float(torch.logsumexp(logits, -1).mean())

    def end_task(self) -> None:
        """Called once the current task has trained: align the newest router column if asked."""
        if self.router is not None and self.adapter_config.router_align:
            self.router.align_newest()

    def _route_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Run blocks ``1..tau`` and the router only, for a caller that wants the gate (and
        ``h_tau``) but not the output: the routing hook raises :class:`_Routed` once it has set
        them, so the deep blocks and the vocabulary projection never run. At SmolLM2-135M's
        ``tau = 0.75`` that is 22 of 30 blocks' work."""
        self._route_only = True
        try:
            self.forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Routed:
            pass
        finally:
            self._route_only = False

    # -- forward, routing probabilities, generation -------------------------------------------

    @torch.no_grad()
    def hidden_tau(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The router's input ``h_tau``, ``(batch, seq, hidden)``, from blocks ``1..tau`` alone."""
        if self.router is None or not self.num_experts:
            raise ValueError("h_tau is read by the router: the model needs the router gate and an expert")
        self._keep_hidden = True
        try:
            self._route_pass(input_ids, attention_mask)
            return self._hidden_tau.detach()
        finally:
            self._keep_hidden, self._hidden_tau = False, None

    @torch.no_grad()
    def router_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Router distribution per token, ``(batch, seq, num_experts)``; each row sums to 1."""
        if self.router is None:
            raise ValueError(f"this model has the fixed {self.adapter_config.gate!r} gate, no router")
        if not self.num_experts:
            raise ValueError("the model has no experts yet; call add_task() first")
        self._route_pass(input_ids, attention_mask)
        return self.gate.probs.detach().clone()

    @contextlib.contextmanager
    def recording_gates(self) -> Iterator[Callable[[], torch.Tensor | None]]:
        """Keep the gate of the first forward pass after each call of the yielded ``take``.

        ``take()`` returns that gate, ``(batch, seq, num_experts)``, and arms the next one. Around
        ``generate()`` the first pass is the prompt's (the prefill; later passes see one new
        token each), so evaluation reads where the router sends every prompt token without a
        second forward pass over the prompts.
        """
        if self.router is None:
            raise ValueError(f"this model has the fixed {self.adapter_config.gate!r} gate, no router")

        def take() -> torch.Tensor | None:
            gate, self._recorded = self._recorded, None
            return gate

        self._recording, self._recorded = True, None
        try:
            yield take
        finally:
            self._recording, self._recorded = False, None

    # -- persistence ---------------------------------------------------------------------------

    def save_meta(self) -> dict[str, Any]:
        return {**super().save_meta(), "tau_blocks": self.tau}
