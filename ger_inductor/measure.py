"""Time and peak memory of one step, as the benchmark harness and the demo measure them.

* time: warm-up calls first (compilation and the first slow calls excluded), then
  ``repeat`` timed calls: CUDA events on CUDA, the wall clock elsewhere.
* peak memory of one call beyond what is allocated before it: on CUDA
  ``max_memory_allocated``; on Linux CPUs the growth of the process's peak resident set
  (VmHWM, reset through /proc/self/clear_refs). Meaningful with the default glibc
  allocator, which returns large blocks to the OS; under a warm allocator
  (``MALLOC_MMAP_THRESHOLD_`` set) freed blocks stay resident and None is returned, as
  it is where /proc is not there to read.
* bytes saved for backward: the unique storages autograd's saved-tensor hooks see
  (what a training step holds from its forward to its backward; compiled graphs save
  through the same hooks).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from typing import Any, Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _rss() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        s = f.read()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", s).group(1)) * 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", s).group(1)) * 1024
    return hwm, rss


def _warm_allocator() -> bool:
    """glibc told to keep large blocks (``MALLOC_MMAP_THRESHOLD_`` above 1 MiB). A small
    fixed threshold (e.g. 131072) is the opposite: glibc's dynamic threshold is off, every
    block above it is unmapped when freed, and the resident set follows the live bytes."""
    v = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    try:
        return v is not None and int(v) > (1 << 20)
    except ValueError:
        return True


def peak_extra_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak memory one call needs beyond what is allocated before it (None: unknown here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if _warm_allocator():
        return None  # warm allocator: freed blocks stay resident, RSS says nothing
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _, base = _rss()
    except OSError:
        return None
    step()
    hwm, _ = _rss()
    return max(hwm - base, 0)


def saved_for_backward(step: Callable[[], Any], exclude: list[torch.Tensor]) -> tuple[int, int]:
    """(all bytes, bytes without ``exclude``'s storages) of the unique storages autograd
    saves during ``step()``."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()), sum(n for ptr, n in seen.items() if ptr not in excluded)


def peak_alloc_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes one call allocates through torch's allocator beyond what is allocated
    before it, whatever the host allocator keeps resident: on CUDA
    ``max_memory_allocated``; on CPUs the running sum of the profiler's allocation and
    free records (``profile_memory``: every c10 CPU allocation, Inductor's buffers
    included; a library's own scratch memory, e.g. oneDNN's, is not seen). None where
    neither is available, and on CPUs while a profiler records already (the user's: a
    second session would end it)."""
    if device.type == "cuda":
        return peak_extra_bytes(step, device)
    if device.type != "cpu":
        return None
    from . import _compat

    if _compat.profiler_active():  # the user's profiler: starting and stopping ours would end its session
        return None
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # Kineto prints profiler_start / profiler_stop lines on fd 2
        prof.__enter__()
    try:
        step()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # another profiler layout: unknown
        return None
    run = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        run += e.nbytes()
        peak = max(peak, run)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null inside (what C++ libraries print there)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (an embedded interpreter): nothing to quiet
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
