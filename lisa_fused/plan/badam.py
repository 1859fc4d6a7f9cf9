"""The `badam` row of `lisa-fused plan`: BAdam (pip badam 1.4 `BlockOptimizer` around torch.optim.AdamW,
as LlamaFactory builds it with its `badam_*` defaults) trains one block of the stack at a time, updates an
fp32 master copy of that block with AdamW moments of the master, and leaves the embedding, the head and
every parameter outside the stack frozen (`block_prefix_list=None` infers one prefix per block).

Traced like the full row (planner.py): the real BlockOptimizer is built on the fake model and its step
runs inside the trace. The block trained is block 0, BAdam's first in its default ascending order and the
worst place for activations: with the embedding frozen, backward reaches block 0 only through every block
above it, whose activations it keeps. Traces of 2 and 3 blocks (block 0 trained, the rest frozen) are
extrapolated to the full depth, one frozen block per delta (trace.extrapolate). State = what the
BlockOptimizer keeps (its AdamW's exp_avg, exp_avg_sq and step of the master; the fp32 masters) + the
block's grads in the parameters' dtype; act+temp = the traced peak minus those grads, as in the full row
(the fp32 copy BAdam makes of a bf16 grad inside step() is a temporary of the step's event).

`plan_badam(planner)` raises ImportError when badam is not installed; plan() then lists the row as skipped.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .kept import state_tensors, storage_bytes
from .trace import extrapolate, fakeify, peak_role, roles, trace_events

SETTING = "one block at a time (ascending), fp32 master of it, embedding and head frozen; AdamW"
INSTALL = 'pip install "badam==1.4"'
# LlamaFactory's defaults (hparams/finetuning_args.py); lisa_fused.bench.peers builds the bench's with them
DEFAULTS = dict(switch_block_every=50, start_block=None, switch_mode="ascending", verbose=0)


def block_optimizer(model: torch.nn.Module):
    """BAdam's BlockOptimizer on `model` (every parameter handed over, as LlamaFactory does), around a
    torch.optim.AdamW; the block list it infers starts at block 0. Its prints and its fp32 warning are
    swallowed (they would land in the plan's output). ImportError without badam."""
    badam = importlib.import_module("badam")
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message="BAdam expect model to be loaded in fp16/bf16")
        return badam.BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                                    block_prefix_list=None, **DEFAULTS)


def kept_tensors(opt) -> list[torch.Tensor]:
    """What a BlockOptimizer keeps: its AdamW's state and the fp32 masters of the active block."""
    return [*state_tensors(opt.base_optimizer), *opt.param_idx2hp.values()]


def _trace(planner, n_blocks: int) -> tuple[dict, tuple[int, int, int]]:
    """Roles of one traced BAdam step of an `n_blocks`-deep copy, and its (kept, grads, weights) bytes."""
    model = planner._meta(n_blocks)
    stack = model.get_submodule(planner.stack_path)
    with FakeTensorMode():
        fakeify(model, planner.trace_device)
        opt = block_optimizer(model)
        with contextlib.redirect_stdout(io.StringIO()):
            events = trace_events(model, planner.batch_size, planner.seq_len, planner.vocab_size, opt,
                                  layers=stack, kept=lambda: kept_tensors(opt))
        trained = [p for p in model.parameters() if p.requires_grad]
        nbytes = (sum(storage_bytes(kept_tensors(opt)).values()),
                  sum(p.numel() * p.element_size() for p in trained),
                  sum(storage_bytes(model.parameters()).values()))
    kinds = ["trainable" if any(p.requires_grad for p in b.parameters()) else "frozen" for b in stack]
    return roles(events, kinds), nbytes


def plan_badam(planner) -> tuple[int, int, int, int, str]:
    """(traced peak, kept, grads, weights) bytes of the full-depth model and where the peak is."""
    n = planner.n_blocks
    if n <= 3:  # shallow enough to trace whole
        base, nbytes = _trace(planner, n)
        return (max(base.values()), *nbytes, peak_role(base, []))
    (two, b2), (three, b3) = _trace(planner, 2), _trace(planner, 3)
    deltas = [(three, n - 2)]
    return (extrapolate(two, deltas), *(x + (n - 2) * (y - x) for x, y in zip(b2, b3)), peak_role(two, deltas))
