"""Hand the heap's freed memory back to the system (glibc malloc_trim; elsewhere nothing)."""
from __future__ import annotations


def release_heap() -> None:
    """After a step that freed much (constant folding, an export's per-tensor buffers), so the process's RSS
    is what it still holds, not glibc's high-water mark."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
