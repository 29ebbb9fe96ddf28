"""Configuration of a PMoE model (arXiv 2407.21571), saved as JSON next to the adapter weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GATES = ("router", "sum", "task")
EXPERT_INITS = ("zero", "copy")
ROUTER_INITS = ("zero", "copy", "share")


@dataclass
class PMoEConfig:
    """Hyper-parameters of the asymmetric progressive mixture of LoRA experts.

    The defaults are those ``moecl run`` uses, chosen on validation splits (rank 8, alpha 16,
    every linear layer of the blocks, the routed router: normalised input, frozen old columns,
    aligned new ones, a detached router input); :meth:`paper` gives the paper's own.

    Args:
        tau: last shallow block. An int ``0..N`` counts blocks (the paper: 24 of 32); a float
            strictly between 0 and 1 is a fraction of ``N``, rounded to the nearest block (0.75 ->
            24 of 32); ``"all"``: every block shallow (no expert banks). ``0.0`` and ``1.0`` are
            refused: written as floats they read as "no block" and "one block" to one reader and
            as fractions to another; write ``0``, ``1`` or ``"all"``.
            Blocks ``1..tau`` share one LoRA; blocks ``tau+1..N`` hold the expert banks; the
            router reads the hidden state block ``tau`` outputs (the embeddings when 0).
        rank: LoRA rank ``r`` of the shallow adapter and of every expert (the paper: 4).
        alpha: LoRA scale numerator; deltas are multiplied by ``alpha / rank``.
        dropout: dropout on the adapters' input during training.
        target_modules: names of the projections to adapt inside each block, matched against
            the last component of the module path (``"q_proj"``) or the path inside the block
            (``"self_attn.q_proj"``); ``["all-linear"]`` every linear layer of the blocks; ``None``
            the family's q and v (the paper).
        router_norm: RMS-normalise ``h_tau`` before the router (see
            :class:`~moecl.adapters.router.Router`); ``False`` is the paper's literal Eq. 4.
        gate: how the deep experts are weighted. ``"router"`` is PMoE's learned softmax router;
            the two fixed gates turn the same banks into baselines without a router:
            ``"sum"`` weights every expert 1 (O-LoRA: all task adapters summed) and ``"task"``
            weights only the expert of :attr:`PMoEModel.active_task` (one LoRA per task, the
            task id given).
        expert_init: how a new expert starts. ``"zero"`` (the paper; LoRA's ``B = 0``): an exact
            no-op until it trains. ``"copy"`` (ours, after MoExtend): a copy of the expert the
            router sends the new task to most (measured on a probe of its prompts; the newest
            expert without one). With ``router_init="copy"`` the copied expert and its copy split
            the old gate in two equal halves, so the model's output is unchanged at growth.
        router_init: how the new router column starts. ``"zero"`` (the paper): the logit an
            untrained router gives. ``"copy"`` (MoExtend): the column of the most-used expert
            (see ``expert_init``). ``"share"`` (ours): a zero column with a logit offset that gives
            the new expert ``router_share`` of the gate on the probe's tokens on average.
        router_share: the new expert's gate at growth with ``router_init="share"``.
        freeze_router: ``True`` (ours, after MoExtend and SAPT): earlier columns are frozen
            (buffers, untouched by any optimizer) and only the new expert's column trains, so a
            new task can only win inputs for its expert, not move old tasks between old experts.
            ``False`` (the paper): every column keeps training.
        router_align: at the end of each task rescale the newest column to the mean norm of the
            older non-zero ones (PyCIL's weight aligning, against the newest column taking every
            input under a small replay memory).
        router_detach: ``True`` (ours): the router reads ``h_tau`` without passing gradients back
            into the shallow blocks, so routing losses (Eq. 7, distillation) train the router only
            and cannot bend the shared shallow LoRA towards task-identifying features. ``False``
            (the paper): one graph.
    """

    tau: int | float | str = 0.75
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = field(default_factory=lambda: ["all-linear"])
    router_norm: bool = True
    gate: str = "router"
    expert_init: str = "zero"
    router_init: str = "zero"
    router_share: float = 0.5
    freeze_router: bool = True
    router_align: bool = True
    router_detach: bool = True

    @classmethod
    def paper(cls, **overrides: Any) -> PMoEConfig:
        """The configuration the PMoE paper describes: rank 4, alpha 8, q and v adapted, the raw
        ``h_tau`` into the router (Eq. 4), every router column training in one graph with the
        shallow LoRA, no column alignment. ``overrides`` change single fields."""
        paper = dict(
            rank=4,
            alpha=8.0,
            target_modules=None,
            router_norm=False,
            freeze_router=False,
            router_align=False,
            router_detach=False,
        )
        return cls(**{**paper, **overrides})

    def __post_init__(self) -> None:
        for name, allowed in (("gate", GATES), ("expert_init", EXPERT_INITS), ("router_init", ROUTER_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 < self.router_share < 1.0:
            raise ValueError(f"router_share is the new expert's gate at growth, in (0, 1); got {self.router_share!r}")
        check_tau(self.tau)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty; name at least one projection or pass None")

    def shallow_blocks(self, num_blocks: int) -> int:
        """``tau`` as a number of blocks for a model with ``num_blocks`` decoder blocks."""
        tau = (
            num_blocks
            if self.tau == "all"
            else round(self.tau * num_blocks)
            if isinstance(self.tau, float)
            else self.tau
        )
        if not 0 <= tau <= num_blocks:
            raise ValueError(
                f"tau={self.tau} is outside 0..{num_blocks}: the model has {num_blocks} decoder blocks; "
                f"choose an int in 0..{num_blocks} or a fraction in [0, 1]"
            )
        return tau

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> PMoEConfig:
        """The config of a saved folder; folders written before ``tau`` refused 0.0 and 1.0 meant
        by them 0 blocks and every block."""
        tau = saved.get("tau")
        if isinstance(tau, float) and tau in (0.0, 1.0):
            saved = {**saved, "tau": 0 if tau == 0.0 else "all"}
        return cls(**saved)


def check_tau(tau: Any) -> None:
    """Refuse a ``tau`` a reader could misread (see :class:`PMoEConfig`)."""
    if tau == "all" and isinstance(tau, str):
        return
    if isinstance(tau, bool) or not isinstance(tau, int | float):
        raise ValueError(
            f"tau={tau!r}: give an int number of shallow blocks (24), a fraction strictly between 0 and 1 "
            "(0.75), or all"
        )
    if isinstance(tau, float) and tau in (0.0, 1.0):
        raise ValueError(
            f"tau={tau} is ambiguous (no block, one block, or every block?): write 0 for no shallow block, 1 "
            "for one, all for every block, or a fraction strictly between 0 and 1"
        )
    if isinstance(tau, float) and not 0.0 < tau < 1.0:
        raise ValueError(
            f"tau={tau} is a fraction outside (0, 1); give a fraction of the blocks (0.75), an int number of "
            "shallow blocks (24), or all"
        )
    if isinstance(tau, int) and tau < 0:
        raise ValueError(f"tau={tau} is negative; it counts shallow blocks, 0..N")
