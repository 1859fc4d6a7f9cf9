"""FusedLISA as DeepSpeed ZeRO 1/2/3's client optimizer (issue 25), 2 CPU processes on gloo:

    torchrun --standalone --nproc_per_node=2 tests/_zero_fused.py OUT_DIR

Per scenario: MLPStack (5 blocks), FusedLISA(n_active_layers=2, switch_every=2) drawing a fixed schedule
through a callable sampler (blocks 0 and 4 never active, block 3 leaves and comes back), 8 steps on a
learnable target, a DeepSpeed checkpoint at step 3 (mid-interval) resumed in a fresh model, optimizer and
engine to step 8. Writes OUT_DIR/rank{r}.pt: {scenario: results}; tests/test_zero_fused.py checks them.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

from helpers import MLPStack
from lisa_fused import FusedLISA

WIDTH, N_LAYERS, STEPS, LR, WD, BATCH = 37, 5, 8, 1e-2, 0.01, 8
SCHEDULE = [(2, 3), (1, 2), (1, 3), (2, 3)]
SWITCH_EVERY, SAVE_AT = 2, 3


def batches(steps=STEPS, batch=BATCH, seed=123):
    """A learnable target: y = tanh(x @ w) for a fixed w, fresh x per step."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 3, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


class Schedule:
    """A callable sampler: the blocks of SCHEDULE's interval global_step // SWITCH_EVERY (0 at construction)."""

    __name__ = "fixed_schedule"

    def __init__(self):
        self.opt = None

    def __call__(self, n_blocks, n_active, generator):
        step = 0 if self.opt is None else self.opt._global_step
        return list(SCHEDULE[min(step // SWITCH_EVERY, len(SCHEDULE) - 1)])


def watch_masters(opt):
    """At every switch: the whole fp32 master (gathered over the ranks) of each param trained after it
    equals the one it had when last trained before (params trained across the switch, and blocks that
    come back: their pages). Returns the list of per-switch results it appends to."""
    from lisa_fused.zero import ZeroSession, gather_slice

    z, last, ok = opt._zero, {}, []

    def gather_all():
        owned, out = z.session.owned(), {}
        for j, p in enumerate(opt._params):
            if p.requires_grad:
                numel = ZeroSession.numel(p)
                pieces = {owned[id(p)][0].range: owned[id(p)][1]} if id(p) in owned else {}
                out[opt._names[j]] = gather_slice(numel, pieces, (0, numel), like=z.session.flats()[0])
        return out

    original = z.switch

    def switch(*args, **kwargs):
        last.update(gather_all())
        original(*args, **kwargs)
        now = gather_all()
        ok.append(sorted(n for n in now if n in last and not torch.equal(now[n], last[n])))

    z.switch = switch
    return ok


# name -> (FusedLISA keywords, zero_optimization keys) of the scenarios that change one thing
VARIANTS = {"zero2_groups": ({"param_groups": [{"params": ["*.bias"], "weight_decay": 0.0}]}, {}),
            "zero3_subgroups": ({}, {"sub_group_size": 500})}


def build(stage, rank, world, dtype, inactive_moments="host", uniform=False, variant=None):
    """uniform: FusedLISA's own uniform draw with seed=rank (every rank must take rank 0's generator);
    variant: a VARIANTS key."""
    kw, zero_cfg = VARIANTS.get(variant, ({}, {}))
    import deepspeed

    model = MLPStack(WIDTH, N_LAYERS, seed=rank).to(dtype)  # the engine broadcasts rank 0's weights
    sampler = "uniform" if uniform else Schedule()
    opt = FusedLISA(model, lr=LR, weight_decay=WD, n_active_layers=2, switch_every=SWITCH_EVERY, sampler=sampler,
                    inactive_moments=inactive_moments, layers="blocks", seed=rank if uniform else 0, **kw)
    if not uniform:
        sampler.opt = opt
    accum = 2 if variant == "zero2_accum" else 1
    config = {"train_micro_batch_size_per_gpu": BATCH // world // accum, "gradient_accumulation_steps": accum,
              "zero_optimization": {"stage": stage, **zero_cfg}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return model, opt, engine


def full_params(model):
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in model.parameters() if hasattr(p, "ds_id")]):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def train(engine, opt, data, rank, world, dtype, save=None):
    """One optimizer step per batch: this rank's share, in engine.gradient_accumulation_steps() micro-batches."""
    seq, losses = [], []
    accum = engine.gradient_accumulation_steps()
    for step, (x, y) in data:
        seq.append(opt.active_layers)
        n = x.shape[0] // world // accum
        for k in range(accum):
            part = slice((rank * accum + k) * n, (rank * accum + k + 1) * n)
            loss = torch.nn.functional.mse_loss(engine(x[part].to(dtype)).float(), y[part])
            engine.backward(loss)
            engine.step()  # (DeepSpeed steps the optimizer at the accumulation boundary only)
        losses.append(loss.item())
        if save is not None and step + 1 == SAVE_AT:
            engine.save_checkpoint(save, tag="mid")
    return seq, losses


def scenario(stage, rank, world, dtype, out_dir, name, inactive_moments="host", uniform=False):
    model, opt, engine = build(stage, rank, world, dtype, inactive_moments, uniform, name)
    zero_id = id(engine.optimizer)
    masters = watch_masters(opt)
    before = full_params(model)
    data = list(enumerate(batches()))
    seq, losses = train(engine, opt, data, rank, world, dtype, save=f"{out_dir}/{name}")
    res = {"seq": seq, "losses": losses, "params": full_params(model), "before": before,
           "same_zero_object": id(engine.optimizer) == zero_id, "stage": opt._zero.session.stage,
           "steps": dict(zip(opt._names, opt._steps)), "memory": opt.memory_stats(),
           "partition_elements": sum(f.numel() for f in opt._zero.session.flats()), "moved": list(opt._zero.moved),
           "backend": opt.backend, "masters_lost": masters, "zero_groups": len(opt._zero.session.flats())}
    try:
        opt.add_param_group({"params": [model.blocks[0][0].weight]})
        res["add_param_group"] = "no error"
    except RuntimeError as err:
        res["add_param_group"] = str(err)
    engine.destroy()
    model, opt, engine = build(stage, rank, world, dtype, inactive_moments, uniform, name)
    engine.load_checkpoint(f"{out_dir}/{name}", tag="mid")
    res["resumed_active"], res["resumed_step"] = opt.active_layers, opt._global_step
    rseq, _ = train(engine, opt, data[SAVE_AT:], rank, world, dtype)
    res["resumed_seq"], res["resumed_params"] = rseq, full_params(model)
    engine.destroy()
    return res


LLAMA_SCHEDULE = [(1, 2), (0, 1), (0, 2), (1, 2)]  # 4 layers: 3 never active


class LlamaSchedule(Schedule):
    __name__ = "llama_schedule"

    def __call__(self, n_blocks, n_active, generator):
        step = 0 if self.opt is None else self.opt._global_step
        return list(LLAMA_SCHEDULE[min(step // SWITCH_EVERY, len(LLAMA_SCHEDULE) - 1)])


def scenario_trainer(rank, world, out_dir, stage=3):
    """TrainingArguments(deepspeed=ZeRO-`stage` + bf16, gradient_checkpointing=True) with FusedLISAFactory through
    optimizer_cls_and_kwargs (LlamaFactory PR #3103's combination); a DeepSpeed checkpoint at step 3,
    resumed by a fresh Trainer (resume_from_checkpoint) to step 8."""
    import transformers
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from helpers import lm_batch, tiny_llama
    from lisa_fused.hf import FusedLISAFactory, LISACallback, unwrap_optimizer

    transformers.logging.set_verbosity_error()
    data = [{"input_ids": x, "labels": x} for x in torch.cat([lm_batch(s, batch=4) for s in range(8)])]

    def run(max_steps, resume=None):
        sampler, seq = LlamaSchedule(), []

        class Record(TrainerCallback):
            def on_step_begin(self, args, state, control, optimizer=None, **kw):
                sampler.opt = unwrap_optimizer(optimizer)
                seq.append(sampler.opt.active_layers)

        args = TrainingArguments(
            output_dir=f"{out_dir}/trainer_z{stage}", report_to=[], max_steps=max_steps,
            per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0,
            save_strategy="steps", save_steps=SAVE_AT, lr_scheduler_type="constant",
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, max_grad_norm=0.0,
            deepspeed={"zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"},
                       "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                       "gradient_clipping": "auto", "steps_per_print": 10 ** 9})
        # (CPU only: TrainingArguments refuses bf16=True without use_cpu, and use_cpu turns DeepSpeed off;
        # so bf16 is switched on after the checks, in the args and in the DeepSpeed config they filled)
        args.bf16 = True
        args.hf_deepspeed_config.config["bf16"]["enabled"] = True
        args.hf_deepspeed_config._dtype = torch.bfloat16
        model = tiny_llama(4, seed=rank, dtype=torch.bfloat16)
        lisa = {"n_active_layers": 2, "switch_every": SWITCH_EVERY, "sampler": sampler}
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Record(), LISACallback()],
                          optimizer_cls_and_kwargs=(FusedLISAFactory, lisa))
        trainer.train(resume_from_checkpoint=resume)
        opt = unwrap_optimizer(trainer.optimizer)
        out = {"params": full_params(trainer.model_wrapped.module), "active": opt.active_layers, "seq": seq,
               "global_step": opt._global_step, "stage": opt._zero.session.stage,
               "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
               "logged_active": [tuple(e["lisa_active_layers"]) for e in trainer.state.log_history
                                 if "lisa_active_layers" in e]}
        trainer.model_wrapped.destroy()
        AcceleratorState._reset_state(True)
        return out

    before = full_params(tiny_llama(4, seed=0, dtype=torch.bfloat16))
    full = run(8)
    resumed = run(8, resume=f"{out_dir}/trainer_z{stage}/checkpoint-{SAVE_AT}")
    return {"full": full, "resumed": resumed, "before": before}


def scenario_refused(rank, world):
    """What FusedLISA refuses under ZeRO that test_integration_engines does not cover: {name: message}."""
    import deepspeed

    out = {}
    def by_rank(n_blocks, n_active, generator):  # (a callable sampler that wrongly depends on the rank)
        return [rank, rank + 1]

    for name, stage, kw in [("zero3_weight_norm", 3, {"sampler": "weight_norm"}),
                            ("zero2_grad_norm", 2, {"sampler": "grad_norm"}),
                            ("zero2_rank_dependent_draw", 2, {"sampler": by_rank})]:
        model = MLPStack(WIDTH, N_LAYERS, seed=0)
        opt = FusedLISA(model, n_active_layers=2, switch_every=SWITCH_EVERY, layers="blocks", **kw)
        config = {"train_micro_batch_size_per_gpu": BATCH // world, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        try:
            deepspeed.initialize(model=model, optimizer=opt, config=config)
            out[name] = "no error"
        except RuntimeError as err:
            out[name] = str(err)
        opt.release()
    return out


def main(out_dir):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    only = os.environ.get("ZERO_FUSED_ONLY")  # (a scenario name, to run one by hand)
    for name, stage, dtype, policy in [("zero2_uniform", 2, torch.float32, "device"),
                                       ("zero2_groups", 2, torch.float32, "host"),
                                       ("zero2_accum", 2, torch.float32, "host"),
                                       ("zero3_subgroups", 3, torch.float32, "host"),("zero1", 1, torch.float32, "host"), ("zero2", 2, torch.float32, "host"),
                                       ("zero3", 3, torch.float32, "host"), ("zero2_drop", 2, torch.float32, "drop"),
                                       ("zero1_bf16", 1, torch.bfloat16, "host"),
                                       ("zero2_bf16", 2, torch.bfloat16, "host"),
                                       ("zero3_bf16", 3, torch.bfloat16, "host")]:
        if only and name != only:
            continue
        try:
            results[name] = scenario(stage, rank, world, dtype, out_dir, name, policy, uniform=name.endswith("uniform"))
        except Exception:  # (recorded: the test shows it; the other stages still run)
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank} {name}:\n{results[name]['error']}", flush=True)
        dist.barrier()
    if not only or only == "refused":
        results["refused"] = scenario_refused(rank, world)
        dist.barrier()
    for stage in (1, 2, 3):
        name = f"trainer_zero{stage}"
        if only and only != name:
            continue
        try:
            results[name] = scenario_trainer(rank, world, out_dir, stage)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank} {name}:\n{results[name]['error']}", flush=True)
        dist.barrier()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
