"""The theory of mixtures of experts in continual learning as simulators (*Theory on
Mixture-of-Experts in Continual Learning*, arXiv 2406.16437)."""

from moecl.theory.linear import LinearMoEConfig, LinearMoEResult, simulate

__all__ = ["LinearMoEConfig", "LinearMoEResult", "simulate"]
