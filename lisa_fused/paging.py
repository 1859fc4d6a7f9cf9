"""Where a block's optimizer state lives while the block is not trained.

A block's paged state is the slot contents of PackedBuffers.paged() (exp_avg, exp_avg_sq, and the fp32
master for low-precision models), stored as one flat tensor of shape [n_buffers, block_len].

    "host"    pinned host memory, copied on a side CUDA stream (plain memory and plain copies on CPU)
    "device"  kept on the device (what published LISA code does: memory grows with every block visited)
    "drop"    nothing kept; the block restarts from zero moments (the paper's own runs)

CUDA ordering (one copy stream, two events per switch):
  compute stream: step kernel -> param copies in/out of slots
  copy stream:    wait(compute) -> page out leaving blocks -> page in (or zero) arriving blocks -> record
  compute stream: the next forward/backward runs while the copies fly; the next step kernel waits for
                  the recorded event before it reads a moment (`wait_ready`).
Page-out and page-in of the same slot share the copy stream, so a slot is never overwritten before it
was read, and a host buffer is never read before it was written. Host buffers are exact-size
allocations registered with cudaHostRegister, not torch's power-of-two caching host allocator.
"""
from __future__ import annotations

import torch

POLICIES = ("host", "device", "drop")


class PinnedPool:
    """Exact-size pinned host tensors: one per paged-out block, kept until the store is dropped."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._registered: list[torch.Tensor] = []

    def empty(self, shape) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.float32)
        if self.pin:
            nbytes = t.numel() * t.element_size()
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with error {int(err)}")
            self._registered.append(t)
        return t

    def release(self):
        if self.pin:
            for t in self._registered:
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self._registered.clear()

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: CUDA may already be gone, and the OS frees the pages
            pass


class MomentStore:
    """Saved state of inactive blocks under one policy; all copies go through `save` and `load`."""

    def __init__(self, policy: str, device: torch.device):
        if policy not in POLICIES:
            raise ValueError(f"Invalid inactive_moments: {policy!r}; choose one of {POLICIES}")
        self.policy = policy
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda and policy == "host" else None
        self._event = None
        self._pool = PinnedPool(pin=cuda and policy == "host")
        self._saved: dict[int, torch.Tensor] = {}  # block -> [n_buffers, block_len]

    # -- bookkeeping -------------------------------------------------------------------------------
    def has(self, block: int) -> bool:
        return block in self._saved

    def get(self, block: int) -> torch.Tensor | None:
        """The saved state of `block` (waits for copies in flight), or None."""
        self.synchronize()
        return self._saved.get(block)

    def put(self, block: int, state: torch.Tensor) -> None:
        """Store `state` ([n_buffers, block_len]) for `block` directly, e.g. from a loaded state_dict."""
        if self.policy == "drop":
            return
        self.synchronize()
        self._buffer(block, state.shape).copy_(state)

    def clear(self) -> None:
        self.synchronize()
        self._saved.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._saved.values())

    def _buffer(self, block: int, shape) -> torch.Tensor:
        buf = self._saved.get(block)
        if buf is None or tuple(buf.shape) != tuple(shape):
            buf = self._pool.empty(shape) if self.policy == "host" else torch.empty(shape, device=self.device)
            self._saved[block] = buf
        return buf

    # -- the switch --------------------------------------------------------------------------------
    def switch(self, leaving, arriving, length_of, slot_views, init_master):
        """Page out `leaving` blocks and page in (or zero) `arriving` ones.

        leaving / arriving: lists of (block, slot). slot_views(slot, length) -> list of per-buffer views
        of that slot. init_master(slot, block) fills the master of a block that has no saved state (only
        for low-precision models; None otherwise). Returns the blocks that started from zero.
        """
        compute = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if compute is not None:
            self.stream.wait_stream(compute)
        fresh = []
        with torch.cuda.stream(self.stream) if self.stream is not None else _nullcontext():
            if self.policy != "drop":
                for block, slot in leaving:
                    views = slot_views(slot, length_of(block))
                    buf = self._buffer(block, (len(views), length_of(block)))
                    for row, v in zip(buf, views):
                        row.copy_(v, non_blocking=True)
            for block, slot in arriving:
                views = slot_views(slot, length_of(block))
                saved = self._saved.get(block) if self.policy != "drop" else None
                if saved is not None:
                    for row, v in zip(saved, views):
                        v.copy_(row, non_blocking=True)
                    if self.policy == "device":  # resident copies only for inactive blocks, as published LISA
                        del self._saved[block]
                else:
                    fresh.append(block)
                    views[0].zero_()
                    views[1].zero_()
                    if len(views) > 2:
                        init_master(slot, block, views[2])
            if self.stream is not None:
                self._event = torch.cuda.Event()
                self._event.record(self.stream)
        return fresh

    def wait_ready(self) -> None:
        """Make the current stream wait for the last switch's copies (no host sync)."""
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None

    def synchronize(self) -> None:
        """Block the host until every copy in flight is done (state_dict, tests)."""
        if self.stream is not None:
            self.stream.synchronize()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
