"""Surgery on Hugging Face models: where adapters go and how the router is wired."""

from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig

__all__ = ["PMoEConfig", "PMoEModel"]
