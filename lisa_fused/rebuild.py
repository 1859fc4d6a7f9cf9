"""Rebuilding a FusedLISA's packed state after construction: when the model moved (`follow_move`), when
parameters join (`add_param_group`), and when a wrapper swapped the Parameter objects before the first step
(`rebind`: accelerate's FSDP2 prepare). Each keeps every parameter's optimizer state and the schedule."""
from __future__ import annotations

import logging

import torch

from . import groups, kernels
from .binding import local
from .layers import find_layout
from .paging import MomentStore

logger = logging.getLogger("lisa_fused")


@torch.no_grad()
def follow_move(opt) -> None:
    """The model's params got new storage (model.to(...), .half(), .cuda()): rebuild the packed buffers and
    the paged store where the params went (_moved_buffers says what survives). RuntimeError naming the
    param where following is impossible; nothing changes before it."""
    binding = opt._binding
    dev, dt = binding.target()  # raises where following is impossible
    lean_masters = sorted({f.master_weights for f in opt._packed_state.formats} - {"fp32"})
    if dt != opt.param_dtype and lean_masters:
        raise RuntimeError(
            f"FusedLISA: the model was converted from {opt.param_dtype} to {dt}, but master_weights="
            f"{lean_masters[0]!r} keeps no fp32 master to convert from: convert the model back, or "
            "take state_dict(), release(), and build a new FusedLISA for the converted model")
    backend = kernels.resolve_backend(opt._backend_request, dev)
    opt._store.synchronize()
    was = (opt.device, opt.param_dtype)
    olds = binding.state.bufs
    binding.repoint(_moved_buffers(binding, dev, dt))
    old_store, opt._store = opt._store, MomentStore.reserved(opt.inactive_moments, dev, opt._packed_state)
    for b in range(len(opt._block_params)):
        if b not in opt._slot_of and old_store.has(b):
            opt._store.put(b, _parked_rows(binding, b, old_store.get(b), olds))
    old_store.release()  # (unregisters its pinned memory now, not at garbage collection)
    opt.device, opt.param_dtype, opt.backend = dev, dt, backend
    if opt._meter is not None:
        opt._meter.to(dev)
    log = logger.warning if dt != was[1] else logger.info
    log("FusedLISA: the model's params got new storage (model.to(...): %s on %s -> %s on %s); the optimizer "
        "followed (packed buffers, paged state, masters; backend %r)", was[1], was[0], dt, dev, backend)


def _moved_buffers(binding, device, dtype):
    """New packed buffers on `device` for `dtype` params, filled from the current ones.

    Values: the fp32 values the optimizer holds survive the move (masters of a low-precision model become
    the params of an fp32 one; an fp32 model's params become the masters of a low-precision one), and
    low-precision params are their masters rounded to nearest; except a param whose value is not its old
    value converted (someone wrote it after the move, e.g. DDP's broadcast of rank 0's weights), which
    keeps its new value (and its master becomes it). Moments move as they are. Lean state (moments /
    master_weights, the same before and after) moves as it is; without an fp32 master (kahan / stochastic:
    the dtype cannot change) the params keep their moved values."""
    state = binding.state
    olds, news = state.bufs, state.allocate(device, dtype)
    for old, new in zip(olds, news):
        for name in ("master", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale", "compensation"):
            if getattr(new, name) is not None:
                getattr(new, name).copy_(getattr(old, name))
    for i, off in binding.offset.items():
        old, new = olds[state.part_of[i]], news[state.part_of[i]]
        moved = local(binding.params[i]).detach()
        if new.master is None:
            binding.view(new.lowp, i, off).copy_(moved)
        elif not torch.equal(moved, binding.view(old.param, i, off).to(device=moved.device, dtype=moved.dtype)):
            # written after the move (a DDP wrapper's broadcast of rank 0's weights): that value wins
            binding.view(new.master, i, off).copy_(moved)
    for new in news:
        if new.lowp is not None and new.master is not None:  # params = masters rounded to nearest, as after a step
            new.lowp.copy_(new.master)
    return news


def _parked_rows(binding, block: int, rows, olds) -> list[torch.Tensor]:
    """A parked block's store rows (every partition's, PackedState.block_rows order) converted for the
    current buffers after a move from `olds`: its params take their masters (rounded, for a low-precision
    model) unless written after the move; an fp32 -> low-precision move gives it masters from its
    (converted) params."""
    state, out = binding.state, []
    for k, (part, old, new) in enumerate(zip(state.split_rows(rows, olds), olds, state.bufs)):
        region, part = state.layouts[k].blocks[block], [r.clone() for r in part]
        names = old.paged_names()
        if "master" not in names and "master" not in new.paged_names():
            out += part  # lean state without masters, same dtype: it moves as it is
            continue
        if old.lowp is not None:
            mi = names.index("master")
            for i, off, n in region.entries:
                p, master = local(binding.params[i]).detach(), part[mi][off:off + n].view(binding.shapes[i])
                if torch.equal(p, master.to(old.lowp.dtype).to(device=p.device, dtype=p.dtype)):
                    p.copy_(master)
                else:
                    master.copy_(p)
        out += [r for name, r in zip(names, part) if name != "master"]  # moments, scales
        if new.lowp is not None:
            if old.lowp is None:
                own = torch.zeros(region.length)
                for i, off, n in region.entries:
                    own[off:off + n] = local(binding.params[i]).detach().reshape(-1).float().cpu()
                out.append(own)
            else:
                out.append(part[names.index("master")])
    return out


@torch.no_grad()
def rebind(opt, new_params) -> None:
    """Start over on new Parameter objects for the same parameters, in the same order (`new_params`, one per
    opt._params): accelerate's FSDP2 prepare swaps in their DTensor shards. Buffers, store, slots and meter
    are rebuilt over them with the same groups, active blocks, generator, sampler and user-frozen params;
    engines.follow_params allows it only before the first step (no optimizer state to carry over)."""
    from . import engines, validation

    active, flags, frozen = opt.active_layers, opt._binding.user_flags(), set(opt._slots.user_frozen)
    mapping = {id(p): q for p, q in zip(opt._params, new_params)}
    opt._store.synchronize()
    opt._binding.release()
    opt._binding = None
    opt._store.release()
    engines.replace_layout_params(opt.model_layout, mapping)
    layout = opt.model_layout
    named = list(layout.always) + [np for blk in layout.blocks for np in blk]
    index = {id(p): j for j, (_, p) in enumerate(named)}
    members, start = [], 0
    for n in opt._group_sizes:
        members.append([index[id(q)] for q in new_params[start:start + n]])
        start += n
    opt.device, opt.param_dtype = validation.device_and_dtype(list(new_params))
    opt.backend = kernels.resolve_backend(opt._backend_request, opt.device)
    for g, idx in zip(opt.param_groups, members):
        dict.__setitem__(g, "params", [named[j][1] for j in idx])  # (not the watched assignment)
    opt._build(layout, named, members, active=active, user_flags=flags)
    opt._slots.user_frozen |= frozen
    logger.info("FusedLISA: followed a parameter switch (%d params, now %s on %s; copy mode %s)", len(new_params),
                opt.param_dtype, opt.device, opt._binding.copy_mode)


def add_param_group(opt, param_group: dict) -> None:
    """FusedLISA.add_param_group: take the state (state_dict), release the model, re-plan with the new group
    last, build and load the state back; the new params start with empty state. Their indices come after
    every existing param's, so the saved indices stay valid. A group that cannot be planned is refused with
    the optimizer rebuilt exactly as it was."""
    where = f"add_param_group (the new opt.param_groups[{len(opt.param_groups)}])"
    if not isinstance(param_group, dict):
        raise TypeError(f"{where}: expected a dict with 'params' and options, got {type(param_group).__name__}")
    groups.validate_group_options(param_group, where, {opt.param_dtype})
    names = {id(p): n for n, p in opt._model.named_parameters()}
    items = param_group.get("params")
    items = [items] if isinstance(items, (str, torch.Tensor)) else list(items or [])
    for item in items:
        if isinstance(item, torch.Tensor) and id(item) in names and not item.requires_grad:
            raise ValueError(f"{where}: parameter {names[id(item)]!r} has requires_grad=False: set "
                             "requires_grad=True on it first (FusedLISA trains the parameters you unfroze)")
    sd, flags = opt.state_dict(), _frozen_by_user(opt)
    new_group = dict(opt.defaults, **{k: v for k, v in param_group.items() if k != "params"}, params=items)
    kept = [dict(g) for g in opt.param_groups[1:]]
    group0 = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    old = {id(p) for p in opt._params}
    opt.release()  # own storage, the user's requires_grad flags
    try:
        layout, named, members = _plan(opt, group0, kept + [new_group])
        twice = [named[j][0] for j in members[-1] if id(named[j][1]) in old]
        if twice:
            raise ValueError(f"{where}: parameter {twice[0]!r} is already trained by this FusedLISA (a parameter "
                             "may belong to one group only); change its group's options in opt.param_groups instead")
        stray = [named[j][0] for j in members[0] if id(named[j][1]) not in old]
        if stray:
            raise ValueError(f"{where}: {stray[:3]} became trainable since FusedLISA was built but are in no "
                             "group: add them in this group, or freeze them again")
    except (ValueError, TypeError, RuntimeError):
        # back as it was: the same params (those unfrozen since are left out of the plan) and state
        newly = [p for p in opt._model.parameters() if p.requires_grad and id(p) not in old]
        for p in newly:
            p.requires_grad_(False)
        try:
            _restore(opt, sd, flags, *_plan(opt, group0, kept))
        finally:
            for p in newly:
                p.requires_grad_(True)
        raise
    n_new = len(members[-1])
    sd["param_groups"] = sd["param_groups"] + [
        {k: v for k, v in new_group.items() if k != "params"} | {"params": list(range(len(old), len(old) + n_new))}]
    sd["lisa"]["params"] = sd["lisa"]["params"] + [(named[j][0], tuple(named[j][1].shape)) for j in members[-1]]
    _restore(opt, sd, flags, layout, named, members)
    logger.info("FusedLISA: param group %d added (%d params: %s)", len(opt.param_groups) - 1, n_new,
                ", ".join(opt._names[-n_new:][:3]) + (" ..." if n_new > 3 else ""))


def _plan(opt, group0, given):
    """Set param_groups for (group0 options, given groups) on the model as it is now; (layout, named, members).
    Keys FusedLISA does not read (an LR scheduler's "initial_lr", ...) are kept in the groups, not validated."""
    layout = find_layout(opt._model, opt.model_layout.stack)
    known = [{k: v for k, v in g.items() if k == "params" or k in groups.GROUP_KEYS} for g in given]
    named, members = opt._plan(layout, known)
    opt.param_groups = groups.group_dicts(group0, given, members, [p for _, p in named])
    return layout, named, members


def _restore(opt, sd, frozen, layout, named, members) -> None:
    """Build on the planned groups, load `sd` (the new params' formats are theirs: nothing saved to convert),
    and freeze again what the user had frozen."""
    opt._build(layout, named, members)
    lisa = sd["lisa"]
    have = len(lisa.get("formats", []))
    here = [[f.moments, f.master_weights] for f in (opt._packed_state.formats[k] for k in opt._packed_state.part_of)]
    lisa["formats"] = list(lisa.get("formats", here[:have]))[:have] + here[have:]
    opt.load_state_dict(sd)
    for i, n in enumerate(opt._names):
        if n in frozen:
            blocks = [b for b, ix in enumerate(opt._block_params) if i in ix]
            if blocks:
                opt._slots.user_frozen.add(i)
            if not blocks or blocks[0] in opt._slot_of:
                opt._params[i].requires_grad_(False)


def _frozen_by_user(opt) -> set[str]:
    """Names of trained params the user froze since construction (release() would unfreeze them)."""
    always = set(range(len(opt._params))) - {i for ix in opt._block_params for i in ix}
    return ({opt._names[i] for i in opt._slots.user_frozen}
            | {opt._names[i] for i in always if not opt._params[i].requires_grad}
            | {opt._names[i] for b in opt._slot_of for i in opt._block_params[b] if not opt._params[i].requires_grad})
