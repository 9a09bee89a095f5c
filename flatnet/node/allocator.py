"""Keep freed memory for reuse: glibc's allocator tuned for the data path (``mallopt`` via ctypes).

The receive path builds a buffer per TUN write (a merged TCP super-packet, up to 64 KB), larger
than Python's small-object allocator serves, so each one comes from glibc's ``malloc``. With the
defaults glibc gives the top of the heap back to the kernel as soon as 128 KB are free there, and
the next buffer touches fresh pages again: measured under 1% loss, ~200 minor page faults per MB
received (`bench` note in docs/dataplane.md, Tuning), every one a trap into the kernel and a zeroed
page. Keeping up to :data:`TRIM_THRESHOLD` of freed memory and growing the heap by
:data:`TOP_PAD` at a time brings that to ~0 for a few MB of resident memory.

Not glibc (musl, another OS): nothing is changed, and :func:`keep_freed_memory` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 32 * 1024 * 1024  # free memory at the heap's top kept before giving it back
TOP_PAD = 8 * 1024 * 1024  # extra the heap grows by each time it must grow
MMAP_THRESHOLD = 1024 * 1024  # blocks below this come from the heap (reused), not their own mmap

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune this process's glibc allocator (once); False if it is not glibc or refused."""
    global _done
    if _done is not None:
        return _done
    _done = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = all(
        mallopt(option, value) == 1
        for option, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    )
    return _done
