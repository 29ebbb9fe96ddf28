"""Continual-learning methods as plug-ins on the one training template."""

from moecl.methods.base import Method
from moecl.methods.pmoe import PMoEMethod

METHODS: dict[str, type[Method]] = {"pmoe": PMoEMethod}

__all__ = ["METHODS", "Method", "PMoEMethod"]
