"""Surgery on Hugging Face models: where adapters go and how the router is wired."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["PMoEConfig", "PMoEModel"]

if TYPE_CHECKING:
    from moecl.models.pmoe import PMoEModel
    from moecl.models.pmoe_config import PMoEConfig


def __getattr__(name: str) -> Any:
    # Imported on first use: a config (plain dataclasses) must not load torch and transformers.
    where = {"PMoEConfig": "moecl.models.pmoe_config", "PMoEModel": "moecl.models.pmoe"}
    if name in where:
        return getattr(importlib.import_module(where[name]), name)
    raise AttributeError(f"module 'moecl.models' has no attribute {name!r}")
