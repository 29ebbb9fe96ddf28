"""moecl: continual learning of large language models with mixtures of LoRA experts.

What a researcher writing their own training loop needs, importable from here:

- the models and their configs: :class:`PMoEModel`/:class:`PMoEConfig` (*Progressive Mixture of
  Experts with Asymmetric Transformer*, arXiv 2407.21571), :class:`MoSEsModel`/:class:`MoSEsConfig`
  (mixtures of sub-experts, arXiv 2511.06237), :class:`LoRAMoEModel`/:class:`LoRAMoEConfig`;
- PMoE's router losses: :func:`router_loss` (Eq. 7) and :func:`route_distill_loss`;
- TRACE's metrics (:func:`score`, :data:`METRICS`) and the continual-learning summaries
  (:func:`overall_performance`, :func:`backward_transfer`, :func:`forward_transfer`);
- a whole run from Python: :class:`RunConfig` and :func:`run` (what ``moecl run`` calls), and
  every method of ``--method`` in :data:`METHODS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "PMoEConfig": "moecl.models.pmoe_config",
    "PMoEModel": "moecl.models.pmoe",
    "MoSEsConfig": "moecl.models.moses",
    "MoSEsModel": "moecl.models.moses",
    "LoRAMoEConfig": "moecl.models.loramoe",
    "LoRAMoEModel": "moecl.models.loramoe",
    "router_loss": "moecl.methods.pmoe",
    "route_distill_loss": "moecl.methods.pmoe",
    "score": "moecl.evaluation.metrics",
    "METRICS": "moecl.evaluation.metrics",
    "overall_performance": "moecl.evaluation.continual",
    "backward_transfer": "moecl.evaluation.continual",
    "forward_transfer": "moecl.evaluation.continual",
    "RunConfig": "moecl.config",
    "run": "moecl.training.run",
    "METHODS": "moecl.methods",
}
__all__ = [
    "LoRAMoEConfig",
    "LoRAMoEModel",
    "METHODS",
    "METRICS",
    "MoSEsConfig",
    "MoSEsModel",
    "PMoEConfig",
    "PMoEModel",
    "RunConfig",
    "backward_transfer",
    "forward_transfer",
    "overall_performance",
    "route_distill_loss",
    "router_loss",
    "run",
    "score",
]

if TYPE_CHECKING:
    from moecl.config import RunConfig
    from moecl.evaluation.continual import backward_transfer, forward_transfer, overall_performance
    from moecl.evaluation.metrics import METRICS, score
    from moecl.methods import METHODS
    from moecl.methods.pmoe import route_distill_loss, router_loss
    from moecl.models.loramoe import LoRAMoEConfig, LoRAMoEModel
    from moecl.models.moses import MoSEsConfig, MoSEsModel
    from moecl.models.pmoe import PMoEModel
    from moecl.models.pmoe_config import PMoEConfig
    from moecl.training.run import run


def __getattr__(name: str) -> Any:
    # Imported on first use, so `moecl theory ...` and `moecl --help` start without transformers.
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'moecl' has no attribute {name!r}")
