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
"""
from __future__ import annotations

import ctypes
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


class RssMeter:
    def __init__(self):
        self.baseline = 0
        self._sampled = 0
        self._stop = None
        self.how = ""

    def start(self) -> None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.baseline = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS at start"
        except OSError:
            self.how = "peak RSS sampled every 2 ms minus RSS at start"
            self._stop = threading.Event()
            self._sampled = self.baseline
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, rss_bytes())

    def current(self) -> int:
        return rss_bytes() - self.baseline

    def peak_total(self) -> int:
        if self._stop is not None:
            return max(self._sampled, rss_bytes())
        return _status_kb("VmHWM")

    def peak(self) -> int:
        return self.peak_total() - self.baseline


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
