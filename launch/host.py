"""Process settings for training on CPU hosts, applied by `kiln` (and the tests) before torch loads.

- OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE) instead of spinning, libgomp's
  default: spinning threads starve everything else on the cores (data workers, other ranks, other
  jobs). Measured on 2 cores beside one busy process: a small U-Net step took 5.8 s spinning and
  0.10 s passive.
- glibc's malloc keeps freed memory for reuse: blocks up to 32 MiB come from the heap instead of
  fresh mmap()s, and up to 1 GiB of free heap top is kept instead of returned to the kernel. With
  glibc's adaptive defaults a training step hands its activations back to the kernel and faults
  them in again the next step, page by page: a batch-16 U-Net step on 2 cores took 34,000-46,000
  page faults and ~170 ms of kernel time per 800 ms step; with these settings none, and the step
  ran 7-13% faster (BENCHMARKS.md, "Diffusion U-Net"). The price is that the process keeps its peak
  heap instead of shrinking between steps, which a training process reaches every step anyway.

Either setting is left alone when the user has set it (OMP_WAIT_POLICY, MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_); KILN_MALLOC=default keeps glibc's own behaviour. CUDA memory has its own
caching allocator and is not affected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt() parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30

# The same settings as environment variables, for child processes that do not run kiln's code
# (glibc reads them at start-up): bench/ gives them to both sides of a comparison.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def configure() -> None:
    """Apply both settings to this process (and so to the processes it forks). Call before
    importing torch: libgomp reads OMP_WAIT_POLICY when it loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("KILN_MALLOC") == "default" or any(name in os.environ for name in MALLOC_ENV):
        return
    if not sys.platform.startswith("linux") or not ctypes.util.find_library("c"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)  # glibc; musl has none
    if mallopt is None:
        return
    # The mmap threshold first: setting it turns off glibc's adaptive thresholds, and a trim
    # threshold set alone would leave every block over 128 KiB to mmap().
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
