"""glibc's allocator keeps freed memory for reuse: a process-wide setting, made by
``moecl run --kernels auto`` on CPU only (never at import or by loading a model)."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same few hundred megabytes of activations (and the
    merged LoRA weights) every step; by default glibc maps blocks over ~128 KiB afresh and
    returns them, so each step pays ~50-100k page faults (about 5% of its time here). Keeping
    blocks up to 32 MiB in the heap and never trimming it removes them. Returns whether the
    setting took (False off glibc, where it is a no-op).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False
