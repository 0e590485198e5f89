"""Keeping freed activation memory in the process, which makes CPU sampling much faster on Linux.

glibc's malloc serves every allocation above 32 MB with mmap and unmaps it on free, so each large
activation of each denoising step is page-faulted in again from scratch. At high resolution that
costs more than the arithmetic: on the church DDPM a shallow step took 1.3-1.4x its share of the
MACs, and 1.03x once freed memory was kept. This is a process-wide setting, so the library never
applies it on its own: applications (minidiff's CLI, the benchmarks) opt in.
"""
import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters from glibc's malloc.h


def retain_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory (glibc only); True if applied.

    The process keeps its peak memory instead of returning it to the OS between steps."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
