"""Device-side tables shared by the fused kernels (CUDA, CPU, Triton).

- chunk table: int64 [C, 3] rows of (segment, start, end) element indices, each chunk at most `chunk`
  elements of one segment; built once per Segments layout and cached in `segments.cache`.
- segment table: the per-step hparams [S, 4] as float32 on the kernel's device.
- pointer table: int64 [S, N_SEG_COLS] rows of (state offset, numel, param, grad, lowp addresses) of the
  segments' own tensors (contract.py); rebuilt only when an address changes.

Both reach a GPU through pinned staging memory with non_blocking copies: a copy from pageable memory
makes the host wait until the stream reaches it, and the step's stream waits for the page-in of a
switch (MomentStore.wait_ready), so a pageable copy would block the host for the whole page-in.
torch's pinned (caching host) allocator records the copy's event, so the staging buffer is not reused
before the copy has read it.
"""
from __future__ import annotations

import torch

from .contract import ALIGN, N_SEG_COLS, Segments

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(dtype: torch.dtype | None) -> int:
    """The csrc/adamw_math.h DType code of a storage dtype (-1 for None)."""
    return -1 if dtype is None else _DTYPE_CODES[dtype]


def chunk_table(segments: Segments, chunk: int, device: torch.device) -> torch.Tensor:
    """int64 [C, 3] (segment, start, end) on `device`, cached per (chunk, device) in `segments.cache`."""
    if chunk <= 0 or chunk % ALIGN:
        raise ValueError(f"chunk must be a positive multiple of {ALIGN}, got {chunk}")
    device = torch.device(device)
    key = ("chunks", chunk, str(device))
    table = segments.cache.get(key)
    if table is None:
        bounds = segments.tensor()
        offsets, numels = bounds[:, 0], bounds[:, 1]
        counts = (numels + chunk - 1) // chunk
        seg = torch.repeat_interleave(torch.arange(len(segments)), counts)
        first_row = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        start = offsets[seg] + (torch.arange(len(seg)) - first_row) * chunk
        end = torch.minimum(start + chunk, offsets[seg] + numels[seg])
        table = to_device(torch.stack([seg, start, end], dim=1), device)
        segments.cache[key] = table
    return table


def offsets_aligned(segments: Segments) -> bool:
    """True when every segment starts on an ALIGN-element boundary (what contract.py promises)."""
    key = ("aligned", ALIGN)
    if key not in segments.cache:
        segments.cache[key] = all(off % ALIGN == 0 for off, _ in segments.bounds)
    return segments.cache[key]


def segment_table(hparams: torch.Tensor, device: torch.device) -> torch.Tensor:
    """hparams (float64, host) as float32 on `device`; to a GPU through pinned memory, without a sync."""
    return to_device(hparams.to(torch.float32), device)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous copy of the host tensor `host` on `device`; to a GPU through pinned memory, without a
    host sync (the result is ready in stream order on the current stream)."""
    device = torch.device(device)
    if device.type == "cpu":
        return host.contiguous()
    staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    staged.copy_(host)
    return staged.to(device, non_blocking=True)


def _addr(t) -> int:
    return 0 if t is None else t.data_ptr()


def pointer_table(segments: Segments, params, grads, lowps, device: torch.device) -> torch.Tensor:
    """int64 [S, N_SEG_COLS] on `device`: per segment (SEG_OFFSET, SEG_NUMEL, SEG_PARAM, SEG_GRAD, SEG_LOWP),
    addresses of params[s], grads[s] (0 for None), lowps[s] (0 without lowps). Built on the host from the
    live tensors and cached in `segments.cache` with the addresses it was built from: reused as long as
    none changes (one data_ptr per tensor per call, ~S * 0.3 us), else rebuilt and sent through pinned
    memory without a host sync (to_device)."""
    lows = lowps if lowps is not None else (None,) * len(params)
    addrs = tuple(map(_addr, params)) + tuple(map(_addr, grads)) + tuple(map(_addr, lows))
    key = ("pointers", str(device))
    hit = segments.cache.get(key)
    if hit is not None and hit[0] == addrs:
        return hit[1]
    s = len(params)
    rows = [(off, n, addrs[k], addrs[s + k], addrs[2 * s + k]) for k, (off, n) in enumerate(segments.bounds)]
    table = to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1, N_SEG_COLS), device)
    segments.cache[key] = (addrs, table)
    return table
