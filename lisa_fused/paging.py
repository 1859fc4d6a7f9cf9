"""Where a block's optimizer state lives while the block is not trained.

A block's paged state is a list of rows, the slot contents of every partition's PackedBuffers.paged()
(exp_avg, exp_avg_sq, quantized moments' fp32 scales, a Kahan compensation, and the fp32 master for
low-precision models; packing.PackedState.block_rows): each row is 1-D with its own dtype and length.
The store never interprets them.

    "host"    host memory reserved at construction (`reserve`); on CUDA pinned and copied on side streams
    "device"  kept on the device (what published LISA code does: memory grows with every block visited)
    "drop"    nothing kept; the block restarts from zero moments (the paper's own runs)

CUDA ordering ("host" policy; two copy streams, so page-out and page-in use both copy engines):
  compute:  step kernel -> param copies in/out of slots -> switch() -> next forward/backward
  out:      wait(compute) -> per leaving block: [wait(read[block])] slot -> host rows; record
            written[block] and slot_free[slot]
  in:       wait(compute) -> per arriving block: wait(slot_free[slot]) (a slot is refilled only after
            it was read out), wait(written[block]) (host rows are read only after they were written)
            -> host rows -> slot (or zero / init the master) -> record read[block]; record ready
  compute:  wait_ready() before the next step kernel: wait(ready) and wait(last page-out); no host sync.
`read[block]` orders a later page-out of the same block after this page-in read its rows.

Host memory: one anonymous mmap per block, exact size (not torch's power-of-two caching host
allocator), marked MADV_DONTFORK and registered with cudaHostRegister. DONTFORK because a fork()
(DataLoader workers) would otherwise mark registered pages copy-on-write: the parent's next CPU write
then moves to a fresh page while the DMA engine keeps using the old one. The mapping stays registered
until the block's layout changes or release(); clear() keeps it for reuse, so nothing leaks.

Status: the CUDA path (two streams, events, cudaHostRegister) has not run on a GPU yet; the CPU tests run
the same bookkeeping with plain copies and a counting fake of the pin calls, and the `gpu` tests in
tests/test_paging.py (run by benchmarks/gpu_check.sh) check it on real streams.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
from dataclasses import dataclass

import torch

POLICIES = ("host", "device", "drop")
ROW_ALIGN = 256  # bytes: each row of a host block starts on this boundary (vector loads, DMA)
log = logging.getLogger(__name__)


class CudaHostRegister:
    """Pins host ranges with cudaHostRegister / cudaHostUnregister (torch's cudart binding)."""

    def register(self, ptr: int, nbytes: int) -> None:
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {err}")

    def unregister(self, ptr: int) -> None:
        err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
        if err != 0:
            log.warning("cudaHostUnregister(0x%x) failed with CUDA error %d", ptr, err)


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class Rows:
    """Saved rows of one block. `state` is what get() returns: a [n_rows, numel] tensor (possibly
    row-strided) when all rows share dtype and length, else the list of rows. With `pinned`, the rows
    are views into `mm`, registered at `ptr`."""

    rows: list[torch.Tensor]
    state: torch.Tensor | list[torch.Tensor]
    spec: tuple[tuple[torch.dtype, int], ...]  # (dtype, numel) per row
    nbytes: int
    ptr: int = 0
    pinned: bool = False
    mm: mmap.mmap | None = None


def row_spec(rows) -> tuple[tuple[torch.dtype, int], ...]:
    return tuple((r.dtype, r.numel()) for r in rows)


def _uniform(spec) -> bool:
    return len({(d, n) for d, n in spec}) == 1


def alloc_rows(spec, device: torch.device) -> Rows:
    """Plain rows for `spec` on `device` (one [n_rows, numel] tensor when the rows are uniform)."""
    spec = tuple(spec)
    if _uniform(spec):
        state = torch.empty(len(spec), spec[0][1], dtype=spec[0][0], device=device)
        rows = list(state)
    else:
        rows = state = [torch.empty(n, dtype=d, device=device) for d, n in spec]
    return Rows(rows, state, spec, sum(r.numel() * r.element_size() for r in rows))


def alloc_host(spec, pinner) -> Rows:
    """Host rows for `spec`. With a pinner: one page-aligned anonymous mmap, MADV_DONTFORK (and
    MADV_HUGEPAGE where the kernel has it, so registration walks 2 MiB pages), then registered.
    Without: plain torch.empty rows (nothing to pin, nothing that fork could break)."""
    spec = tuple(spec)
    if pinner is None:
        return alloc_rows(spec, torch.device("cpu"))
    sizes = [torch.empty((), dtype=d).element_size() * n for d, n in spec]
    padded = [-(-s // ROW_ALIGN) * ROW_ALIGN for s in sizes]
    offsets = [sum(padded[:k]) for k in range(len(padded))]
    off = sum(padded)
    nbytes = max(mmap.PAGESIZE, -(-off // mmap.PAGESIZE) * mmap.PAGESIZE)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_DONTFORK)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP disabled: 4 KiB pages, slower to register, still right
            mm.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(mm, dtype=torch.uint8)
    rows = [base[o:o + s].view(d) for o, s, (d, _) in zip(offsets, sizes, spec)]
    state = rows
    if _uniform(spec):  # one row-strided [n_rows, numel] view over the padded rows
        dtype, numel = spec[0]
        state = base[:off].view(dtype).view(len(spec), -1)[:, :numel]
    pinner.register(base.data_ptr(), nbytes)
    return Rows(rows, state, spec, nbytes, base.data_ptr(), True, mm)


class MomentStore:
    """Saved state of inactive blocks under one policy; all copies go through `switch` and `put`.

    device: the model's device. pinner: object with register(ptr, nbytes) / unregister(ptr); default
    CudaHostRegister for "host" on CUDA, None (plain memory) otherwise; tests inject a counting fake.
    max_pinned_bytes: the most `reserve` may pin; default 90% of MemAvailable (env
    LISA_FUSED_MAX_PINNED_BYTES overrides).
    """

    def __init__(self, policy: str, device: torch.device, pinner="auto", max_pinned_bytes: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"Invalid inactive_moments: {policy!r}; choose one of {POLICIES}")
        self.policy = policy
        self.device = torch.device(device)
        side = self.device.type == "cuda" and policy == "host"
        self.out_stream = torch.cuda.Stream(self.device) if side else None
        self.in_stream = torch.cuda.Stream(self.device) if side else None
        if pinner == "auto":
            pinner = CudaHostRegister() if side else None
        self.pinner = pinner if policy == "host" else None
        if max_pinned_bytes is None and os.environ.get("LISA_FUSED_MAX_PINNED_BYTES"):
            max_pinned_bytes = int(os.environ["LISA_FUSED_MAX_PINNED_BYTES"])
        self.max_pinned_bytes = max_pinned_bytes
        self._blocks: dict[int, Rows] = {}  # block -> its rows (host, or device under "device")
        self._saved: set[int] = set()  # blocks whose rows hold valid state
        self._written: dict[int, torch.cuda.Event] = {}  # block -> end of its last page-out
        self._read: dict[int, torch.cuda.Event] = {}  # block -> end of its last page-in
        self._slot_free: dict[int, torch.cuda.Event] = {}  # slot -> end of the page-out that read it
        self._ready: list[torch.cuda.Event] = []  # what the next step kernel waits for

    @classmethod
    def reserved(cls, policy: str, device, packed) -> "MomentStore":
        """The store FusedLISA builds (at construction and when the model moves), with every block's rows
        reserved for `packed` (packing.PackedState) now: the host store is pinned here, not inside step() on a
        block's first visit."""
        store = cls(policy, device)
        store.reserve({b: packed.block_spec(b) for b in range(len(packed.layouts[0].blocks))})
        return store

    @property
    def stream(self):
        """The page-out stream (kept for callers of the one-stream store)."""
        return self.out_stream

    # -- memory ------------------------------------------------------------------------------------
    def reserve(self, specs: dict[int, list[tuple[torch.dtype, int]]]) -> None:
        """Allocate (and pin) the host rows of every block up front, so step() never pins.

        specs: block -> [(dtype, numel), ...] per row. No-op unless the policy is "host". Raises
        MemoryError, before allocating anything, when the pinned total exceeds the limit.
        """
        if self.policy != "host":
            return
        todo = {b: tuple(s) for b, s in specs.items()
                if b not in self._blocks or self._blocks[b].spec != tuple(s)}
        if self.pinner is not None:
            need = sum(sum(torch.empty((), dtype=d).element_size() * n for d, n in s) for s in todo.values())
            if self.max_pinned_bytes is not None:  # a cap on everything this store pins
                limit, need = self.max_pinned_bytes, need + self.pinned_bytes()
            else:  # MemAvailable already excludes what is pinned
                avail = available_host_bytes()
                limit = None if avail is None else int(0.9 * avail)
            if limit is not None and need > limit:
                raise MemoryError(
                    f"inactive_moments='host' needs {need / 2**30:.2f} GiB of pinned host memory for "
                    f"{len(specs)} blocks, over the limit of {limit / 2**30:.2f} GiB (90% of MemAvailable or "
                    f"LISA_FUSED_MAX_PINNED_BYTES); use inactive_moments='device' or 'drop', or a host with "
                    f"more free memory")
        for b, spec in todo.items():
            self._buffer(b, spec)

    def pinned_bytes(self) -> int:
        """Bytes of host memory registered (page-locked) by this store."""
        return sum(h.nbytes for h in self._blocks.values() if h.pinned)

    def reserved_bytes(self) -> int:
        """Bytes of host memory this store holds, saved or not ("host" policy)."""
        return sum(h.nbytes for h in self._blocks.values()) if self.policy == "host" else 0

    def n_registered(self) -> int:
        return sum(1 for h in self._blocks.values() if h.pinned)

    def _free(self, block: int) -> None:
        h = self._blocks.pop(block, None)
        self._saved.discard(block)
        if h is not None and h.pinned:
            self.pinner.unregister(h.ptr)

    def _buffer(self, block: int, spec) -> list[torch.Tensor]:
        """The rows of `block` for `spec`; a layout change frees (unregisters) the old ones first."""
        spec = tuple(spec)
        h = self._blocks.get(block)
        if h is not None and h.spec == spec:
            return h.rows
        if h is not None:
            self.synchronize()  # a copy may still use the old rows
            self._free(block)
        # A meta model (lisa-fused plan) gets meta rows: the host store is counted, never allocated.
        host = self.policy == "host" and self.device.type != "meta"
        h = alloc_host(spec, self.pinner) if host else alloc_rows(spec, self.device)
        self._blocks[block] = h
        return h.rows

    def release(self) -> None:
        """Wait for every copy in flight, then unregister and drop all rows."""
        self.synchronize()
        for b in list(self._blocks):
            self._free(b)
        self._written.clear()
        self._read.clear()
        self._slot_free.clear()
        self._ready.clear()

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: CUDA may already be gone, and the OS frees the pages
            pass

    # -- bookkeeping -------------------------------------------------------------------------------
    def has(self, block: int) -> bool:
        return block in self._saved

    def get(self, block: int) -> torch.Tensor | list[torch.Tensor] | None:
        """The saved state of `block` (waits for copies in flight): a [n_rows, numel] tensor when its
        rows share dtype and length, else the list of 1-D rows; None when nothing is saved."""
        self.synchronize()
        return self._blocks[block].state if block in self._saved else None

    def put(self, block: int, state) -> None:
        """Store `state` (rows: a [n_rows, len] tensor or a list of 1-D tensors) for `block` directly,
        e.g. from a loaded state_dict."""
        if self.policy == "drop":
            return
        rows = list(state)
        self.synchronize()
        for dst, src in zip(self._buffer(block, row_spec(rows)), rows):
            dst.copy_(src)
        self._saved.add(block)

    def clear(self) -> None:
        """Forget all saved state. Host rows stay allocated (and registered) for reuse; device rows go."""
        self.synchronize()
        self._saved.clear()
        if self.policy == "device":
            self._blocks.clear()

    def nbytes(self) -> int:
        """Bytes of saved state (what `host_bytes` / device-resident state reports)."""
        total = 0
        for b in self._saved:
            total += sum(r.numel() * r.element_size() for r in self._blocks[b].rows)
        return total

    # -- the switch --------------------------------------------------------------------------------
    def switch(self, leaving, arriving, rows_of, init_fresh):
        """Page out `leaving` blocks and page in (or start fresh) `arriving` ones.

        leaving / arriving: lists of (block, slot). rows_of(block, slot) -> the list of 1-D views of that
        block's rows in that slot (what is saved and restored, in a fixed order). init_fresh(slot, block,
        views) fills the views of an arriving block that has no saved state (zero moments, fp32 masters
        from the params), on the page-in stream. Returns the blocks that started fresh.
        """
        cuda = self.out_stream is not None
        if cuda:
            compute = torch.cuda.current_stream(self.device)
            self.out_stream.wait_stream(compute)
            self.in_stream.wait_stream(compute)
        fresh = []
        if self.policy != "drop":
            with _on(self.out_stream):
                for block, slot in leaving:
                    views = rows_of(block, slot)
                    rows = self._buffer(block, row_spec(views))
                    if cuda and block in self._read:
                        self.out_stream.wait_event(self._read.pop(block))
                    for row, v in zip(rows, views):
                        row.copy_(v, non_blocking=True)
                    self._saved.add(block)
                    if cuda:
                        self._written[block] = self._slot_free[slot] = _record(self.out_stream)
        with _on(self.in_stream):
            for block, slot in arriving:
                views = rows_of(block, slot)
                if cuda and slot in self._slot_free:
                    self.in_stream.wait_event(self._slot_free.pop(slot))
                if block in self._saved:
                    if cuda and block in self._written:
                        self.in_stream.wait_event(self._written.pop(block))
                    for row, v in zip(self._blocks[block].rows, views):
                        v.copy_(row, non_blocking=True)
                    if self.policy == "device":  # resident copies only for inactive blocks, as published LISA
                        self._free(block)
                    elif cuda:
                        self._read[block] = _record(self.in_stream)
                else:
                    fresh.append(block)
                    init_fresh(slot, block, views)
            if cuda:
                self._ready = [_record(self.in_stream), _record(self.out_stream)]
        return fresh

    def wait_ready(self) -> None:
        """Make the current stream wait for the last switch's copies (no host sync)."""
        if self._ready:
            compute = torch.cuda.current_stream(self.device)
            for ev in self._ready:
                compute.wait_event(ev)
            self._ready = []

    def synchronize(self) -> None:
        """Block the host until every copy in flight is done (state_dict, tests, release)."""
        for s in (self.out_stream, self.in_stream):
            if s is not None:
                s.synchronize()


def _record(stream) -> torch.cuda.Event:
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
