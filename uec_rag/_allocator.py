"""Ask the C allocator to keep freed memory for reuse (glibc only).

A forward pass of a base-size model and the curvature of a fit allocate and free
tensors of tens to hundreds of MiB over and over. By default glibc serves
each such block with a fresh ``mmap`` and returns it to the system on ``free``,
so the kernel zeroes the same pages again and again. On two cores this costs a
quarter of the CPU time of an mpnet fit. With ``M_MMAP_MAX = 0`` glibc serves
large blocks from its heap, and a high ``M_TRIM_THRESHOLD`` keeps freed heap
memory for the next block. In exchange the resident size grows, by a quarter
to a third in the mpnet fits measured for docs/benchmarks.md. This is the effect
of the environment variables ``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_``,
applied to a running process.
"""

from __future__ import annotations

import ctypes
import logging
import platform

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Set glibc's ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to 2 GiB - 1 for this process.

    Returns
    -------
    bool
        ``True`` if both settings were applied, ``False`` on another C library
        (the process then keeps its default allocator behaviour).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
    logger.debug("glibc keeps freed memory for reuse: %s", applied)
    return applied
