"""torch.distributed.checkpoint scenarios of tests/_engines_worker.py (see there): FusedLISA saved with
get_optimizer_state_dict + dcp.save in the middle of an interval and resumed into a fresh model and
optimizer, under FSDP2 (sharded, and the full state dict that the Trainer's FULL_STATE_DICT path uses)
and under DDP."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import _dist_worker as W
from _dist_worker import changed, flat, snapshot

OUT_DIR = None  # set by _engines_worker.main


def _ddp_model(seed):
    return DDP(W.MLPStack(W.WIDTH, W.N_LAYERS, seed=seed), find_unused_parameters=True)


def _dcp_run(rank, world, name, sampler, steps=8, save_at=3, build=W._fsdp2_model):
    """`build(seed)` (FSDP2 or DDP) + FusedLISA: an uninterrupted run, and one saved through
    torch.distributed.checkpoint in the middle of an interval and resumed into a fresh model and optimizer
    (other init and seed; the model's state loaded after the optimizer exists, as the Trainer does)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    data = W.batches(steps)
    ref = build(0)
    ref_opt = W.make_opt(ref, rank, sampler=sampler)
    ref_seq = W.train(ref, ref_opt, data, rank, world)

    model = build(0)
    opt = W.make_opt(model, rank, sampler=sampler)
    before = snapshot(model)
    W.train(model, opt, data[:save_at], rank, world)
    osd = get_optimizer_state_dict(model, opt)
    saved_step = opt._global_step  # (a zero-grad step inside DCP's _init_optim_state would show here)
    path = f"{OUT_DIR}/dcp_{name}"
    dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=path)
    rows = osd["param_groups"][0]["lisa"]["state"]

    fresh = build(1)
    opt2 = W.make_opt(fresh, rank + 5, sampler=sampler)
    target = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
    template_step = opt2._global_step
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(fresh, target["model"])
    set_optimizer_state_dict(fresh, opt2, target["optim"])
    loaded = {"global_step": opt2._global_step, "active": opt2.active_layers, "saved_active": opt.active_layers}
    seq = W.train(fresh, opt2, data[save_at:], rank, world)
    return {"ref_seq": ref_seq, "ref_params": flat(ref), "seq": ref_seq[:save_at] + seq, "params": flat(fresh),
            "changed": changed(fresh, before), "saved_step": saved_step, "template_step": template_step,
            "state_keys": list(osd["state"]), "rows_dtensor": all(isinstance(r["exp_avg"], DTensor) for r in rows.values()),
            "rows_for_all": len(rows) == len(opt._params), **loaded}


def scenario_dcp_fsdp2(rank, world):
    return _dcp_run(rank, world, "fsdp2", "uniform")


def scenario_dcp_fsdp2_grad_norm(rank, world):
    return _dcp_run(rank, world, "fsdp2_grad_norm", "grad_norm")




def scenario_dcp_ddp(rank, world):
    return _dcp_run(rank, world, "ddp", "uniform", build=_ddp_model)


def scenario_dcp_fsdp2_full_state_dict(rank, world, steps=8, save_at=3):
    """What the Trainer's FSDP2 FULL_STATE_DICT path does with the optimizer (accelerate's
    save_fsdp_optimizer / load_fsdp_optimizer): a full, CPU-offloaded optimizer state dict saved by rank 0
    with torch.save, loaded by rank 0 with weights_only=True and broadcast (broadcast_from_rank0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    data = W.batches(steps)
    ref = W._fsdp2_model(seed=0)
    ref_seq = W.train(ref, W.make_opt(ref, rank), data, rank, world)
    model = W._fsdp2_model(seed=0)
    opt = W.make_opt(model, rank)
    before = snapshot(model)
    W.train(model, opt, data[:save_at], rank, world)
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = f"{OUT_DIR}/full_optimizer.bin"
    if rank == 0:
        torch.save(osd, path)
    dist.barrier()
    fresh = W._fsdp2_model(seed=1)
    opt2 = W.make_opt(fresh, rank + 5)
    with torch.no_grad():  # the model's shards, loaded after the optimizer exists
        for p, q in zip(fresh.parameters(), model.parameters()):
            p.to_local().copy_(q.to_local())
    full = torch.load(path, weights_only=True) if rank == 0 else {}
    set_optimizer_state_dict(fresh, opt2, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    seq = W.train(fresh, opt2, data[save_at:], rank, world)
    return {"ref_seq": ref_seq, "ref_params": flat(ref), "seq": ref_seq[:save_at] + seq, "params": flat(fresh),
            "changed": changed(fresh, before), "global_step": opt2._global_step}
