"""The CPU backend: a float32 model's modules on the fastest kernels PyTorch's CPU build has for
them, each piece computing the function of the module it replaces (tests hold every piece to its
stock module: logits, gradients, generations).

Pieces, applied to one model by :func:`apply`:

- ``linear`` (:mod:`.linear`): every ``nn.Linear`` on oneDNN's product (or MKL's, where
  :mod:`.mkl` was opted into);
- ``attention`` (:mod:`.attention`): grouped-query attention without repeating keys and values,
  and causal attention of a training step as batched products with the gradient written out;
- ``last_block`` (:mod:`.last_block`): Llama's last block computes only the positions whose
  logits are kept (version-guarded: it mirrors transformers' code);
- ``adapters`` (:mod:`.adapters`): the shallow LoRA as one product with the merged weight, and
  the expert banks' mixture accumulated into the base product.

Process-wide settings, made only by :func:`prepare_process` (``moecl run --kernels auto`` on CPU
calls it before the model loads; importing moecl and loading a model never do): glibc keeps freed
memory (:mod:`.memory`), and, with ``MOECL_MKL_UNLOCK=1`` only, MKL's vendor check (:mod:`.mkl`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from moecl.backends import Applied
from moecl.backends.cpu import adapters, attention, last_block, linear
from moecl.backends.cpu.memory import keep_freed_memory
from moecl.backends.cpu.mkl import unlock_mkl

PIECES = {
    "linear": linear.convert,
    "attention": attention.convert,
    "last_block": last_block.convert,
    "adapters": adapters.convert,  # after linear: a converted base layer is still an nn.Linear
}
"""Each piece's conversion of a model, by name, in the order :func:`apply` makes them."""


def apply(model: nn.Module, pieces: Iterable[str] | None = None) -> Applied:
    """Convert ``model`` in place (``pieces``: some of :data:`PIECES`, default all); returns what
    changed, and undoes it. A second call converts only modules added since (a new task's
    adapters)."""
    chosen = set(PIECES) if pieces is None else set(pieces)
    if chosen - set(PIECES):
        raise ValueError(f"unknown backend pieces {sorted(chosen - set(PIECES))}; pieces: {', '.join(PIECES)}")
    applied = Applied("cpu")
    for name, convert in PIECES.items():
        if name in chosen:
            applied.merge(convert(model))
    return applied


def prepare_process() -> dict[str, str | bool]:
    """The backend's process-wide settings (module docstring); what each did, for results.json."""
    return {"keep_freed_memory": keep_freed_memory(), "mkl": unlock_mkl()}
