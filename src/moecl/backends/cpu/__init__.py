"""The CPU backend: a float32 model's modules on the fastest kernels PyTorch's CPU build has for
them, each piece computing the function of the module it replaces (tests hold every piece to its
stock module: logits, gradients, generations).

Pieces, applied to one model by :func:`apply`:

- ``linear`` (:mod:`.linear`): every ``nn.Linear`` on oneDNN's product (or MKL's, where
  :mod:`.mkl` was opted into). Applied by default on AMD CPUs only, where PyTorch's MKL takes its
  generic path (oneDNN 2.2x it, measured on Zen 4/5 machines); on Intel CPUs MKL is the faster
  kernel (325 against 309 GFLOP/s at the model's shapes) and training was 2% faster without it;
- ``last_block`` (:mod:`.last_block`): Llama's last block computes only the positions whose
  logits are kept (version-guarded: it mirrors transformers' code);
- ``adapters`` (:mod:`.adapters`): the shallow LoRA as one product with the merged weight, and
  the expert banks' mixture accumulated into the base product.

What each piece bought on the main job's training steps and generation (``benchmarks/throughput.py
--pieces``, 2 interleaved rounds, Intel Xeon, 2 cores, 2026-12-05; ratios to stock): all pieces
1.06x training, 1.14x generation; without ``last_block`` 1.02x / 1.10x, without ``adapters``
1.04x / 1.03x, without ``linear`` 1.08x / 1.14x. Grouped-query attention without repeated keys
and values, with causal attention as batched products, bought 2% of each and was dropped (under
the 3% a piece must earn), as was a fused rotary embedding (1%, and it patched transformers'
module for every model in the process).

One process-wide setting, made only by :func:`prepare_process` and only with
``MOECL_MKL_UNLOCK=1`` (a ``moecl run`` that applies the backend calls it before the model loads;
importing moecl and loading a model never do): MKL's vendor check (:mod:`.mkl`). glibc's
allocator is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from moecl.backends import Applied
from moecl.backends.cpu import adapters, last_block, linear
from moecl.backends.cpu.mkl import cpu_vendor, unlock_mkl

PIECES = {
    "linear": linear.convert,
    "last_block": last_block.convert,
    "adapters": adapters.convert,  # after linear: a converted base layer is still an nn.Linear
}
"""Each piece's conversion of a model, by name, in the order :func:`apply` makes them."""


def default_pieces() -> tuple[str, ...]:
    """The pieces measured to help on this CPU: ``linear`` on AMD CPUs only (module docstring)."""
    return tuple(p for p in PIECES if p != "linear" or cpu_vendor() == "AuthenticAMD")


def apply(model: nn.Module, pieces: Iterable[str] | None = None) -> Applied:
    """Convert ``model`` in place (``pieces``: some of :data:`PIECES`, default
    :func:`default_pieces`); returns what changed, and undoes it. A second call converts only
    modules added since (a new task's adapters)."""
    chosen = set(default_pieces()) if pieces is None else set(pieces)
    if chosen - set(PIECES):
        raise ValueError(f"unknown backend pieces {sorted(chosen - set(PIECES))}; pieces: {', '.join(PIECES)}")
    applied = Applied("cpu")
    for name, convert in PIECES.items():
        if name in chosen:
            applied.merge(convert(model))
    return applied


def prepare_process() -> dict[str, str]:
    """The backend's process-wide setting (module docstring); what it did, for results.json."""
    return {"mkl": unlock_mkl()}
