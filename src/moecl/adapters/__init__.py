"""Layer maths of the adapters: no knowledge of any model's structure."""

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.adapters.lora import LINEAR_TYPES, LoRALinear, linear_features
from moecl.adapters.router import GateState, Router

__all__ = ["LINEAR_TYPES", "GateState", "LoRAExpertBank", "LoRALinear", "Router", "linear_features"]
