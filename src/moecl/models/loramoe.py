"""LoRAMoE (arXiv 2312.09979): on every target projection a fixed bank of LoRA experts and a
token router of its own; the closest mixture baseline to PMoE that does not grow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PreTrainedModel

from moecl.adapters.mixture import LoRAMixtureLinear
from moecl.models.adapter_model import AdapterModel


@dataclass
class LoRAMoEConfig:
    """Hyper-parameters of LoRAMoE.

    Args:
        rank: rank of each expert.
        alpha: an expert's delta is scaled by ``alpha / rank`` (then by its gate).
        experts: experts per projection (the paper: 6); the first half serve replayed earlier
            tasks, the second the current task, under the balancing constraint.
        dropout: dropout on the experts' input.
        target_modules: projections to adapt (``["all-linear"]``: every linear layer of the blocks).
    """

    rank: int = 8
    alpha: float = 16.0
    experts: int = 6
    dropout: float = 0.0
    target_modules: list[str] | None = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self) -> None:
        if self.rank < 1 or self.experts < 2:
            raise ValueError(f"rank must be at least 1 and experts at least 2, got {self.rank} and {self.experts}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoRAMoEModel(AdapterModel):
    """A causal LM whose target projections carry :class:`LoRAMixtureLinear` adapters."""

    FORMAT = "moecl.loramoe"
    CONFIG = LoRAMoEConfig
    CONFIG_KEY = "loramoe"

    def __init__(self, base_model: PreTrainedModel, config: LoRAMoEConfig | None = None):
        self.adapter_config = config or LoRAMoEConfig()
        super().__init__(base_model, self.adapter_config.target_modules)
        c = self.adapter_config
        self.wrap_targets(lambda _i, layer: LoRAMixtureLinear(layer, c.rank, c.alpha, c.experts, c.dropout))
        self._tasks = 0

    @property
    def num_tasks(self) -> int:
        """Tasks trained so far (the bank itself stays as it is)."""
        return self._tasks

    def add_task(self) -> int:
        self._tasks += 1
        return self._tasks - 1

    def mixtures(self) -> list[LoRAMixtureLinear]:
        return [m for m in self.modules() if isinstance(m, LoRAMixtureLinear)]
