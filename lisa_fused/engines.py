"""FusedLISA under the engines that take over a model after its optimizer exists: accelerate's FSDP2
prepare (and so the Hugging Face Trainer's `fsdp=`), DeepSpeed's optimizer wrappers, and
torch.distributed.checkpoint's optimizer helpers.

All of them touch the optimizer through `param_groups` or `state`, so that is where FusedLISA sees them:

* `WatchedGroup`, each of FusedLISA's param groups, reports an assignment to `group["params"]` at once.
  - accelerate (1.16: accelerator.py `_prepare_fsdp2`, utils/fsdp_utils.py
    `fsdp2_switch_optimizer_parameters`) shards the model with `fully_shard` and then assigns the new
    DTensor Parameters, one per old param in the same order, group by group: once every group is
    switched, FusedLISA rebuilds on them (`follow_params`, rebuild.rebind: their local shards are
    updated in place), keeping its active blocks, schedule and sampler state.
  - DeepSpeed (0.19: runtime/engine.py `_configure_optimizer`) wraps a client optimizer for ZeRO 1-3
    and for fp16/bf16; every wrapper assigns its own flat fp32 tensors of the params trainable at
    `deepspeed.initialize` (stage_1_and_2.py, stage3.py, bf16_optimizer.py, fp16/*.py). ZeRO 1-3: FusedLISA
    becomes ZeRO's client there (zero.ZeroSession.attach, zero_client.enter), which rebuilds ZeRO for each
    interval's trainable set; the other wrappers (ZeRO 0 fp16/bf16, BF16_Optimizer), which LISA's later
    blocks could never join, are refused there, naming the wrapper. ZeRO stage 0 in fp32 uses the client
    optimizer as it is, and works.
* `StateView` is `opt.state`, as torch's: an entry per param that has state, empty before the first step.
  torch.distributed.checkpoint's `_init_optim_state` runs `step()` with zero gradients and lr 0 when
  `optim.state` is empty (to create torch optimizers' state lazily); `dcp_init_step()` recognizes that
  call, so the step creates FusedLISA's state entries as it does torch AdamW's (step 1, zero moments, no
  change to the params) without moving LISA's schedule.

docs/engines-findings.md has the file:line trail for each of these.
"""
from __future__ import annotations

import operator
import sys
import weakref
from collections.abc import Mapping

import torch

from . import checkpoint, rebuild

# What each DeepSpeed optimizer wrapper is, for the refusal message (class name -> description).
_DEEPSPEED_WRAPPERS = {
    "DeepSpeedZeroOptimizer": lambda w: f"DeepSpeed ZeRO stage {2 if getattr(w, 'partition_gradients', False) else 1}",
    "ZenFlowZeroOptimizer": lambda w: f"DeepSpeed ZeRO stage {2 if getattr(w, 'partition_gradients', False) else 1}",
    "DeepSpeedZeroOptimizer_Stage3": lambda w: "DeepSpeed ZeRO stage 3",
    "BF16_Optimizer": lambda w: "DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 0, or ZeRO stage 1 with fp32 "
                                "gradient accumulation)",
    "FP16_Optimizer": lambda w: "DeepSpeed ZeRO stage 0 with fp16 or bf16 enabled (its FP16_Optimizer wrapper)",
    "FP16_UnfusedOptimizer": lambda w: "DeepSpeed ZeRO stage 0 with fp16 or bf16 enabled (its FP16_UnfusedOptimizer "
                                       "wrapper)",
}
SUPPORTED = ("supported instead: DeepSpeed ZeRO stage 0 with fp16 and bf16 disabled (for bf16 training give "
             "FusedLISA a bf16 model: it keeps fp32 master weights itself), or FSDP2 for sharding (the Trainer's "
             "fsdp='full_shard' with fsdp_config={'fsdp_version': 2}, accelerate's FSDP2 plugin, or fully_shard); "
             "see docs/integration.md")


class WatchedGroup(dict):
    """A FusedLISA param group: assigning `group["params"]` (a wrapper swapping the parameters) calls
    `follow_params` on the optimizer right away. Any other key behaves as in a dict."""

    _owner = None
    _index = 0

    def watch(self, opt, index: int) -> "WatchedGroup":
        self._owner, self._index = weakref.ref(opt), index
        return self

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        opt = self._owner() if key == "params" and self._owner is not None else None
        if opt is not None:
            follow_params(opt, self._index, sys._getframe(1))


def watch_groups(opt) -> None:
    """Make every entry of opt.param_groups a WatchedGroup (same contents)."""
    opt.param_groups = [WatchedGroup(g).watch(opt, k) for k, g in enumerate(opt.param_groups)]


def _old_groups(opt) -> list[list]:
    """The params each group held when FusedLISA bound them (param index order: group after group)."""
    out, start = [], 0
    for g in opt._group_sizes:
        out.append(opt._params[start:start + g])
        start += g
    return out


def check_group(opt) -> None:
    """At step()/zero_grad()/state_dict(): params replaced in place in a group's "params" list (a list mutated
    rather than assigned) are handled as an assignment would be."""
    for k, (group, old) in enumerate(zip(opt.param_groups, _old_groups(opt))):
        params = group["params"]
        if len(params) != len(old) or not all(map(operator.is_, params, old)):  # (map: C speed, every step)
            follow_params(opt, k, None, final=True)
            return


def _replaces(new, old) -> bool:
    """`new` can stand for `old`: one Parameter per param with the same (global) shape (accelerate's
    placeholders, plain 1-element tensors, cannot)."""
    return len(new) == len(old) and all(isinstance(q, torch.nn.Parameter) and tuple(q.shape) == tuple(p.shape)
                                        for q, p in zip(new, old))


def follow_params(opt, index: int, frame, final: bool = False) -> None:
    """param_groups[index]["params"] no longer holds FusedLISA's params; `frame` is the assigning code's frame.

    One tensor per old param with the same (global) shape, before the first step: a re-wrap such as
    accelerate's FSDP2 prepare, which switches the groups one after the other; once no group holds an old
    param any more, FusedLISA rebinds to the new ones (rebuild.rebind). Anything else (DeepSpeed's flat
    partitions, other tensors) raises RuntimeError naming who did it and what works.
    """
    if getattr(opt, "_zero", None) is not None:
        return  # (under ZeRO 1-3 the groups are ZeRO's to fill: its steps, rebuilds and checkpoints)
    olds = _old_groups(opt)
    new, old = list(opt.param_groups[index]["params"]), olds[index]
    if len(new) == len(old) and all(a is b for a, b in zip(new, old)):
        return
    where = _describe(frame)
    if _replaces(new, old):
        if opt._global_step or any(opt._steps):
            raise RuntimeError(
                f"FusedLISA: {where} replaced the optimizer's {len(old)} parameters by new ones (e.g. their FSDP2 "
                f"shards) after {opt._global_step} optimizer steps; FusedLISA follows such a re-wrap only before "
                "its first step, when it holds no state to carry over: wrap or shard the model (accelerator."
                "prepare, fully_shard) before training, or build FusedLISA on the wrapped model")
        _refuse_fsdp2_mixed_precision(opt, new, where)
        groups = [list(g["params"]) for g in opt.param_groups]
        pending = [k for k, (g, o) in enumerate(zip(groups, olds)) if not _replaces(g, o)]
        if not pending:
            rebuild.rebind(opt, [q for g in groups for q in g])
        elif final:
            raise RuntimeError(
                f"FusedLISA: param_groups{pending} still hold {[type(t).__name__ for t in groups[pending[0]][:2]]} "
                f"where its parameters were, while param_groups[{index}] was given new ones: every group must be "
                "switched to its parameters' replacements before training")
        return  # (accelerate switches the groups in a loop: wait for the last)
    owner = frame.f_locals.get("self") if frame is not None else None
    describe = _DEEPSPEED_WRAPPERS.get(type(owner).__name__) if owner is not None else None
    if describe is not None and type(owner).__module__.startswith("deepspeed"):
        from . import zero, zero_client

        session = zero.ZeroSession.attach(frame)  # (None: no ZeRO 1-3 construction; raises for untested ones)
        if session is not None:
            zero_client.enter(opt, session)
            return
        raise RuntimeError(
            f"FusedLISA cannot run under {describe(owner)}: {type(owner).__name__} replaces the optimizer's "
            f"{len(old)} parameters with {len(new)} fp32 tensor(s) of its own (flat partitions or copies) of the parameters "
            "that were trainable at deepspeed.initialize, so blocks that LISA activates later would never train "
            f"and FusedLISA's packed buffers would be bypassed; {SUPPORTED}")
    raise RuntimeError(
        f"FusedLISA: {where} replaced the {len(old)} parameters of param_groups[{index}] with {len(new)} other "
        f"tensors (shapes {[tuple(t.shape) for t in new[:3]]}{'...' if len(new) > 3 else ''}); FusedLISA follows only "
        "a re-wrap that keeps one tensor per parameter with the same shape (accelerate's FSDP2 prepare); build "
        "FusedLISA on the wrapped model instead")


def _refuse_fsdp2_mixed_precision(opt, new, where) -> None:
    """FSDP2 with a MixedPrecisionPolicy fixes each group's gradient dtypes at its lazy init (the first
    forward) from the params trainable then; FusedLISA froze the inactive blocks before this sharding, so
    the first block it activates later fails in backward ("assign a gradient with dtype BFloat16 to a
    tensor with grad_dtype Float"). Refused here instead. (torch 2.13: FSDPModule._get_fsdp_state()._mp_policy.)"""
    dtype = next((q.dtype for q in new), None)
    for block in opt.model_layout.stack:
        state = block._get_fsdp_state() if hasattr(block, "_get_fsdp_state") else None
        param_dtype = getattr(getattr(state, "_mp_policy", None), "param_dtype", None)
        if param_dtype is not None and param_dtype != dtype:
            raise RuntimeError(
                f"FusedLISA: {where} sharded the model with FSDP2 and MixedPrecisionPolicy(param_dtype={param_dtype}) "
                f"after FusedLISA had frozen the inactive blocks; FSDP2 fixes gradient dtypes at its first forward "
                "from the blocks trainable then, so blocks activated later would fail in backward. Not supported "
                "through accelerate/the Trainer (mixed_precision / bf16=True with fsdp_version 2): train with "
                "fp32 params there, or shard with fully_shard yourself, run one forward, reshard() and build "
                "FusedLISA after it (docs/integration.md, FSDP2)")


def _describe(frame) -> str:
    if frame is None:
        return "something (an in-place change of param_groups[0]['params'])"
    owner = frame.f_locals.get("self")
    name = frame.f_code.co_name
    if owner is not None:
        name = f"{type(owner).__name__}.{name}"
    return f"{frame.f_globals.get('__name__', '?')}.{name}"


def dcp_init_step() -> bool:
    """True when the running step() was called by torch.distributed.checkpoint's `_init_optim_state` (the
    zero-gradient, lr-0 step it takes to create an optimizer's state before get/set_optimizer_state_dict)."""
    frame = sys._getframe(1)
    for _ in range(8):  # step() -> torch's step wrappers (profile hook, _use_grad) -> _init_optim_state
        frame = frame.f_back
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and \
                frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
    return False


class StateView(Mapping):
    """`FusedLISA.state`: trained param -> its state as in `state_dict()["state"]` (CPU copies, built on
    access), for each param with state (stepped at least once, state kept: under "drop" an inactive block
    has none); empty before the first step, as torch's. Read-only. Holds the optimizer (a view taken from
    a temporary optimizer stays usable)."""

    def __init__(self, opt):
        self._opt = opt

    def _with_state(self) -> list[int]:
        opt = self._opt
        if opt._binding is None:
            return []
        bound = opt._binding.offset
        parked = {i for b, ix in enumerate(opt._block_params) if b not in opt._slot_of and opt._store.has(b) for i in ix}
        return [i for i, s in enumerate(opt._steps) if s > 0 and (i in bound or i in parked)]

    def __len__(self) -> int:
        return len(self._with_state())

    def __iter__(self):
        params = self._opt._params
        return iter([params[i] for i in self._with_state()])

    def __contains__(self, p) -> bool:
        return any(q is p for q in self)

    def __getitem__(self, p) -> dict:
        index = {id(q): i for i, q in enumerate(self._opt._params)}
        i = index.get(id(p))
        if i is None or i not in self._with_state():
            raise KeyError("not a parameter with state in this FusedLISA")
        return dict(checkpoint.state_dict(self._opt)["state"][i])
