"""Seed 003's theory of mixtures of experts in continual learning, as simulators (SPEC §3)."""

from moecl.theory.linear import LinearMoEConfig, LinearMoEResult, simulate

__all__ = ["LinearMoEConfig", "LinearMoEResult", "simulate"]
