"""Peak-memory meters: bytes above a baseline taken after model load, before the method is set up.

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (the caching allocator's live bytes).
CPU (each method runs in its own process, see run.py): the process's resident set. At start() glibc's
free lists are returned to the OS (malloc_trim) and the kernel's high-water mark VmHWM is reset by
writing "5" to /proc/self/clear_refs; peak() is VmHWM minus the RSS at start(), so it catches spikes
however short. Where clear_refs cannot be written, a thread samples VmRSS every 2 ms instead (it can
miss spikes shorter than that); `how` says which one ran.

glibc's default malloc keeps freed blocks for reuse and raises its mmap threshold as big blocks are
freed, so RSS then reflects its fragmentation more than the method (a LoRA run showed ~2x its live
bytes). So on CPU, run.py measures memory in its own pass with the mmap threshold fixed at 64 KiB from
the process start (every tensor of 64 KiB or more gets its own mapping and leaves the RSS when freed),
then sets the threshold to 32 MiB, the top of glibc's dynamic range, for the timed pass: fresh
mappings cost page faults on every allocation and would slow the timed steps down.

What the CPU memory pass reports (run.py), all in bytes above the state at the meter's start:
- `peak_rss_bytes`: VmHWM minus VmRSS at start, the raw resident-set peak. It includes file-backed
  pages mapped in during the pass: shared-library code of kernels run for the first time (5 MiB per
  method on the tiny model in the bench's process, whose eval already ran the forward; 9 MiB without
  it), which no method allocates.
- `peak_mem_bytes`: the peak of anonymous memory, VmHWM minus the file-backed and shared pages at the
  time the peak is read (RssFile + RssShmem) minus RssAnon at start, i.e. the raw peak minus the
  file-backed pages added during the pass. Exact when those pages were faulted in before the peak and
  none were dropped afterwards (as measured: the code pages arrive in the first step, the peak comes
  later). Anonymous memory is torch's tensors plus what malloc keeps (free lists, fragmentation) and
  Python objects.
- `peak_tensor_bytes` (`TensorMeter`): the peak of live torch tensor bytes, counted by
  `lisa_fused.plan.trace.AllocationTracker` (the planner's own counter) on the real tensors, the CPU
  counterpart of torch.cuda.max_memory_allocated. On CUDA it is the CudaMeter peak (the same quantity).
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class CudaMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.how = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        self.baseline = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) - self.baseline

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.baseline

    def peak_total(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def _status(fields: tuple[str, ...]) -> dict[str, int]:
    """Bytes of the given /proc/self/status fields (read in one go, so they are of the same moment);
    a field the kernel does not report reads 0."""
    out = dict.fromkeys(fields, 0)
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    return out


_NON_ANON = ("RssFile", "RssShmem")  # file-backed (mapped code, data files) and shared memory pages


class RssMeter:
    """CPU peak memory (see the module docstring). `peak()` is the anonymous-memory peak above start,
    `peak_rss()` the raw resident-set peak above start, `file_added()` the file-backed and shared pages
    added since start (their difference); `current()` the anonymous memory above start now."""

    def __init__(self):
        self.baseline = 0       # VmRSS at start()
        self.anon_baseline = 0  # RssAnon at start()
        self._non_anon = 0      # RssFile + RssShmem at start()
        self._sampled = 0
        self._stop = None
        self.how = ""

    def start(self) -> None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        st = _status(("VmRSS", "RssAnon") + _NON_ANON)
        self.baseline, self.anon_baseline = st["VmRSS"], st["RssAnon"]
        self._non_anon = sum(st[k] for k in _NON_ANON)
        how = ("anonymous memory peak: VmHWM minus the file-backed pages at the end of the pass (RssFile + "
               "RssShmem) minus RssAnon at start, i.e. peak RSS minus the library code pages added during "
               "the pass (exact when they were faulted in before the peak: they arrive in the first step); "
               "peak_rss_bytes is the raw peak RSS minus RSS at start")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = how + ", VmHWM reset via /proc/self/clear_refs"
        except OSError:
            self.how = how + ", peak RSS sampled every 2 ms (can miss shorter spikes)"
            self._stop = threading.Event()
            self._sampled = self.baseline
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, rss_bytes())

    def current(self) -> int:
        """Anonymous memory (RssAnon) now minus at start."""
        return _status(("RssAnon",))["RssAnon"] - self.anon_baseline

    def peak_total(self) -> int:
        """Peak RSS of the process, baseline included (VmHWM, or the sampled maximum)."""
        if self._stop is not None:
            return max(self._sampled, rss_bytes())
        return _status_kb("VmHWM")

    def peak_rss(self) -> int:
        """Raw peak RSS above the RSS at start (anonymous and file-backed pages)."""
        return self.peak_total() - self.baseline

    def file_added(self) -> int:
        """File-backed and shared pages (RssFile + RssShmem) now minus at start."""
        return sum(_status(_NON_ANON).values()) - self._non_anon

    def peak(self) -> int:
        """Anonymous-memory peak above start: the raw peak minus the file-backed pages added since."""
        return self.peak_rss() - self.file_added()


class TensorMeter:
    """Peak of live torch tensor bytes above start, on real tensors (CPU: the counterpart of
    torch.cuda.max_memory_allocated, which counts the caching allocator's live blocks).

    `start(*roots)` registers every tensor alive now (found by the garbage collector, plus the tensors
    of `roots`, modules or tensors) as the baseline, then enters an
    `lisa_fused.plan.trace.AllocationTracker` (a TorchDispatchMode: every aten op's new output storage
    is counted while alive). A baseline storage freed later (FusedLISA moves the params it binds into
    its packed buffer) is subtracted, so `peak()` is "peak above start" as for the RSS. Allocation
    outside aten ops (e.g. a C++ extension allocating raw memory itself) is not seen; allocator
    rounding and malloc's free lists are not counted. Costs some microseconds per op: the memory pass
    only, never the timed one."""

    def __init__(self):
        self.tracker = None
        self.how = ("live torch tensor bytes (lisa_fused.plan.trace.AllocationTracker on the real tensors), "
                    "storages alive at start not counted, those freed since subtracted")

    def start(self, *roots) -> None:
        from ..plan.trace import AllocationTracker

        gc.collect()
        # type(), not isinstance(): isinstance falls back to o.__class__, which on a lazy module proxy
        # imports the module (transformers' lazy imports pulled in torchao here).
        tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
        for r in roots:
            if isinstance(r, torch.nn.Module):
                tensors += [*r.parameters(), *r.buffers()]
            elif isinstance(r, torch.Tensor):
                tensors.append(r)
        self.tracker = AllocationTracker()
        self.tracker.baseline(t for t in tensors if _has_storage(t))
        self.tracker.__enter__()

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)

    def current(self) -> int:
        return self.tracker.live

    def peak(self) -> int:
        return self.tracker.peak


def _has_storage(t: torch.Tensor) -> bool:
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
        return False
    return True


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc mallopt(M_MMAP_THRESHOLD, nbytes), which also stops its dynamic raise; then malloc_trim.
    False where there is no glibc. Only allocations made afterwards from fresh heap space follow it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, nbytes) == 1  # -3: M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


EXACT_MMAP_THRESHOLD = 64 * 1024
TIMED_MMAP_THRESHOLD = 32 * 1024 * 1024


def meter_for(device: torch.device):
    return CudaMeter(device) if device.type == "cuda" else RssMeter()
