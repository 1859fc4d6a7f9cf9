"""Which block sits in which slot of FusedLISA's packed state, and the move from one active set to the
next: a leaving block's state is paged out and its params frozen; an arriving block's params are bound
to a free slot (they keep their own storage) and its state is paged in (or started fresh).

The packed layout (packing.PackedLayout, one per state-format partition of packing.PackedState) has one
region for the always-trained params and `n_slots` equal slots for blocks; a block in slot s sits in
slot s of every partition. Blocks that stay active keep their slot, so a switch touches only the blocks
that change. Params are bound (given their state offsets) by binding.ParamBinding, state is paged by
paging.MomentStore.
"""
from __future__ import annotations

import logging

from .binding import ParamBinding
from .packing import PackedState
from .paging import MomentStore


logger = logging.getLogger("lisa_fused")


class Slots:
    """`slot_of`: active block -> slot. `block_params[b]`: indices (into `params`, named `names`) of block
    b's params. `untrained`: the model's (name, param) pairs FusedLISA does not train (frozen at construction)."""

    def __init__(self, packed: PackedState, block_params: list, params: list, names=(), untrained=()):
        self.packed = packed
        self.block_params = block_params
        self.params, self.names, self.untrained = params, names, untrained
        self._warned: set[int] = set()
        self.slot_of: dict[int, int] = {}
        self.user_frozen: set[int] = set()  # params the user froze while their block was active
        self._seg_key = None
        self._seg_cache = None

    @property
    def active(self) -> tuple[int, ...]:
        return tuple(sorted(self.slot_of))

    def segments(self):
        """Per partition, the kernel's (segments, param indices) for the current active set (cached per set)."""
        key = tuple(sorted(self.slot_of.items()))
        if self._seg_key != key:
            self._seg_cache = [lay.segments(self.slot_of) for lay in self.packed.layouts]
            self._seg_key = key
        return self._seg_cache

    def meter_blocks(self) -> list[int | None]:
        """The block of each kernel segment (None: always trained), partition after partition."""
        block_of = {i: b for b, ix in enumerate(self.block_params) for i in ix}
        return [block_of.get(i) for _, seg_params in self.segments() for i in seg_params]

    def set_trainable(self, b: int, flag: bool) -> None:
        """Freeze block b, or unfreeze it except the params the user froze (requires_grad=False while the
        block was active: kept frozen across switches, as with torch's optimizers)."""
        for i in self.block_params[b]:
            self.params[i].requires_grad_(flag and i not in self.user_frozen)

    def check_flags(self) -> None:
        """requires_grad flipped by the user: on a param of an inactive block it means "train it when its
        block is drawn" (frozen again now, INFO); a param FusedLISA does not train that now has a gradient
        is ignored (WARNING once, naming add_param_group)."""
        unfrozen = self.refreeze_inactive()
        if unfrozen:
            logger.info("FusedLISA: requires_grad=True was set on %d params of inactive blocks (e.g. %r): they train "
                        "when their block is drawn and stay frozen until then", len(unfrozen), self.names[unfrozen[0]])
        for name, p in self.untrained:
            if p.grad is not None and id(p) not in self._warned:
                self._warned.add(id(p))
                logger.warning("FusedLISA: parameter %r was frozen when FusedLISA was built, so it is not trained; it "
                               "now has a gradient, which step() ignores: add it with opt.add_param_group({'params': "
                               "[%r]}) to train it", name, name)

    def refreeze_inactive(self) -> list[int]:
        """Params of inactive blocks that someone set requires_grad=True on: frozen again, and no longer
        counted as frozen by the user (they train when their block is drawn). Returns them."""
        out = [i for b, ix in enumerate(self.block_params) if b not in self.slot_of for i in ix
               if self.params[i].requires_grad]
        for i in out:
            self.params[i].requires_grad_(False)
            self.user_frozen.discard(i)
        return out

    def move(self, new_active, binding: ParamBinding, store: MomentStore, page: bool) -> list[int]:
        """Make `new_active` the active set (blocks that stay keep their slot); returns the arriving blocks
        whose state started fresh (no saved state, or the "drop" policy)."""
        new_active = tuple(sorted(new_active))
        leaving = [(b, s) for b, s in self.slot_of.items() if b not in new_active]
        n_slots = self.packed.layouts[0].n_slots
        free = sorted(s for _, s in leaving) + sorted(set(range(n_slots)) - set(self.slot_of.values()))
        arriving = [(b, free.pop(0)) for b in new_active if b not in self.slot_of]
        return self.activate(binding, store, leaving, [b for b, _ in arriving], [s for _, s in arriving], page)

    def activate(self, binding: ParamBinding, store: MomentStore, leaving, arriving, slots, page: bool) -> list[int]:
        """Unbind `leaving` [(block, slot)], bind `arriving` blocks into `slots`; with `page`, page the
        optimizer state out and in on the copy stream (without: the caller writes the state, as a
        checkpoint load does). Returns the arriving blocks whose state started fresh."""
        # 1) params: leaving blocks are frozen, drop their grads (a frozen param has none: this step used them,
        # and the memory goes back) and forget their slot; arriving ones get theirs.
        for b, _ in leaving:
            for i in self.block_params[b]:
                (self.user_frozen.discard if self.params[i].requires_grad else self.user_frozen.add)(i)
                self.params[i].grad = None
                binding.unbind(i)
            del self.slot_of[b]
            self.set_trainable(b, False)
        for b, s in zip(arriving, slots):
            self.set_trainable(b, True)
            for lay in self.packed.layouts:
                base = lay.slot_offset(s)
                for i, off, _ in lay.blocks[b].entries:
                    binding.bind(i, base + off)
            self.slot_of[b] = s
        if not page:
            return []
        # 2) optimizer state: paged on the copy stream (or reset).
        packed = self.packed

        def init_fresh(slot, block, _views):
            """A block arriving without saved state: moments, scales and compensation start at zero, the
            fp32 masters of bf16/fp16 params from the params, in every partition."""
            for lay, bufs in zip(packed.layouts, packed.bufs):
                off = lay.slot_offset(slot)
                for name, v in zip(bufs.paged_names(), bufs.rows(off, lay.blocks[block].length)):
                    if name != "master":
                        v.zero_()
                binding.write_masters([(i, off + o, n) for i, o, n in lay.blocks[block].entries])

        return store.switch(leaving=leaving, arriving=list(zip(arriving, slots)),
                            rows_of=lambda b, slot: packed.block_rows(b, slot), init_fresh=init_fresh)
