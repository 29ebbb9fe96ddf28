"""Compute backends: optional, per-model replacements of a model's modules by faster ones that
compute the same function. moecl's default is the stock modules of PyTorch and transformers;
``moecl run --kernels auto`` applies :mod:`moecl.backends.cpu` to the run's own model where it
was measured to help (a float32 model on an AMD CPU) and nowhere else; ``--kernels cpu`` applies
it to any float32 model on a CPU.

Nothing here changes a module the caller did not hand over: each backend converts one model in
place and returns an :class:`Applied` that says what it changed and undoes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

KERNELS = ("auto", "stock", "cpu")


@dataclass
class Applied:
    """What a backend changed in one model: ``changes`` counts each kind of converted module;
    :meth:`undo` puts every one of them back (the same objects, parameters and state dict)."""

    backend: str
    changes: dict[str, int] = field(default_factory=dict)
    undos: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def merge(self, other: Applied) -> None:
        for key, count in other.changes.items():
            self.changes[key] = self.changes.get(key, 0) + count
        self.undos.extend(other.undos)

    def undo(self) -> None:
        while self.undos:
            self.undos.pop()()
        self.changes = {}

    def to_json(self) -> dict:
        return {"backend": self.backend, "changes": dict(self.changes)}


def backend_for(kernels: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which backend ``--kernels`` gives a model on ``device`` in ``dtype``: ``cpu`` for a float32
    model on the CPU with ``--kernels cpu``, or with ``auto`` on an AMD CPU (where it was measured
    to help: on this project's Intel machine the main job took 665 s with it, 650 s without);
    ``stock`` for anything else (GPUs, bf16/fp16, ``--kernels stock``)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not one of {', '.join(KERNELS)}")
    if kernels == "stock" or device.type != "cpu" or dtype != torch.float32:
        return "stock"
    if kernels == "cpu":
        return "cpu"
    from moecl.backends.cpu.mkl import cpu_vendor

    return "cpu" if cpu_vendor() == "AuthenticAMD" else "stock"


def apply_backend(model: nn.Module, kernels: str, device: torch.device, dtype: torch.dtype) -> Applied:
    """Apply the backend :func:`backend_for` picks to ``model`` (in place); a model compiled with
    ``torch.compile`` keeps its stock modules. Calling it again converts modules added since
    (a new task's adapters) and returns those alone."""
    name = backend_for(kernels, device, dtype)
    compiled = type(model).__name__ == "OptimizedModule" or getattr(model, "_compiled_call_impl", None) is not None
    if name == "stock" or compiled:
        return Applied("stock")
    from moecl.backends import cpu

    return cpu.apply(model)
