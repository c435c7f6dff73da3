"""How the service shapes its work for the hardware: length chunks of a batch, the allocator, the collector.

A batch of rows of different lengths is sorted and, unless the encoder packs its tokens
(``cogalora.packing``: no padding at all), cut into a few length chunks, one forward each, where a
cut saves more padded tokens than a forward's fixed cost (:func:`length_chunks`). On glibc,
large activation buffers are kept instead of returned to the OS after every forward
(:func:`tune_allocator`), and what is free goes back to the OS once the engine is idle
(:func:`release_free_memory`). Once a process has started, what it built is left out of Python's
cyclic garbage collector (:func:`freeze_startup_objects`).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys

from cogalora.precision import Precision

#: Fixed cost of one forward, in padded tokens, when deciding whether to cut a batch by length. Half
#: precision makes a token cheaper but not the fixed cost (measured on batches of 32 full SST-2
#: sentences, 2-core EPYC: bf16 served 258 rows/s with 96-160, 234 with 48, 196 without chunks).
DEFAULT_CHUNK_OVERHEAD_TOKENS = 48
HALF_PRECISION_CHUNK_OVERHEAD_TOKENS = 128


def length_chunks(lengths: list[int], overhead_tokens: int) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into contiguous chunks minimising padded tokens + overhead per chunk.

    A chunk of ``n`` rows padded to its longest row ``T`` costs ``n * T + overhead_tokens``. Exact
    dynamic programme over the distinct lengths (cuts never fall between equal lengths).
    Returns ``[(start, stop)]`` index ranges.
    """
    if not lengths:
        return []
    if overhead_tokens < 0:
        return [(0, len(lengths))]
    # Ends of runs of equal length: the only useful cut points.
    ends = [i + 1 for i in range(len(lengths)) if i + 1 == len(lengths) or lengths[i + 1] != lengths[i]]
    best = [0] + [0] * len(ends)
    cut = [0] * (len(ends) + 1)
    starts = [0, *ends]
    for j in range(1, len(ends) + 1):
        stop = ends[j - 1]
        width = lengths[stop - 1]
        best[j], cut[j] = min((best[i] + (stop - starts[i]) * width + overhead_tokens, i) for i in range(j))
    chunks = []
    j = len(ends)
    while j > 0:
        i = cut[j]
        chunks.append((starts[i], ends[j - 1]))
        j = i
    return chunks[::-1]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, whose allocator these settings concern; None elsewhere (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8


def tune_allocator() -> bool:
    """Stop glibc from returning large activation buffers to the OS after every forward, and keep every
    thread on one heap.

    Without the first, each forward maps and page-faults fresh memory for its big activations; measured
    on MiniLM at batch 32 that costs 5-15 % of CPU time. Freed buffers then stay with the process
    until :func:`release_free_memory` (the engine calls it when idle). One heap (arena) for all
    threads: with one per thread, each lane's thread would keep its own forwards' buffers, and the
    process would hold the peak of every lane at once (measured: 65 MB more under mixed traffic with
    two lanes). Threads created before this call keep their heaps. Process-wide; False (nothing
    changed) off glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
    return all([libc.mallopt(parameter, value) for parameter, value in settings])


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim``): what a finished forward, or a
    model copy dropped while loading, left behind. Takes milliseconds; the next forward faults in what
    it needs again, so call it when idle, not after every forward. False (nothing done) off glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def freeze_startup_objects() -> int:
    """Collect once, then leave every object alive now out of later collections; how many were frozen.

    A process that imported torch, transformers and FastAPI holds about a million objects that live
    as long as it does. Python's full (oldest-generation) collection walks them all: measured in the
    API process under 180 requests/s, pauses of 120-170 ms in which no request moves, the largest
    part of its p99 latency. Frozen, they are no longer walked; objects made later are collected as
    before. (Garbage at the time of the call is collected first, so none of it is kept for ever.)
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def chunk_overhead_for(precision: Precision) -> int:
    """The fixed cost of one forward, in padded tokens, for a model computing in ``precision``."""
    return HALF_PRECISION_CHUNK_OVERHEAD_TOKENS if precision.half else DEFAULT_CHUNK_OVERHEAD_TOKENS
