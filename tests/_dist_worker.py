"""Worker for tests/test_integration_distributed.py, run by torchrun with 2 CPU processes (gloo).

    torchrun --standalone --nproc_per_node=2 tests/_dist_worker.py OUT_DIR

Runs every scenario in one process group (a launch costs far more than a scenario) and writes
OUT_DIR/rank{r}.pt: {scenario: result dict}. Each rank builds its model from a different seed and gives
FusedLISA a different seed, so anything not synchronised shows up as a difference between ranks.
"""
from __future__ import annotations

import sys
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lisa_fused import FusedLISA
from lisa_fused.checkpoint import state_dict as plain_state_dict  # (under torch.distributed, opt.state_dict()
from helpers import MLPStack                                     # has the DCP layout: lisa_fused/dcp.py)

# Shared with the single-process reference in the test.
WIDTH, N_LAYERS, N_ACTIVE, K, STEPS, LR, BATCH = 37, 5, 2, 2, 6, 1e-2, 8


def batches(steps=STEPS, batch=BATCH, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(steps)]


def train(model, opt, data, rank, world, observe=False):
    """Each rank takes its contiguous share of every batch; returns the active set before each step.
    observe: hand each rank's own loss (they differ) to opt.observe_loss."""
    seq = []
    for x, y in data:
        n = x.shape[0] // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        seq.append(opt.active_layers)
        loss = torch.nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        if observe:
            opt.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    return seq


def flat(model):
    """All params as one fp32 vector (full tensors for FSDP2's DTensors)."""
    parts = []
    for p in model.parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(p.detach().reshape(-1).float())
    return torch.cat(parts)


def snapshot(model):
    """{name: full fp32 copy} of every param (full tensors for FSDP2's DTensors)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
            for n, p in model.named_parameters()}


def changed(model, before):
    """{name: whether the param differs from `before`}: the test checks that exactly the params of blocks
    that were ever active (and the always-trained ones) moved."""
    now = snapshot(model)
    return {n: not torch.equal(now[n], before[n]) for n in before}


def make_opt(model, rank, **kw):
    """Rank r passes seed=r: FusedLISA takes rank 0's sampler state, so all ranks draw seed 0's blocks."""
    return FusedLISA(model, lr=LR, weight_decay=0.01, n_active_layers=N_ACTIVE, switch_every=K, seed=rank,
                     backend="torch", **kw)


def scenario_ddp(rank, world, bucket_view=False):
    model = MLPStack(WIDTH, N_LAYERS, seed=rank)  # DDP broadcasts rank 0's params
    ddp = DDP(model, find_unused_parameters=True, gradient_as_bucket_view=bucket_view)  # before FusedLISA
    opt = make_opt(ddp, rank)
    before = snapshot(model)
    seq = train(ddp, opt, batches(), rank, world)
    return {"seq": seq, "params": flat(model), "active": opt.active_layers, "changed": changed(model, before)}


def scenario_ddp_no_sync(rank, world):
    """Gradient accumulation under DDP: each step two micro-batches per rank, the first backward inside
    ddp.no_sync() (no all-reduce), the second outside; the grads accumulate in FusedLISA's packed views and
    the second backward all-reduces the sum. Each micro loss is halved, so a step equals one over the batch."""
    model = MLPStack(WIDTH, N_LAYERS, seed=rank)  # DDP broadcasts rank 0's params
    ddp = DDP(model, find_unused_parameters=True)
    opt = make_opt(ddp, rank)
    before, seq = snapshot(model), []
    for x, y in batches():
        n = x.shape[0] // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        seq.append(opt.active_layers)
        with ddp.no_sync():
            (torch.nn.functional.mse_loss(ddp(xs[:n // 2]), ys[:n // 2]) / 2).backward()
        (torch.nn.functional.mse_loss(ddp(xs[n // 2:]), ys[n // 2:]) / 2).backward()
        opt.step()
        opt.zero_grad()
    return {"seq": seq, "params": flat(model), "changed": changed(model, before)}


def scenario_ddp_optimizer_first(rank, world):
    """The wrong order: FusedLISA freezes the inactive blocks before DDP is built, so DDP never registers
    them; when they become active their gradients are not all-reduced and the ranks drift apart."""
    model = MLPStack(WIDTH, N_LAYERS, seed=0)
    opt = make_opt(model, rank)
    ddp = DDP(model, find_unused_parameters=True)
    train(ddp, opt, batches(), rank, world)
    return {"params": flat(model)}


def scenario_ddp_bad_settings(rank, world):
    out = {}
    for name, kw in {"find_unused_false": dict(find_unused_parameters=False),
                     "static_graph": dict(find_unused_parameters=True, static_graph=True)}.items():
        ddp = DDP(MLPStack(WIDTH, N_LAYERS, seed=0), **kw)
        try:
            make_opt(ddp, rank)
            out[name] = "no error"
        except ValueError as err:
            out[name] = str(err)
    return out


def scenario_generator_sync(rank, world):
    """Different seeds per rank agree at construction (rank 0's state) and after loading a state_dict whose
    sampler state differs per rank (rank 0's again)."""
    model = MLPStack(WIDTH, N_LAYERS, seed=0)
    opt = make_opt(model, rank)
    at_construction = opt._generator.get_state()
    other = MLPStack(WIDTH, N_LAYERS, seed=0)
    donor = FusedLISA(other, lr=LR, n_active_layers=N_ACTIVE, switch_every=K, seed=0, backend="torch")
    sd = plain_state_dict(donor)
    sd["lisa"]["generator"] = torch.Generator().manual_seed(1000 + rank).get_state()  # differs per rank
    opt.load_state_dict(sd)
    after_load = opt._generator.get_state()
    draws = [opt._draw() for _ in range(3)]
    return {"at_construction": at_construction, "after_load": after_load, "draws": draws,
            "rank0_after_load": torch.Generator().manual_seed(1000).get_state()}


def _fsdp2_model(seed):
    from torch.distributed.fsdp import fully_shard

    model = MLPStack(WIDTH, N_LAYERS, seed=seed)  # FSDP2 does not broadcast: same init on every rank
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def scenario_fsdp2(rank, world):
    """fully_shard per block and at the root; FusedLISA binds the DTensor params by copy. Three steps, then
    a resume in the middle of an interval into a fresh sharded model (shards copied over, as a checkpoint
    load would) with a fresh optimizer (other seed) from the first one's per-rank state_dict."""
    model = _fsdp2_model(seed=0)
    opt = make_opt(model, rank)
    data = batches()
    before = snapshot(model)
    seq = train(model, opt, data[:3], rank, world)
    sd = opt.state_dict()  # the DCP layout (DTensor rows), saved and loaded per rank here
    local_shapes = {i: tuple(e["exp_avg"].shape) for i, e in plain_state_dict(opt)["state"].items()}
    resumed = _fsdp2_model(seed=1)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), model.parameters()):
            p.to_local().copy_(q.to_local())
    opt2 = make_opt(resumed, rank + 5)
    opt2.load_state_dict(sd)
    seq += train(resumed, opt2, data[3:], rank, world)
    # Frozen blocks get no gradient under FSDP2 either (it copies requires_grad to the unsharded params).
    torch.nn.functional.mse_loss(resumed(data[0][0]), data[0][1]).backward()
    inactive_grads = [p.grad is not None for b in range(N_LAYERS) if b not in opt2.active_layers
                      for p in resumed.blocks[b].parameters()]
    active_grads = [p.grad is not None for b in opt2.active_layers for p in resumed.blocks[b].parameters()]
    opt2.zero_grad()
    return {"seq": seq, "params": flat(resumed), "copy_mode": opt2._binding.copy_mode,
            "changed": changed(resumed, before),
            "inactive_grads": inactive_grads, "active_grads": active_grads,
            "state_shapes": local_shapes,
            "local_shapes": [tuple(p.to_local().shape) for p in opt2._params],
            "global_shapes": [tuple(p.shape) for p in opt2._params]}


def scenario_fsdp2_weight_norm(rank, world):
    """The weight_norm sampler reads block norms from the shards (one all-reduce per param)."""
    model = _fsdp2_model(seed=0)
    opt = make_opt(model, rank, sampler="weight_norm")
    before = snapshot(model)
    return {"seq": train(model, opt, batches(), rank, world), "params": flat(model), "changed": changed(model, before)}


def scenario_ddp_adaptive(rank, world, sampler):
    """grad_norm / loss_feedback under DDP, model init and seed different per rank, each rank observing
    its own loss: draw() takes rank 0's sampler state, so every rank draws the same blocks."""
    model = MLPStack(WIDTH, N_LAYERS, seed=rank)
    ddp = DDP(model, find_unused_parameters=True)
    opt = make_opt(ddp, rank, sampler=sampler)
    before = snapshot(model)
    seq = train(ddp, opt, batches(steps=4 * STEPS), rank, world, observe=True)
    return {"seq": seq, "params": flat(model), "changed": changed(model, before),
            "sampler": plain_state_dict(opt)["lisa"]["sampler"]}


FROZEN_BLOCKS = (1, 3)  # frozen by the user on every rank: never drawn


def frozen_mlp(seed):
    model = MLPStack(WIDTH, N_LAYERS, seed=seed)
    for b in FROZEN_BLOCKS:
        model.blocks[b].requires_grad_(False)
    return model


def scenario_ddp_frozen_blocks(rank, world):
    """Blocks the user froze (the same on every rank) are never drawn, and every rank draws the same
    blocks: uniform, and grad_norm with per-rank seeds and model inits."""
    out = {}
    for sampler in ("uniform", "grad_norm"):
        model = frozen_mlp(seed=rank)
        ddp = DDP(model, find_unused_parameters=True)
        opt = make_opt(ddp, rank, sampler=sampler)
        before = snapshot(model)
        seq = train(ddp, opt, batches(steps=4 * STEPS), rank, world)
        out[sampler] = {"seq": seq, "params": flat(model), "changed": changed(model, before)}
    return out


def scenario_frozen_blocks_differ(rank, world):
    """Rank 1 froze another block than rank 0: the ranks would draw from different blocks, so every rank
    raises at construction (no hang: the check is one all_gather on every rank)."""
    model = MLPStack(WIDTH, N_LAYERS, seed=0)
    model.blocks[1 + rank].requires_grad_(False)
    try:
        make_opt(model, rank)
        return {"message": "no error"}
    except ValueError as err:
        return {"message": str(err)}


def scenario_fsdp2_grad_norm(rank, world):
    """grad_norm under FSDP2: each rank's kernel sums its shards' squares, all-reduced at the switch, so
    the scores are the full gradients' (the single-process run's)."""
    model = _fsdp2_model(seed=0)
    opt = make_opt(model, rank, sampler="grad_norm")
    before = snapshot(model)
    seq = train(model, opt, batches(steps=4 * STEPS), rank, world)
    return {"seq": seq, "params": flat(model), "changed": changed(model, before),
            "sampler": plain_state_dict(opt)["lisa"]["sampler"]}


def scenario_fsdp2_mixed_precision(rank, world):
    """MixedPrecisionPolicy(param_dtype=bf16): FSDP2 fixes each group's gradient dtypes at its lazy init from
    the params trainable *then*, so a block frozen at that point fails when it becomes active (bf16 grad
    assigned to an fp32 param). The recipe: one no_grad forward before FusedLISA, then reshard()."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = MLPStack(WIDTH, N_LAYERS, seed=0)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    with torch.no_grad():
        model(torch.zeros(1, 3))  # lazy init while every block is trainable
    model.reshard()  # the root keeps its params unsharded after forward: back to the DTensor shards
    opt = make_opt(model, rank)
    before, named_before = flat(model), snapshot(model)
    seq = train(model, opt, batches(), rank, world)
    return {"seq": seq, "params": flat(model), "moved": (flat(model) - before).abs().max().item(),
            "changed": changed(model, named_before)}


def scenario_trainer_ddp(rank, world):
    """HF Trainer under torchrun: the Trainer wraps the model in DDP after FusedLISA froze the inactive
    blocks; LISACallback makes DDP register them all, so blocks activated later are all-reduced too."""
    import transformers
    from transformers import Trainer, TrainingArguments

    from lisa_fused.hf import LISACallback
    from helpers import tiny_llama

    transformers.logging.set_verbosity_error()
    args = TrainingArguments(output_dir=f"{OUT_DIR}/trainer", use_cpu=True, report_to=[], max_steps=6,
                             per_device_train_batch_size=2, learning_rate=LR, logging_steps=100,
                             save_strategy="no", disable_tqdm=True, ddp_find_unused_parameters=True, seed=0)
    model = tiny_llama(3, seed=rank)  # DDP broadcasts rank 0's weights
    opt = FusedLISA(model, lr=LR, n_active_layers=1, switch_every=2, seed=rank, backend="torch")
    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 97, (48, 10), generator=g)]
    seq = []

    class Record(LISACallback):
        def on_step_begin(self, args, state, control, **kw):
            seq.append(opt.active_layers)
            return super().on_step_begin(args, state, control, **kw)

    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[Record()])
    before = snapshot(model)  # on rank 0: the weights the Trainer's DDP wrapper broadcasts
    ptr = model.lm_head.weight.data_ptr()
    trainer.train()
    return {"seq": seq, "params": flat(model), "wrapped": type(trainer.model_wrapped).__name__,
            "changed": changed(model, before), "storage_replaced": model.lm_head.weight.data_ptr() != ptr,
            "device": str(opt.device)}


SCENARIOS = {
    "ddp": scenario_ddp,
    "ddp_bucket_view": lambda r, w: scenario_ddp(r, w, bucket_view=True),
    "ddp_no_sync": scenario_ddp_no_sync,
    "ddp_optimizer_first": scenario_ddp_optimizer_first,
    "ddp_bad_settings": scenario_ddp_bad_settings,
    "generator_sync": scenario_generator_sync,
    "fsdp2": scenario_fsdp2,
    "fsdp2_weight_norm": scenario_fsdp2_weight_norm,
    "ddp_grad_norm": lambda r, w: scenario_ddp_adaptive(r, w, "grad_norm"),
    "ddp_loss_feedback": lambda r, w: scenario_ddp_adaptive(r, w, "loss_feedback"),
    "fsdp2_grad_norm": scenario_fsdp2_grad_norm,
    "ddp_frozen_blocks": scenario_ddp_frozen_blocks,
    "frozen_blocks_differ": scenario_frozen_blocks_differ,
    "fsdp2_mixed_precision": scenario_fsdp2_mixed_precision,
    "trainer_ddp": scenario_trainer_ddp,
}


OUT_DIR = None


def main(out_dir):
    global OUT_DIR
    OUT_DIR = out_dir
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    results = {}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = fn(rank, world)
        except Exception:  # recorded for the test to show; the other scenarios still run
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
