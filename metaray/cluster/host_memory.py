"""Freed host memory kept in the process for reuse, instead of going back to the OS at every free.

A step at d outer parameters allocates and frees many d-sized tensors on a CPU: gradients, adapted
parameters, their float64 and int64 encodings (reduce.py). glibc's malloc serves every allocation above its
mmap threshold with fresh pages from the OS and returns them on free; the threshold adapts to the sizes freed,
but never beyond 32 MiB, i.e. a float32 tensor of 8M values. From d ~ 10M on, every gradient-sized tensor is
therefore new memory that page-faults 4 KiB at a time when first written. Measured on this machine
(first-order MAML, MLP at d = 10M, 8 tasks a step, one process, one thread): 2.0 million page faults and
6.7 s a step; with freed memory kept, 5 faults and 3.1 s (benchmarks/scale_out.py's "host memory returned"
row measures it beside every run).

``keep_host_memory`` raises the threshold (M_MMAP_THRESHOLD: allocations below it come from the heap) and pads
the heap's top (M_TOP_PAD: the heap grows, and is trimmed, in steps of the pad, so freed gradients stay for the
next step's), and makes every thread allocate from that one heap (M_ARENA_MAX = 1: a thread's own arena grows
in heaps of at most 64 MiB, so a gradient computed off the main thread, as a Ray actor computes, would still be
fresh pages). The pool starts its actors with MALLOC_ARENA_MAX=1 for the same reason: only threads that have not
allocated yet follow the call. Measured: no slower with 2 task threads in one actor at d = 1M. The cost: a process's resident memory no longer shrinks back after a step; it stays near its
peak, plus up to the pad. ``ClusterConfig.keep_host_memory`` (on by default) applies it in the driver and in
every actor; a script that calls the solvers directly can call it itself.

The settings are process-wide and last for the process's life (glibc has no call that restores its adaptive
threshold). Other C libraries (macOS, musl) are left as they are: the call answers False.
"""
from __future__ import annotations

import ctypes

# mallopt's parameter numbers (glibc malloc.h)
M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -2, -3, -8
PAD_BYTES = 1 << 30  # measured at d = 10M: 128 MiB left 160k faults a step, 512 MiB 54k, 1 GiB 5

_applied: int | None = None  # the pad last set in this process


def keep_host_memory(pad_bytes: int = PAD_BYTES) -> bool:
    """Keeps freed host memory in this process for reuse (glibc ``mallopt``: ``M_MMAP_THRESHOLD`` and
    ``M_TOP_PAD`` set to ``pad_bytes``, ``M_ARENA_MAX`` to 1). Returns whether it applies: False where the C
    library is not glibc."""
    global _applied
    if not isinstance(pad_bytes, int) or isinstance(pad_bytes, bool) or not 0 < pad_bytes < 2**31:
        raise ValueError(f"keep_host_memory: pad_bytes must be an int of bytes in (0, 2**31) (mallopt takes a C int), "
                         f"got {pad_bytes!r}")
    if _applied == pad_bytes:
        return True
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except (OSError, TypeError):  # Windows: no such handle
        return False
    # musl and others may have a mallopt that does nothing: only glibc's is known to do this
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # one arena for every thread (the module docstring says why); only threads that have not allocated yet follow it
    libc.mallopt(M_ARENA_MAX, 1)
    if not (libc.mallopt(M_MMAP_THRESHOLD, pad_bytes) and libc.mallopt(M_TOP_PAD, pad_bytes)):
        return False
    _applied = pad_bytes
    return True


def host_memory_kept() -> bool:
    """Whether ``keep_host_memory`` applied in this process."""
    return _applied is not None


def host_page_faults() -> int:
    """This process's minor page faults so far (``getrusage``): each is a 4 KiB page touched for the first time
    since the OS handed it over. 0 where the platform does not count them."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
