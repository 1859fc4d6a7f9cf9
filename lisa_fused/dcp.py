"""FusedLISA's state_dict in a layout that torch.distributed.checkpoint keeps whole.

torch.distributed.checkpoint (DCP) reshapes an optimizer state_dict in three ways that would lose
FusedLISA's state (torch 2.13, torch/distributed/checkpoint/state_dict.py):

1. `_get_optim_state_dict` keeps only "state" and "param_groups": a top-level "lisa" section is dropped.
2. `_split_optim_state_dict` (at load) keeps per-param "state" only for params with requires_grad=True
   in the loading optimizer, and with strict=True demands state for each of them: FusedLISA's inactive
   blocks are frozen, so their paged moments would be dropped, and blocks active in the loader but never
   trained in the saved run would make the load fail. With an empty "state" it returns the dict as it is.
3. `dcp.save` writes a plain (non-DTensor) tensor once for all ranks (it dedups same-named items as
   replicated): per-rank values (FSDP2 shards) must be DTensors, and DCP loads into the keys of the
   loader's own state_dict, so the key set cannot depend on which blocks trained.

So, whenever torch.distributed is initialized, `FusedLISA.state_dict()` returns

    {"state": {},
     "param_groups": [{lr, betas, eps, weight_decay, "params": [...], "lisa": {
         "layout": LAYOUT, "meta": JSON of the "lisa" section's plain values (+ world_size, sharded),
         "generator": uint8 tensor (the same on every rank),
         "state": {param name: {"step", "exp_avg", "exp_avg_sq"[, scales, "compensation", "master_param"]}}
                  for EVERY trained param (zeros and step 0 where there is no state), element-wise rows as
                  DTensors shaped like the param for FSDP2 params, so DCP reshards them,
         ["grad_meter_sumsq": tensor [S]]   grad_norm: the interval's sums (DDP, one process; FSDP2: unused)
         ["per_rank_of_world{W}": {"grad_meter_sumsq": DTensor [W, S]}]   grad_norm under FSDP2: per rank
     }}]}

and `load_state_dict` takes it back (`from_dcp_layout`), as well as the plain layout (checkpoint.py).
A save on W ranks loads on any world size (DCP reshards the DTensor rows; "consolidated": load in one
process with a process group of world size 1), except under FSDP2 with the grad_norm sampler (its
in-progress sums are per rank: ValueError naming both world sizes, or, for an FSDP2 loader, DCP's
"Missing key ... per_rank_of_world{W'}") and with
moments "8bit"/"4bit" under FSDP2 (codes of per-rank shards: that case keeps the plain per-rank layout,
which torch.save/torch.load per rank handles and which DCP cannot hold).
Not kept: the "loss_feedback" sampler's statistics of the interval in progress are saved from one rank
(ranks that feed different losses differ until the next draw takes rank 0's).
"""
from __future__ import annotations

import json
import sys

import torch

from . import checkpoint
from .binding import local
from .kernels import quant

LAYOUT = "fused_lisa_dcp_v1"


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def called_by_dcp() -> bool:
    """True when FusedLISA.state_dict() runs inside torch.distributed.checkpoint (get_optimizer_state_dict,
    get_state_dict, ...), which keeps only "state" and "param_groups" of what it returns."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


def wanted(opt) -> bool:
    """The DCP layout is used under torch.distributed or inside torch.distributed.checkpoint's state_dict
    helpers (also in one process without a process group), except for quantized moments of FSDP2 shards:
    those keep the plain per-rank layout, and a DCP helper asking for them raises (it would drop the
    LISA section)."""
    quantized = any(f.moments in quant.BLOCK for f in opt._packed_state.formats)
    by_dcp = called_by_dcp()
    if by_dcp and opt._sharded and quantized:
        raise RuntimeError(
            "FusedLISA: torch.distributed.checkpoint cannot hold the 8bit/4bit moments of FSDP2 shards (codes and "
            "block scales of per-rank shards do not reshard), and it would drop FusedLISA's schedule: save "
            "opt.state_dict() per rank with torch.save(opt.state_dict(), f'opt-rank{rank}.pt') instead, or use "
            "moments='fp32'/'bf16' under FSDP2")
    return (distributed() or by_dcp) and not (opt._sharded and quantized)


def is_dcp_layout(sd) -> bool:
    try:
        return "lisa" not in sd and sd["param_groups"][0]["lisa"]["layout"] == LAYOUT
    except (KeyError, IndexError, TypeError):
        return False


def _sharded_like(t: torch.Tensor, p):
    """A per-rank row of FSDP2 param p as a DTensor with p's mesh, placements and global shape."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t.view(local(p).shape), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def _per_rank(t: torch.Tensor, p):
    """This rank's `t` as row `rank` of a [world, *t.shape] DTensor over p's (1-D) mesh."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"FusedLISA's DCP layout holds per-rank grad_norm sums on a 1-D device mesh only, "
                                  f"got a {mesh.ndim}-D mesh; use sampler='uniform' or 'weight_norm' here")
    world = mesh.size()
    return DTensor.from_local(t.unsqueeze(0), mesh, [Shard(0)], run_check=False, shape=(world, *t.shape),
                              stride=(t.numel(), *t.stride()))


def to_dcp_layout(opt, sd: dict) -> dict:
    """The plain state_dict `sd` of `opt` (checkpoint.state_dict) in the DCP layout (module docstring)."""
    if not wanted(opt):
        return sd
    lisa = dict(sd["lisa"])
    generator = lisa.pop("generator")
    meter = lisa.pop("grad_meter")
    sharded = opt._sharded
    rows = {}
    for i, (name, p) in enumerate(zip(opt._names, opt._params)):
        entry = sd["state"].get(i)
        if entry is None:  # no state: zeros of the format's shapes and dtypes (DCP needs a fixed key set)
            bufs = opt._packed_state.buffers_of(i)
            flat, keys = bufs.moments in quant.BLOCK, checkpoint.row_keys(bufs)
            shape = local(p).shape
            views = bufs.rows(0, shape.numel())
            entry = {"step": torch.tensor(0.0)}
            entry.update({k: torch.zeros(v.shape, dtype=v.dtype).view(-1 if flat and k in checkpoint.MOMENT_KEYS
                                                                       else shape)
                          for k, v in zip(keys, views)})
        if sharded:
            entry = {k: v if k == "step" else _sharded_like(v, p) for k, v in entry.items()}
        rows[name] = entry
    world = torch.distributed.get_world_size() if distributed() else 1
    meta = {**lisa, "world_size": world, "sharded": sharded,
            "grad_meter": None if meter is None else {k: v for k, v in meter.items() if k != "sumsq"}}
    section = {"layout": LAYOUT, "meta": json.dumps(meta), "generator": generator, "state": rows}
    if meter is not None:  # DDP, one process: sums of the (all-reduced) full gradients, the same on every rank
        section["grad_meter_sumsq"] = meter["sumsq"]  # (FSDP2: one rank's partial sums, kept for the key set only)
    if meter is not None and sharded:  # each rank's sums of its own shards' squares
        mesh_param = next(p for p in opt._params if hasattr(p, "device_mesh"))
        section[f"per_rank_of_world{world}"] = {"grad_meter_sumsq": _per_rank(meter["sumsq"], mesh_param)}
    groups = [dict(g) for g in sd["param_groups"]]
    groups[0]["lisa"] = section
    return {"state": {}, "param_groups": groups}


def from_dcp_layout(opt, sd: dict) -> dict:
    """The DCP layout back to the plain one checkpoint.load_state_dict takes. A param saved with step 0
    had no state. ValueError if the section is damaged."""
    groups = [dict(g) for g in sd["param_groups"]]
    section = groups[0].pop("lisa")
    meta = json.loads(section["meta"])
    saved_world = meta.pop("world_size")
    sharded = meta.pop("sharded")
    meter = meta.pop("grad_meter")
    if meter is not None and not sharded:
        meter = {**meter, "sumsq": section["grad_meter_sumsq"]}
    elif meter is not None:
        per_rank = section.get(f"per_rank_of_world{saved_world}")
        if per_rank is None:  # (a loader with FSDP2 on another world size stops earlier, in dcp.load)
            world = torch.distributed.get_world_size() if distributed() else 1
            raise ValueError(f"FusedLISA state_dict saved on {saved_world} ranks with the grad_norm sampler holds its "
                             f"in-progress gradient sums per rank; it cannot be loaded on {world} ranks")
        sumsq = per_rank["grad_meter_sumsq"]
        if hasattr(sumsq, "to_local"):
            sumsq = sumsq.to_local()[0]
        meter = {**meter, "sumsq": sumsq}
    index = {n: i for i, n in enumerate(opt._names)}
    state = {}
    for name, entry in section["state"].items():
        if float(entry["step"]) == 0 or name not in index:  # (a renamed model fails validation on "params")
            continue
        state[index[name]] = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in entry.items()}
    lisa = {**meta, "params": [(n, tuple(s)) for n, s in meta["params"]], "generator": section["generator"],
            "grad_meter": meter}
    return {"state": state, "param_groups": groups, "lisa": lisa}
