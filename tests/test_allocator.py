"""diffseg_hf.allocator: keeping freed memory stops the page faults of a free-and-reallocate cycle, and the
user's own malloc settings and the opt-out are respected. Each case runs in a fresh interpreter (the settings
are process-wide) that imports only the allocator module (the standard library: no torch)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from diffseg_hf import allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the settings are glibc's")

# Six 8 MiB blocks touched, then freed, per cycle: with glibc's defaults the freed 48 MiB at the top of the heap
# exceed its trim threshold (twice the 8 MiB mmap threshold it adapts to), go back to the kernel, and the next
# cycle faults them in again; kept, they are reused.
CYCLES = """
import ctypes, json, resource, sys
from diffseg_hf import allocator
status = allocator.keep_freed_memory() if sys.argv[1] == "keep" else allocator.status()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 8 * 2**20, []
for cycle in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(6)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"status": status, "again": allocator.keep_freed_memory() if sys.argv[1] == "keep" else None,
                  "kept": allocator.kept(), "faults": faults}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT}
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


@glibc
def test_kept_memory_stops_the_page_faults_of_reallocation():
    pages = 6 * 8 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    system, kept = _run("system"), _run("keep")
    assert system["status"] == "system malloc: not configured" and not system["kept"]
    assert min(system["faults"][2:]) > pages // 2  # the default malloc faults the blocks in again every cycle
    assert kept["status"].startswith(allocator.KEPT) and kept["kept"] and kept["again"] == kept["status"]  # idempotent
    assert max(kept["faults"][2:]) < pages // 50  # kept: reused without faults after the first cycles


@glibc
@pytest.mark.parametrize("env, reason", [
    ({allocator.OPT_OUT: "1"}, "system malloc: DIFFSEG_SYSTEM_MALLOC is set"),
    ({"MALLOC_ARENA_MAX": "2"}, "system malloc: MALLOC_ARENA_MAX is set (the user's malloc settings are kept)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
     "system malloc: GLIBC_TUNABLES sets glibc.malloc (the user's malloc settings are kept)"),
])
def test_the_user_settings_and_the_opt_out_leave_malloc_alone(env, reason):
    run = _run("keep", **env)
    assert run["status"] == reason and not run["kept"]
    assert min(run["faults"][2:]) > 6 * 8 * 2**20 // os.sysconf("SC_PAGE_SIZE") // 2  # glibc's default behaviour
