"""Slot layout of the packed buffers: which parameter sits where.

    [ always-trained params | slot 0 | slot 1 | ... | slot gamma-1 ]

The always-trained region (embeddings, head, final norm, ...) is packed once. Each slot is as long as
the largest block, so any block fits any slot and the buffers never grow: device memory is fixed at
construction. Every segment (one parameter) starts at a multiple of ALIGN elements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import ALIGN, Segments


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Region:
    """A run of parameters packed back to back: (param_index, offset in the region, numel) each."""

    entries: tuple[tuple[int, int, int], ...]
    length: int  # elements, aligned

    @classmethod
    def of(cls, param_indices, params) -> "Region":
        entries, off = [], 0
        for i in param_indices:
            n = params[i].numel()
            entries.append((i, off, n))
            off += aligned(n)
        return cls(tuple(entries), off)


@dataclass(frozen=True)
class PackedLayout:
    always: Region
    blocks: tuple[Region, ...]
    n_slots: int

    @property
    def slot_len(self) -> int:
        return max((b.length for b in self.blocks), default=0)

    @property
    def total(self) -> int:
        return self.always.length + self.n_slots * self.slot_len

    def slot_offset(self, slot: int) -> int:
        return self.always.length + slot * self.slot_len

    def placements(self, slot_of: dict[int, int]):
        """(param_index, absolute offset, numel) of every packed param, given block -> slot."""
        out = list(self.always.entries)
        for block, slot in sorted(slot_of.items(), key=lambda kv: kv[1]):
            base = self.slot_offset(slot)
            out.extend((i, base + off, n) for i, off, n in self.blocks[block].entries)
        return out

    def segments(self, slot_of: dict[int, int]) -> tuple[Segments, list[int]]:
        """The kernel's segment table for this assignment, and the param index of each segment."""
        pl = self.placements(slot_of)
        return Segments([(off, n) for _, off, n in pl]), [i for i, _, _ in pl]


class PackedBuffers:
    """The flat device buffers. `param` is what model parameters view: the fp32 master itself for fp32
    models, a low-precision copy (written back by the kernel) for bf16/fp16 models."""

    def __init__(self, total: int, device: torch.device, param_dtype: torch.dtype):
        kw = dict(device=device)
        self.master = torch.zeros(total, dtype=torch.float32, **kw)
        self.lowp = None if param_dtype == torch.float32 else torch.zeros(total, dtype=param_dtype, **kw)
        self.grad = torch.zeros(total, dtype=param_dtype, **kw)
        self.exp_avg = torch.zeros(total, dtype=torch.float32, **kw)
        self.exp_avg_sq = torch.zeros(total, dtype=torch.float32, **kw)

    @property
    def param(self) -> torch.Tensor:
        return self.master if self.lowp is None else self.lowp

    def paged(self) -> tuple[torch.Tensor, ...]:
        """The buffers whose slot contents follow a block when it leaves: moments, and masters when the
        model's own params are low precision (an fp32 model's params go back to the model instead)."""
        return (self.exp_avg, self.exp_avg_sq) if self.lowp is None else (self.exp_avg, self.exp_avg_sq, self.master)

    def nbytes(self) -> int:
        bufs = [self.master, self.grad, self.exp_avg, self.exp_avg_sq] + ([self.lowp] if self.lowp is not None else [])
        return sum(b.numel() * b.element_size() for b in bufs)
