"""The update of one FusedLISA step: the per-segment hyperparameter tables and the kernel launches.

One launch per partition (state format, packing.PackedState), over every active param of it (the params
and grads where they live, the state packed: kernels/contract.py); a
partition whose segments' groups differ in betas or eps (the kernel takes those as launch scalars) is
launched once per distinct (beta1, beta2, eps). lr and weight_decay are per segment, in the table.
"""
from __future__ import annotations

import math

import torch

from . import hparams, kernels
from .kernels._tables import to_device
from .kernels.contract import N_COLS, Segments


def amp_scaling(opt):
    """(overflow, grad_scale) from torch.amp.GradScaler, which hands `opt.found_inf` / `opt.grad_scale` over
    (FusedLISA._step_supports_amp_scaling): overflow skips the step entirely (one host sync, only in this AMP
    mode); grad_scale, a 1-element fp32 tensor on the optimizer's device, the kernel divides the grads by."""
    found_inf = getattr(opt, "found_inf", None)
    if found_inf is not None and found_inf.item():
        return True, None
    grad_scale = getattr(opt, "grad_scale", None)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=opt.device, dtype=torch.float32).reshape(1)
    return False, grad_scale


def hparam_table(groups, steps, enabled, ids=None, hp=None) -> torch.Tensor:
    """[S, 4] float64 host table (one row per segment: its param group, its AdamW step count, whether it
    steps); bias corrections computed once per distinct (group, step) in Python floats, exactly as torch's
    AdamW computes them. With `ids` (param index per segment): [S, 6], adding COL_PARAM_ID and COL_STEP
    (lean state). Columns: kernels/contract.py. hp: {id(group): hparams.HParams} (None: read here)."""
    rows, memo = [], {}
    hp = _read(hp, [g for g, on in zip(groups, enabled) if on])
    for g, s, on in zip(groups, steps, enabled):
        if not on:
            rows.append((0.0, 1.0, 1.0, 0.0))
            continue
        key = (id(g), s)
        if key not in memo:
            lr, beta1, beta2, _, weight_decay = hp[id(g)]
            memo[key] = (lr / (1 - beta1 ** s), 1 - lr * weight_decay, math.sqrt(1 - beta2 ** s), 1.0)
        rows.append(memo[key])
    table = torch.tensor(rows, dtype=torch.float64).reshape(-1, N_COLS)
    if ids is None:
        return table
    extra = torch.tensor([list(ids), list(steps)], dtype=torch.float64).T.reshape(-1, 2)
    return torch.cat([table, extra], dim=1)


def _read(hp, groups) -> dict:
    """`hp` ({id(group): hparams.HParams}, what step() read) with any of `groups` it lacks read now (Python
    floats: np.float32 and tensor values, hparams.py)."""
    missing = [g for g in groups if hp is None or id(g) not in hp]
    return hp if not missing else {**(hp or {}), **hparams.read_all(missing)}


def _launches(segments: Segments, groups, hp=None):
    """[(beta1, beta2, eps, segments, positions)]: one entry when every segment's group shares betas and eps
    (positions None), else one per distinct triple with a cached sub-Segments and its positions (a tuple,
    and a cached index tensor per device for the grad_sumsq scatter: no host->device copy per step)."""
    hp = _read(hp, groups)
    keys = [(hp[id(g)].beta1, hp[id(g)].beta2, hp[id(g)].eps) for g in groups]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == 1:
        return [(*distinct[0], segments, None)]
    out = []
    for key in distinct:
        pos = tuple(j for j, k in enumerate(keys) if k == key)
        sub = segments.cache.get(("subset", pos))
        if sub is None:
            sub = segments.cache[("subset", pos)] = Segments([segments.bounds[j] for j in pos])
        out.append((*key, sub, pos))
    return out


def _positions(segments: Segments, pos, device) -> torch.Tensor:
    """int64 index tensor of `pos` on `device`, cached in `segments.cache` (built once per active set)."""
    key = ("positions", pos, str(device))
    if key not in segments.cache:
        segments.cache[key] = to_device(torch.tensor(pos, dtype=torch.int64), device)
    return segments.cache[key]


def adamw_step(state, parts, lists, steps, groups_of, *, backend: str, grad_scale=None, seed: int = 0,
               grad_sumsq=None, hp=None) -> None:
    """AdamW over every partition of `state` (packing.PackedState), in place.

    parts: per partition (Segments, param indices) of the active params; lists: per partition (params,
    grads, lowps, enabled) as binding.ParamBinding.collect returns them; steps: every param's step count
    (already advanced); groups_of: every param's param group (dict with lr, betas, eps, weight_decay);
    grad_sumsq: fp32 [total segments] device accumulator in partition order (grad_norm sampler), or None;
    hp: the groups' hyperparameters as step() read them once ({id(group): hparams.HParams},
    groups.check_unchanged), None to read them here."""
    start = 0
    for bufs, fmt, (segments, seg_params), (params, grads, lowps, on) in zip(state.bufs, state.formats, parts, lists):
        n = len(seg_params)
        sumsq, start = (None if grad_sumsq is None else grad_sumsq[start:start + n]), start + n
        if n == 0:
            continue
        groups = [groups_of[i] for i in seg_params]
        table = hparam_table(groups, [steps[i] for i in seg_params], on, ids=seg_params if fmt.lean else None,
                             hp=hp)
        lean = dict(bufs.state_kwargs(), seed=seed)
        for beta1, beta2, eps, segs, pos in _launches(segments, groups, hp):
            pick = (lambda xs: xs) if pos is None else (lambda xs: None if xs is None else [xs[j] for j in pos])
            sub = sumsq if pos is None or sumsq is None else torch.zeros(len(pos), dtype=sumsq.dtype, device=sumsq.device)
            kernels.adamw_segments_(
                pick(params), pick(grads), bufs.exp_avg, bufs.exp_avg_sq, segs,
                table if pos is None else table[list(pos)], beta1=beta1, beta2=beta2, eps=eps, lowps=pick(lowps),
                grad_scale=grad_scale, backend=backend, check=False, grad_sumsq=sub, **lean)
            if pos is not None and sumsq is not None:
                sumsq.index_add_(0, _positions(segments, pos, sumsq.device), sub)
