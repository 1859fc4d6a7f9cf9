"""Rebuilding a FusedLISA's packed state after construction, each time through its own state_dict (so
every parameter's optimizer state, the schedule and the sampler carry over exactly):

* `follow`: the model moved, was converted or resized (`model.to(...)`, `.half()`,
  `resize_token_embeddings`), or a param got new storage of the same kind (`p.data = t`, which needs no
  rebuild: the masters re-read it);
* `add_param_group`: parameters join;
* `rebind`: a wrapper swapped the Parameter objects before the first step (accelerate's FSDP2 prepare).
"""
from __future__ import annotations

import logging

import torch

from . import checkpoint, groups, kernels
from .binding import SUPPORTED_DTYPES, local
from .kernels import quant
from .layers import find_layout

logger = logging.getLogger("lisa_fused")


def _uniform_target(names, params) -> tuple[torch.device, torch.dtype]:
    """The one device and dtype every param of `params` now has. RuntimeError naming a param that differs,
    or a dtype the kernels do not support, and the fix."""
    first = local(params[0])
    dev, dt = first.device, first.dtype
    for name, p in zip(names, params):
        t = local(p)
        if t.device != dev or t.dtype != dt:
            raise RuntimeError(
                f"FusedLISA: parameter {name!r} is {t.dtype} on {t.device} but {names[0]!r} is {dt} on {dev}: a "
                "partial model.to() left the trained parameters on mixed devices/dtypes; move the whole model to "
                "one device and dtype (or opt.release(), convert, and build a new FusedLISA)")
    if dt not in SUPPORTED_DTYPES:
        raise RuntimeError(
            f"FusedLISA: parameter {names[0]!r} was converted to {dt}, which the fused AdamW kernels do not support "
            f"({', '.join(map(str, SUPPORTED_DTYPES))}): convert the model back (e.g. model.float()), or "
            "opt.release() and build a new optimizer for it")
    return dev, dt


def check_parked(opt) -> None:
    """Before a step that switches: every trained param (inactive ones too) is still the model's and matches
    the state's device, dtype and shape, else `follow` (which raises for a partial move)."""
    replaced = opt._binding.replaced(opt._model, range(len(opt._params)))
    if replaced or opt._binding.mismatch(opt.device, opt.param_dtype) is not None:
        follow(opt, replaced)


@torch.no_grad()
def follow(opt, replaced: dict | None = None) -> None:
    """The model's params got new storage: same device, dtype and shapes (`p.data = t`, a re-load): the
    binding takes the new addresses and the fp32 masters re-read the params. Otherwise (moved, converted,
    resized) the packed state and paged store are rebuilt where the params are, through state_dict: moments
    carry over; fp32 values the optimizer holds survive a conversion (checkpoint.py's cross-dtype rules:
    a bf16 model's masters become an fp32 model's params; an fp32 model's params become a bf16 model's
    masters); a resized param keeps the state of its overlapping elements and new elements start at zero
    moments, as a fresh AdamW would (its master: the param's value). RuntimeError naming the param where
    following is impossible (mixed devices/dtypes, a dtype the kernels lack, master-free state across a
    dtype change, a change of rank); nothing changes before it. `replaced`: {param index: the Parameter the
    model now has under its name} (binding.replaced), which takes the old one's place and state."""
    replaced = replaced or {}
    params = [replaced.get(i, p) for i, p in enumerate(opt._params)]
    dev, dt = _uniform_target(opt._names, params)
    resized = [i for i, p in enumerate(params) if tuple(local(p).shape) != tuple(opt._shapes[i])]
    if (dev, dt) == (opt.device, opt.param_dtype) and not resized and not replaced:
        opt._binding.refresh()
        logger.info("FusedLISA: parameters got new storage (same device, dtype and shape); the optimizer uses it")
        return
    lean_masters = sorted({f.master_weights for f in opt._packed_state.formats} - {"fp32"})
    if dt != opt.param_dtype and lean_masters:
        raise RuntimeError(
            f"FusedLISA: the model was converted from {opt.param_dtype} to {dt}, but master_weights="
            f"{lean_masters[0]!r} keeps no fp32 master to convert from: convert the model back, or "
            "take state_dict(), release(), and build a new FusedLISA for the converted model")
    for i in resized:
        old, new = opt._shapes[i], tuple(local(params[i]).shape)
        if len(old) != len(new):
            raise RuntimeError(
                f"FusedLISA: parameter {opt._names[i]!r} changed from shape {tuple(old)} to {new} (another rank): "
                "FusedLISA follows a resize that keeps the number of dimensions (resize_token_embeddings, a "
                "pruned head); take state_dict(), release(), and build a new FusedLISA for this model")
    kernels.resolve_backend(opt._backend_request, dev)  # raises for a backend the new device lacks
    was = (opt.device, opt.param_dtype)
    sd = checkpoint.state_dict(opt)
    for i in resized:
        _resize_state(sd, i, params[i])
    if replaced:
        replace_params(opt.model_layout, {id(opt._params[i]): q for i, q in replaced.items()})
        logger.warning("FusedLISA: the model replaced %s by new Parameter objects; the optimizer trains the new ones "
                       "with the old ones' state", ", ".join(repr(opt._names[i]) for i in sorted(replaced)[:3]))
    _rebuild(opt, sd, params)
    if resized:
        logger.warning("FusedLISA: %s resized (%s); the optimizer followed: overlapping elements keep their state, new "
                       "ones start from zero moments", ", ".join(repr(opt._names[i]) for i in resized[:3]),
                       ", ".join(f"{tuple(sd['lisa']['params'][i][1])}" for i in resized[:3]))
    if (dev, dt) != was:
        log = logger.warning if dt != was[1] else logger.info
        log("FusedLISA: the model's params moved (%s on %s -> %s on %s); the optimizer moved its state (backend %r)",
            was[1], was[0], dt, dev, opt.backend)


def _resize_state(sd, i: int, param) -> None:
    """Param i of state_dict `sd` resized to `param`'s shape: every per-element row keeps its overlap with the
    old shape (leading slices of each dimension), new elements get zero moments / compensation and the
    param's own value as master; quantized moments are converted to fp32 first (the load requantizes them)."""
    shape = tuple(local(param).shape)
    lisa = sd["lisa"]
    old = tuple(lisa["params"][i][1])
    lisa["params"][i] = (lisa["params"][i][0], tuple(shape))
    entry = sd["state"].get(i)
    if entry is None:
        return
    fmt = lisa["formats"][i]
    if fmt[0] in quant.BLOCK:
        entry = checkpoint.convert_moments(entry, fmt[0], "fp32", old)
        lisa["formats"][i] = ["fp32", fmt[1]]
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(old, shape))
    value = local(param).detach().float().cpu()
    out = {"step": entry["step"]}
    for key, row in entry.items():
        if key == "step":
            continue
        row = row.reshape(old)
        grown = value.clone().to(row.dtype) if key == "master_param" else torch.zeros(shape, dtype=row.dtype)
        grown[overlap] = row[overlap]
        out[key] = grown
    sd["state"][i] = out


def _named_members(opt, params):
    """(layout, named, members) for `params` (one per opt._params, same order) on the current model."""
    layout = opt.model_layout
    named = list(layout.always) + [np for blk in layout.blocks for np in blk]
    index = {id(p): j for j, (_, p) in enumerate(named)}
    members, start = [], 0
    for n in opt._group_sizes:
        members.append([index[id(q)] for q in params[start:start + n]])
        start += n
    return layout, named, members


def _rebuild(opt, sd, params) -> None:
    """Build fresh packed state and store for `params` (opt._params or their replacements, same order) with
    the same groups, active blocks, generator, sampler and user-frozen params, and load `sd` into it."""
    from . import validation

    active, flags, frozen = opt.active_layers, opt._binding.user_flags(), set(opt._slots.user_frozen)
    opt._store.release()
    opt._binding.release()
    layout, named, members = _named_members(opt, params)
    opt.device, opt.param_dtype = validation.device_and_dtype([local(p) for p in params])
    opt.backend = kernels.resolve_backend(opt._backend_request, opt.device)
    for g, idx in zip(opt.param_groups, members):
        dict.__setitem__(g, "params", [named[j][1] for j in idx])  # (not the watched assignment)
    opt._build(layout, named, members, active=active, user_flags=flags, user_frozen=frozen)
    if sd is not None:
        checkpoint.load_state_dict(opt, sd, quiet=True)


def replace_params(layout, mapping: dict) -> None:
    """Point the ModelLayout at new Parameter objects (mapping: id(old) -> new; others stay), in place: the samplers
    that read weights hold this layout object."""
    swap = lambda named: tuple((n, mapping.get(id(p), p)) for n, p in named)  # noqa: E731
    object.__setattr__(layout, "always", swap(layout.always))
    object.__setattr__(layout, "blocks", tuple(swap(blk) for blk in layout.blocks))


@torch.no_grad()
def rebind(opt, new_params) -> None:
    """Start over on new Parameter objects for the same parameters, in the same order (`new_params`, one per
    opt._params): accelerate's FSDP2 prepare swaps in their DTensor shards. The state is rebuilt over them
    with the same groups, active blocks, generator, sampler and user-frozen params; engines.follow_params
    allows it only before the first step (no optimizer state to carry over)."""
    replace_params(opt.model_layout, {id(p): q for p, q in zip(opt._params, new_params)})
    _rebuild(opt, None, list(new_params))
    logger.info("FusedLISA: followed a parameter switch (%d params, now %s on %s)", len(new_params),
                opt.param_dtype, opt.device)


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
