"""moecl: continual learning of large language models with mixtures of LoRA experts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["PMoEConfig", "PMoEModel"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from moecl.models import PMoEConfig, PMoEModel


def __getattr__(name: str) -> Any:
    # Imported on first use, so `moecl theory ...` starts without loading transformers.
    if name in __all__:
        import moecl.models

        return getattr(moecl.models, name)
    raise AttributeError(f"module 'moecl' has no attribute {name!r}")
