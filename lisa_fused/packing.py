"""Slot layout of the packed state buffers: where each trained parameter's optimizer state sits.

    [ always-trained params | slot 0 | slot 1 | ... | slot gamma-1 ]

Only the optimizer's own state is packed (moments, scales, compensation, fp32 masters of bf16/fp16
params); the parameters and gradients stay the model's own tensors (kernels/contract.py: each segment
addresses them by pointer). The always-trained region (embeddings, head, final norm, ...) is packed once. Each slot is as long as
the largest block, so any block fits any slot and the buffers never grow: device memory is fixed at
construction. Every segment (one parameter) starts at a multiple of ALIGN elements.

Parameters whose optimizer state has another format (groups.StateFormat: moments, master weights) live
in buffers of their own: one *partition* per format (`PackedState`), each with the layout above over its
own parameters, and one kernel launch per step. A block in slot s occupies slot s of every partition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import ALIGN, Segments, quant


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
        """The kernel's segments (state offsets) for this assignment, and the param index of each segment."""
        pl = self.placements(slot_of)
        return Segments([(off, n) for _, off, n in pl]), [i for i, _, _ in pl]


class PackedBuffers:
    """The flat device buffers of one state setting (kernels/contract.py defines every format): only
    what the optimizer adds to the model. Params and grads are the model's own tensors, never packed.

        attribute          dtype, elements (total = packed elements, a multiple of ALIGN)
        master             fp32 [total]                 bf16/fp16 params with master_weights="fp32" only
                                                        (an fp32 param is its own master)
        exp_avg(_sq)       fp32 | bf16 [total], or uint8 codes [total] (8bit) / [total/2] (4bit)
        exp_avg(_sq)_scale fp32 [total / BLOCK]         8bit (BLOCK 256) / 4bit (BLOCK 128) only
        compensation       param dtype [total]          master_weights="kahan" only

    A segment at element offset `off` (a multiple of ALIGN, itself a multiple of every BLOCK and of 2)
    owns codes [off / 2, ...) in 4-bit and scales [off / BLOCK, ...): `rows(off, n)` slices every paged
    buffer that way, so a block's lean state pages and saves as it is.
    """

    def __init__(self, total: int, device: torch.device, param_dtype: torch.dtype, moments: str = "fp32",
                 master_weights: str = "fp32"):
        self.moments, self.master_weights, self.param_dtype = moments, master_weights, param_dtype
        lowp = param_dtype != torch.float32
        self.master = torch.zeros(total, dtype=torch.float32, device=device) \
            if master_weights == "fp32" and lowp else None
        state = quant.state_buffers(total, moments, master_weights, param_dtype, device)  # the kernels' formats
        self.exp_avg, self.exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        self.exp_avg_scale, self.exp_avg_sq_scale = state.get("exp_avg_scale"), state.get("exp_avg_sq_scale")
        self.compensation = state.get("compensation")

    @property
    def device(self) -> torch.device:
        return self.exp_avg.device

    def state_kwargs(self) -> dict:
        """The lean-state keywords of kernels.adamw_segments_ for these buffers."""
        return dict(moments=self.moments, master_weights=self.master_weights, exp_avg_scale=self.exp_avg_scale,
                    exp_avg_sq_scale=self.exp_avg_sq_scale, compensation=self.compensation)

    def paged_names(self) -> tuple[str, ...]:
        """Attribute names of the buffers whose slot contents follow a block when it leaves: moments
        (with their scales), the Kahan compensation, and the fp32 masters of low-precision params: every
        buffer. exp_avg, exp_avg_sq first."""
        names = ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale", "compensation", "master")
        return tuple(n for n in names if getattr(self, n) is not None)

    def paged(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.paged_names())

    def divisor(self, name: str) -> int:
        """Elements per entry of buffer `name`: 1, 2 (4-bit codes) or BLOCK (scales)."""
        if name.endswith("_scale"):
            return quant.BLOCK[self.moments]
        return 2 if self.moments == "4bit" and name in ("exp_avg", "exp_avg_sq") else 1

    def rows(self, off: int, n: int, buffers=None) -> list[torch.Tensor]:
        """Views of every paged buffer (or of `buffers`, aligned with paged_names()) over the elements
        [off, off + n) of the packed index space; off must be a multiple of ALIGN."""
        if off % ALIGN:
            raise ValueError(f"packed offset {off} is not a multiple of ALIGN={ALIGN}: codes and scales would not line up")
        buffers = self.paged() if buffers is None else buffers
        out = []
        for name, buf in zip(self.paged_names(), buffers):
            d = self.divisor(name)
            out.append(buf[off // d: off // d + -(-n // d)])
        return out

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes per kind: master, moment, scale, compensation."""
        def b(*ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        return {"master": b(self.master), "moment": b(self.exp_avg, self.exp_avg_sq),
                "scale": b(self.exp_avg_scale, self.exp_avg_sq_scale), "compensation": b(self.compensation)}

    def nbytes(self) -> int:
        return sum(self.nbytes_by_kind().values())


class PackedState:
    """Every partition's layout (fixed) and buffers (rebuilt when the model moves).

    formats: the StateFormat of each trained param (param index i = position); always: indices of the
    always-trained params; blocks: indices of each block's params; params: the (rank-local) tensors, for
    their sizes. Partitions come in the order their format first appears among the params.
    """

    def __init__(self, formats, always, blocks, params, n_slots: int, device, dtype):
        self.formats = list(dict.fromkeys(formats))
        self.part_of = [self.formats.index(f) for f in formats]
        self.layouts = [
            PackedLayout(always=Region.of([i for i in always if self.part_of[i] == p], params),
                         blocks=tuple(Region.of([i for i in blk if self.part_of[i] == p], params) for blk in blocks),
                         n_slots=n_slots)
            for p in range(len(self.formats))]
        self.bufs = self.allocate(device, dtype)

    def allocate(self, device, dtype) -> list[PackedBuffers]:
        return [PackedBuffers(lay.total, device, dtype, f.moments, f.master_weights)
                for lay, f in zip(self.layouts, self.formats)]

    def __len__(self) -> int:
        return len(self.formats)

    def buffers_of(self, i: int) -> PackedBuffers:
        return self.bufs[self.part_of[i]]

    def placements(self, slot_of: dict[int, int]):
        """(param_index, offset in its partition, numel) of every packed param, partition by partition."""
        return [e for lay in self.layouts for e in lay.placements(slot_of)]

    def block_rows(self, block: int, slot: int, bufs=None) -> list[torch.Tensor]:
        """The paged rows of `block` placed in `slot`: every partition's rows over the block's region, in
        partition order (what the store saves for the block). `bufs`: other buffers of the same layout."""
        bufs = self.bufs if bufs is None else bufs
        return [r for lay, b in zip(self.layouts, bufs)
                for r in b.rows(lay.slot_offset(slot), lay.blocks[block].length)]

    def split_rows(self, rows, bufs=None) -> list[list[torch.Tensor]]:
        """A block's concatenated rows (block_rows order, of `bufs`: default the current buffers) -> one
        list per partition."""
        rows, out, k = list(rows), [], 0
        for b in self.bufs if bufs is None else bufs:
            n = len(b.paged_names())
            out.append(rows[k:k + n])
            k += n
        return out

    def block_spec(self, block: int) -> list[tuple[torch.dtype, int]]:
        """(dtype, numel) of each row the store keeps for `block`."""
        return [(v.dtype, v.numel()) for v in self.block_rows(block, 0)]

    def nbytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.bufs:
            for k, v in b.nbytes_by_kind().items():
                out[k] = out.get(k, 0) + v
        return out

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.bufs)
