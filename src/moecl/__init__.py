"""moecl: continual learning of large language models with mixtures of LoRA experts."""

from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig

__all__ = ["PMoEConfig", "PMoEModel"]
__version__ = "0.1.0"
