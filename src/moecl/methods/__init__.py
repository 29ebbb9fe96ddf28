"""Continual-learning methods as plug-ins on the one training template."""

from moecl.methods.base import Method
from moecl.methods.full import SeqFTMethod
from moecl.methods.icl import ICLMethod
from moecl.methods.lora import MTLMethod, OLoRAMethod, PerTaskLoRAMethod, SeqLoRAMethod
from moecl.methods.loramoe import LoRAMoEMethod
from moecl.methods.moses import MoSEsMethod
from moecl.methods.pmoe import PMoEMethod
from moecl.methods.regularized import AGEMMethod, EWCMethod, LwFMethod

METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        PMoEMethod,
        MoSEsMethod,
        SeqFTMethod,
        SeqLoRAMethod,
        OLoRAMethod,
        PerTaskLoRAMethod,
        MTLMethod,
        ICLMethod,
        EWCMethod,
        LwFMethod,
        AGEMMethod,
        LoRAMoEMethod,
    )
}

__all__ = [
    "METHODS",
    "AGEMMethod",
    "EWCMethod",
    "LoRAMoEMethod",
    "LwFMethod",
    "ICLMethod",
    "MTLMethod",
    "Method",
    "MoSEsMethod",
    "OLoRAMethod",
    "PMoEMethod",
    "PerTaskLoRAMethod",
    "SeqFTMethod",
    "SeqLoRAMethod",
]
