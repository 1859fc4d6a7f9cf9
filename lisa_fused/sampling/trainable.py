"""Blocks with nothing to train: which blocks a draw may pick, what the constructor says about them, and
the checks that keep that true on every rank and across a resume.

A block of the stack whose parameters are all frozen when FusedLISA is built (peft LoRA with
`layers_to_transform`, a user who froze whole blocks) has nothing to train: drawing it would waste an
interval (or, when nothing else is trainable, make `loss.backward()` fail with autograd's "element 0 of
tensors does not require grad"). So every sampler is restricted to the blocks that have a trainable
parameter (`Sampler.restrict`, base.py), and when there are no more of those than `n_active_layers`
they all train at every step, without a draw (`draw_active`).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .base import Sampler

logger = logging.getLogger("lisa_fused")


def trainable_blocks(layout) -> tuple[int, ...]:
    """The blocks of `layout` (a layers.ModelLayout) with at least one trainable parameter, ascending."""
    return tuple(b for b, blk in enumerate(layout.blocks) if blk)


def announce(layout, n_active: int, sampler: Sampler) -> None:
    """The constructor's word on empty blocks (once, at construction): INFO naming the blocks without a
    trainable parameter, and a WARNING when no more blocks than `n_active` remain (they all train at every
    step, no draw). Under torch.distributed, first checks that every rank found the same blocks."""
    blocks = trainable_blocks(layout)
    check_same_on_every_rank(blocks)
    n = layout.num_blocks
    empty = [b for b in range(n) if b not in blocks]
    where = layout.stack_path or "the stack"
    if empty:
        how = (f"; the callable sampler is called with n_layers={len(blocks)} and its index j means block "
               f"{list(blocks)}[j]" if sampler.__class__.__name__ == "CallableSampler" else "")
        logger.info("FusedLISA: %d of the %d blocks of %s have no trainable parameter and are never drawn: %s "
                    "(frozen before FusedLISA was built, or no adapter); the draws pick among blocks %s%s",
                    len(empty), n, where, _short(empty), _short(list(blocks)), how)
    if empty and len(blocks) <= n_active:
        logger.warning("FusedLISA: only %d of the %d blocks of %s have a trainable parameter (%s), no more than "
                       "n_active_layers=%d: all of them train at every step, with no draw (plain AdamW over what "
                       "is trainable)", len(blocks), n, where, _short(list(blocks)), n_active)


def check_same_on_every_rank(blocks: Sequence[int]) -> None:
    """Under torch.distributed, every rank must draw from the same blocks: one all_gather of the list (on
    every rank, whatever it holds); a difference raises ValueError on every rank, naming both lists."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    lists = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(lists, list(blocks))
    differ = [r for r, got in enumerate(lists) if got != lists[0]]
    if differ:
        raise ValueError(
            f"FusedLISA: the blocks with a trainable parameter differ between ranks (rank 0: {lists[0]}, rank "
            f"{differ[0]}: {lists[differ[0]]}): every rank must freeze the same parameters before building "
            "FusedLISA, or the ranks would train different blocks")


def check_saved_active(sampler: Sampler, n_active: int, saved: Sequence[int]) -> None:
    """A state_dict's active set, before load_state_dict changes anything: distinct blocks the sampler may
    draw, no more than it trains at a time (fewer is allowed: blocks became trainable since the save,
    add_param_group). ValueError naming the blocks and the fix."""
    target = [int(b) for b in saved]
    k = min(n_active, len(sampler.drawable))
    bad = [b for b in target if b not in sampler.drawable]
    if bad and all(0 <= b < sampler.n_blocks for b in bad):
        raise ValueError(
            f"state_dict active_layers {target} include blocks {bad}, which have no trainable parameter in this "
            f"model (trainable blocks: {list(sampler.drawable)}): freeze the same parameters as in the saved run "
            "(the same peft config), or load only the model weights and start a fresh optimizer")
    if bad or len(set(target)) != len(target) or len(target) > k:
        raise ValueError(f"state_dict active_layers {target} are not at most {k} distinct blocks among the blocks "
                         f"with a trainable parameter ({list(sampler.drawable)}): it is damaged, or from another model")


def _short(blocks: list[int]) -> str:
    return str(blocks) if len(blocks) <= 16 else f"{blocks[:16]} ... ({len(blocks)} in all)"
