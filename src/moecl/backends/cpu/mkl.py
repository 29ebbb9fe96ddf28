"""MKL's AVX-512 kernels on AMD CPUs, which PyTorch's bundled MKL withholds from them.

PyTorch's CPU wheels link Intel's MKL into ``libtorch_cpu.so``. MKL picks its kernels by CPU
vendor: on an AMD CPU it takes a generic path, whatever the CPU supports. On this project's AMD
EPYC (Zen 5) machines that path multiplies float32 matrices at ~215 GFLOP/s on two cores, while
the AVX-512 path reaches ~495 (``benchmarks/throughput.py``, a), and every MKL product pays
it: ``torch.mm``/``matmul`` and the CPU flash-attention kernel's blocks (attention forward and
backward 8.0 -> 5.0 ms per block of SmolLM2-135M on a training batch).

MKL asks one internal function, ``mkl_serv_intel_cpu_true``, whether the CPU is Intel's, and
caches its choice of kernels (``mkl_serv_cpu_detect``: 0 for the generic path, 7 for AVX-512
here) at its first product. :func:`unlock_mkl` makes that function answer yes,
before the first product: the well-known ``LD_PRELOAD`` shim (a library defining the function to
return 1) done in-process, by rewriting the function's first instructions to ``mov eax, 1;
ret``. It does nothing, and says why, anywhere else: off Linux x86-64, on an Intel CPU, on a
PyTorch without MKL or without the symbol, or once MKL has already chosen (a product ran
first). The kernels compute the same products as on an Intel CPU; results differ from the
generic path's only by float rounding (another summation order), as between any two BLAS.

With the Intel kernels MKL runs in its conditional numerical reproducibility mode
(``MKL_CBWR=AUTO,STRICT``; a value already in the environment stands): without it the same
product on the same inputs could differ in the last bits between calls, and runs were not
repeatable.

It rewrites machine code inside another library, so it is opt-in and off by default: it acts only
with ``MOECL_MKL_UNLOCK=1`` in the environment (``moecl run --kernels auto`` calls it before the
model loads, through :func:`moecl.backends.cpu.prepare_process`; library users call that first
thing, before any tensor maths); otherwise MKL is left alone. Its gain was measured on AMD
machines only (this project's current machines are Intel's, where it does nothing); its risk:
code rewritten in a loaded library, and results that differ from the generic path's in the last
bits, the same command repeatable only under ``MKL_CBWR``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
from pathlib import Path

import torch

_PATCH = b"\xb8\x01\x00\x00\x00\xc3"  # x86-64: mov eax, 1; ret
_state: str | None = None


def cpu_vendor() -> str:
    """``vendor_id`` from ``/proc/cpuinfo`` (``AuthenticAMD``, ``GenuineIntel``), or ``""``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def unlock_mkl() -> str:
    """Let MKL use its Intel kernels on this AMD CPU (module docstring); idempotent.

    Returns what happened: ``"unlocked"``, or ``"skipped: <why>"``, one line a log can show.
    """
    global _state
    if _state is not None:
        return _state
    _state = _unlock()
    return _state


def unlocked() -> bool:
    """Whether :func:`unlock_mkl` gave MKL its Intel kernels in this process."""
    return _state == "unlocked"


def _unlock() -> str:
    if os.environ.get("MOECL_MKL_UNLOCK") != "1":
        return "skipped: off by default (MOECL_MKL_UNLOCK=1 turns it on)"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"skipped: {platform.system()} {platform.machine()} (only Linux x86-64)"
    vendor = cpu_vendor()
    if vendor != "AuthenticAMD":
        return f"skipped: CPU vendor {vendor or 'unknown'} (MKL's own choice stands on non-AMD CPUs)"
    if not torch.backends.mkl.is_available():
        return "skipped: this PyTorch has no MKL"
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        check, detect = lib.mkl_serv_intel_cpu_true, lib.mkl_serv_cpu_detect
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except (OSError, AttributeError):
        return "skipped: MKL's vendor check (or glibc's mprotect) is not an exported symbol here"
    check.restype = detect.restype = ctypes.c_int
    if check() != 0:
        return "skipped: MKL already takes this CPU for Intel's"
    # MKL's Intel kernels return results that can differ in the last bits from one call to the
    # next on the same inputs (measured: a first vocabulary projection); its conditional numerical
    # reproducibility mode, read from the environment when MKL starts, makes them repeat exactly.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    address = ctypes.cast(check, ctypes.c_void_p).value
    page = address & ~(mmap.PAGESIZE - 1)
    span = address + len(_PATCH) - page  # the page(s) the six bytes lie on, and no other
    read, write, execute = 1, 2, 4  # PROT_* of <sys/mman.h>
    if libc.mprotect(page, span, read | write | execute) != 0:
        return f"skipped: the code page is not writable (errno {ctypes.get_errno()})"
    original = ctypes.string_at(address, len(_PATCH))
    ctypes.memmove(address, _PATCH, len(_PATCH))
    chosen = detect()
    if chosen == 0:  # the generic path's code: MKL had chosen before and keeps its choice; undo
        ctypes.memmove(address, original, len(_PATCH))
    libc.mprotect(page, span, read | execute)
    return report(chosen, ctypes.string_at(address, len(_PATCH)) == _PATCH)


def report(chosen: int, patched: bool) -> str:
    """What :func:`unlock_mkl` says after rewriting the check: MKL's kernel choice ``chosen`` (0:
    the generic path) and whether the rewritten bytes stayed (they are put back when MKL had
    already chosen, so "skipped" always means the library is as it was)."""
    if chosen == 0 and not patched:
        return "skipped: MKL had already chosen its kernels (unlock_mkl must run before any product); undone"
    if chosen == 0:
        return "failed: MKL kept its generic kernels but its vendor check stays rewritten"
    return "unlocked"
