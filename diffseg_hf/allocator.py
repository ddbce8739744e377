"""Keep freed memory in the process: glibc malloc settings that stop a CPU training step from page-faulting.

A training step allocates and frees the same large activations every step. glibc's malloc gives freed memory at
the top of its heap back to the kernel once it exceeds a threshold, and serves blocks above another threshold
with fresh `mmap`s, so every step touches new pages again: the parameter-matched ConvNeXt took about 66,000 minor
page faults per step (batch 64, 32 px, bf16), the baseline's default path about 24,000 and stock diffusers in fp32
about 61,000. Setting the mmap threshold to glibc's ceiling (32 MiB on 64-bit) and never trimming the heap leaves
almost none after the first steps: on the 2-core AMD EPYC, one model per process, ConvNeXt's step ran 1.08x as
fast, the default path's 1.05x and stock fp32's 1.13x, at the same peak memory (BENCHMARKS.md, "Keeping freed
memory"). The cost: the process keeps its peak heap until it exits instead of returning it.

`keep_freed_memory()` is process-wide and idempotent; `train()` and the `diffseg` command call it. It does
nothing where it cannot or should not act, and says why:
- not glibc (macOS, Windows, musl) or no `mallopt`;
- the user already tunes malloc (MALLOC_*_ variables, glibc.malloc tunables in GLIBC_TUNABLES, or a replacement
  allocator such as jemalloc or tcmalloc in LD_PRELOAD);
- DIFFSEG_SYSTEM_MALLOC=1 (the opt-out).
Only the heap's trim threshold and the mmap threshold change: setting the trim threshold alone would switch off
glibc's dynamic mmap threshold and make every block above 128 KiB a fresh mmap, which measured 1.6-1.9x slower.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit; blocks above it are still mmapped
TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap's top in practice
OPT_OUT = "DIFFSEG_SYSTEM_MALLOC"
KEPT = "kept freed memory"  # how status() begins once the settings are applied
_USER_MALLOC_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                     "MALLOC_ARENA_MAX")

_status: str | None = None


def keep_freed_memory() -> str:
    """Apply the settings once per process; returns what happened: "kept freed memory (...)" or "system malloc:
    <reason>". Later calls return the first call's answer."""
    global _status
    if _status is None:
        _status = _apply()
    return _status


def kept() -> bool:
    """Whether this process keeps freed memory (`keep_freed_memory` ran and applied the settings)."""
    return _status is not None and _status.startswith(KEPT)


def status() -> str:
    """What `keep_freed_memory` did in this process, or "system malloc: not configured" before it ran."""
    return _status or "system malloc: not configured"


def _apply() -> str:
    reason = _reason_to_skip()
    if reason:
        return f"system malloc: {reason}"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        return f"system malloc: mallopt unavailable ({e})"
    if not ok:
        return "system malloc: mallopt refused the settings"
    return f"{KEPT} (glibc mallopt: mmap threshold {MMAP_THRESHOLD >> 20} MiB, no heap trimming)"


def _reason_to_skip() -> str | None:
    if os.environ.get(OPT_OUT, "").strip() not in ("", "0"):
        return f"{OPT_OUT} is set"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    for var in _USER_MALLOC_VARS:
        if var in os.environ:
            return f"{var} is set (the user's malloc settings are kept)"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc (the user's malloc settings are kept)"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # jemalloc, tcmalloc, mimalloc
        return f"LD_PRELOAD replaces malloc ({preload})"
    return None
