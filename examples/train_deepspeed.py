"""Fine-tune a tiny Llama with FusedLISA under DeepSpeed ZeRO stage 0-3, directly or through the Trainer.

    torchrun --nproc_per_node=2 examples/train_deepspeed.py                    # deepspeed.initialize, ZeRO 0
    torchrun --nproc_per_node=2 examples/train_deepspeed.py --engine trainer   # TrainingArguments(deepspeed=...)
    torchrun --nproc_per_node=2 examples/train_deepspeed.py --dtype bf16       # bf16 model, fp32 masters in FusedLISA
    torchrun --nproc_per_node=2 examples/train_deepspeed.py --zero-stage 3     # ZeRO 1, 2 or 3

ZeRO stage 0 keeps FusedLISA as the engine's optimizer: DeepSpeed all-reduces the gradients of the
blocks trainable at each backward and calls FusedLISA.step(). Under ZeRO 1-3 FusedLISA is ZeRO's client:
ZeRO's partitions are rebuilt for the trainable set at every switch and FusedLISA steps ZeRO's fp32
partition slices (docs/integration.md, DeepSpeed); this script runs ZeRO 1-3 with an fp32 model (a bf16
model there needs DeepSpeed's bf16: {enabled: true}: tests/test_zero_fused.py). ZeRO 0 with DeepSpeed's
fp16/bf16 is refused (give FusedLISA a bf16 model and leave DeepSpeed's bf16 off). On CPU DeepSpeed uses
its CPU accelerator over gloo (and JIT-builds a small shared-memory op once, ~1 min, cached in
~/.cache/torch_extensions).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_loop import DTYPES, text_windows, tiny_llama  # noqa: E402

from lisa_fused import FusedLISA  # noqa: E402
from lisa_fused.hf import FusedLISAFactory, LISACallback, unwrap_optimizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["deepspeed", "trainer"], default="deepspeed")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's (DeepSpeed's fp16/bf16 stay off)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--n-active", type=int, default=1)
    p.add_argument("--switch-every", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ds_config(args):
    return {"zero_optimization": {"stage": args.zero_stage}, "train_micro_batch_size_per_gpu": args.batch,
            "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
            # (what the Trainer sets for any client optimizer; without it ZeRO 1-3 stop at DeepSpeed's own
            # "untested ZeRO Optimizer" assertion before FusedLISA sees them)
            "zero_allow_untested_optimizer": True}


def run_engine(args, rank, world):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    model = tiny_llama(args.layers, args.hidden, args.seq, DTYPES[args.dtype], args.seed + rank)
    opt = FusedLISA(model, lr=args.lr, weight_decay=0.01, n_active_layers=args.n_active,
                    switch_every=args.switch_every, seed=args.seed + rank)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(args))  # broadcasts rank 0's weights
    before = full_params(model)
    data = text_windows(args.seq, args.seed).to(engine.device)
    seen, losses = set(), []
    for step in range(args.steps):
        seen.update(opt.active_layers)
        start = (step * world + rank) * args.batch % (len(data) - args.batch)
        x = data[start:start + args.batch]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return model, opt, before, seen, losses


def full_params(model):
    """{name: the whole param} (ZeRO-3 holds each rank's partition only: gathered)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in model.parameters() if hasattr(p, "ds_id")]):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_trainer(args, rank, world, out):
    from transformers import Trainer, TrainingArguments

    config = {**ds_config(args), "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto"}
    # (no use_cpu: accelerate 1.16 selects DeepSpeed only when not asked for the CPU; on a CPU-only machine
    # DeepSpeed then runs on its CPU accelerator)
    targs = TrainingArguments(output_dir=out, report_to=[], per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=args.lr, weight_decay=0.01,
                              logging_steps=args.switch_every,
                              seed=args.seed, disable_tqdm=True, save_strategy="no", deepspeed=config)
    model = tiny_llama(args.layers, args.hidden, args.seq, DTYPES[args.dtype], args.seed + rank)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = set()

    class Seen(LISACallback):
        def on_step_begin(self, a, state, control, optimizer=None, **kw):
            seen.update(unwrap_optimizer(optimizer).active_layers)
            return super().on_step_begin(a, state, control, optimizer=optimizer, **kw)

    lisa = dict(lr=args.lr, weight_decay=0.01, n_active_layers=args.n_active, switch_every=args.switch_every,
                seed=args.seed + rank)
    trainer = Trainer(model=model, args=targs, train_dataset=[{"input_ids": x, "labels": x} for x in
                                                              text_windows(args.seq, args.seed)],
                      optimizer_cls_and_kwargs=(FusedLISAFactory, lisa), callbacks=[Seen()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return model, unwrap_optimizer(trainer.optimizer), before, seen, losses


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.engine == "deepspeed":
                model, opt, before, seen, losses = run_engine(args, rank, world)
            else:
                model, opt, before, seen, losses = run_trainer(args, rank, world, tmp)
    except RuntimeError as err:
        if "FusedLISA cannot run under" not in str(err):
            raise
        if rank == 0:
            print(f"refused: {err}")
        return {"refused": str(err)}
    after = full_params(model)
    changed = {n: not torch.equal(p, before[n]) for n, p in after.items()}
    if rank == 0:  # (rank 0's `before` is what the engine broadcast; the other ranks started elsewhere)
        print(f"{args.engine}, ZeRO stage {args.zero_stage}: {opt!r}")
        print(f"losses {[round(x, 3) for x in losses[:2]]} ... {[round(x, 3) for x in losses[-2:]]}")
        print(f"{sum(changed.values())} of {len(changed)} params changed; blocks trained: {sorted(seen)}; "
              f"optimizer device bytes: {opt.memory_stats()['device_bytes']}")
    return {"changed": changed, "ever_active": seen, "losses": losses, "global_step": opt._global_step,
            "params": after}


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # (gloo aborts at exit while a group is alive)
