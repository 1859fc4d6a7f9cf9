"""Fine-tune a tiny Llama with FusedLISA under FSDP2, as accelerate and the Hugging Face Trainer run it.

    torchrun --nproc_per_node=2 examples/train_fsdp2.py                    # the Trainer, fsdp_version 2
    torchrun --nproc_per_node=2 examples/train_fsdp2.py --engine accelerate --save-at 15 --output-dir out
    torchrun --nproc_per_node=2 examples/train_fsdp2.py --engine accelerate --resume out/step15
    torchrun --nproc_per_node=2 examples/train_fsdp2.py --save-at 15 --output-dir out   # Trainer checkpoints
    torchrun --nproc_per_node=2 examples/train_fsdp2.py --output-dir out --resume out/checkpoint-15

Both engines build FusedLISA before the model is sharded (the Trainer through FusedLISAFactory, which it
calls in create_optimizer); accelerate's prepare then shards the model with fully_shard and switches the
optimizer's parameters to the DTensor shards, which FusedLISA follows. Checkpoints go through
torch.distributed.checkpoint (get/set_optimizer_state_dict). On CPU (gloo) accelerate 1.16 ignores FSDP,
so the script puts the accelerator in the FSDP2 state a GPU launch has (examples/cpu_fsdp2.py); it
prints whether the parameters really are DTensor shards.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_fsdp2 import force_fsdp2_on_cpu, fsdp2_trainer_class  # noqa: E402
from train_loop import text_windows, tiny_llama  # noqa: E402

from lisa_fused import FusedLISA  # noqa: E402
from lisa_fused.hf import FusedLISAFactory, LISACallback, unwrap_optimizer  # noqa: E402

BLOCK = "LlamaDecoderLayer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["trainer", "accelerate"], default="trainer")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--n-active", type=int, default=1, help="blocks trained at a time (LISA's gamma)")
    p.add_argument("--switch-every", type=int, default=10, help="optimizer steps between draws (LISA's K)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-at", type=int, default=0, help="checkpoint at this step (needs --output-dir)")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.save_at and not args.output_dir:
        p.error("--save-at needs --output-dir (the default output is a temporary directory deleted at exit)")
    return args


def fsdp2_options(args):
    return dict(fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[BLOCK],
                reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")


def lisa_kwargs(args, rank):
    return dict(lr=args.lr, weight_decay=0.01, n_active_layers=args.n_active, switch_every=args.switch_every,
                seed=args.seed + rank)  # (any seed per rank: FusedLISA takes rank 0's)


def run_trainer(args, out):
    from transformers import TrainingArguments

    cpu = not torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=out, use_cpu=cpu, report_to=[], per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="constant", logging_steps=args.switch_every, seed=args.seed,
        disable_tqdm=True, save_strategy="steps" if args.save_at else "no", save_steps=args.save_at or 500,
        fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": [BLOCK],
                                        "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})
    from transformers import Trainer

    trainer_cls = fsdp2_trainer_class() if cpu else Trainer
    model = tiny_llama(args.layers, args.hidden, args.seq, torch.float32, args.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": x, "labels": x} for x in text_windows(args.seq, args.seed)]
    seen = set()

    class Seen(LISACallback):
        def on_step_begin(self, a, state, control, optimizer=None, **kw):
            seen.update(unwrap_optimizer(optimizer).active_layers)
            return super().on_step_begin(a, state, control, optimizer=optimizer, **kw)

    trainer = trainer_cls(model=model, args=targs, train_dataset=data, callbacks=[Seen()],
                          optimizer_cls_and_kwargs=(FusedLISAFactory, lisa_kwargs(args, targs.process_index)))
    trainer.train(resume_from_checkpoint=args.resume)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer.model, unwrap_optimizer(trainer.optimizer), before, seen, losses


def run_accelerate(args, out):
    import torch.distributed.checkpoint as dcp
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    opts = fsdp2_options(args)
    opts.pop("state_dict_type")
    plugin = FullyShardedDataParallelPlugin(**opts)
    cpu = not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, fsdp_plugin=plugin)
    if cpu:
        force_fsdp2_on_cpu(acc, plugin)
    model = tiny_llama(args.layers, args.hidden, args.seq, torch.float32, args.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FusedLISA(model, **lisa_kwargs(args, acc.process_index))
    model, wrapped = acc.prepare(model, opt)  # shards the model; FusedLISA follows the switch to DTensors
    if args.resume:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=args.resume)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    data = text_windows(args.seq, args.seed).to(acc.device)
    per_step, rank, world = args.batch, acc.process_index, acc.num_processes
    seen, losses = set(), []
    for step in range(opt._global_step, args.steps):  # (a resumed run continues where it was saved)
        seen.update(opt.active_layers)
        start = (step * world + rank) * per_step % (len(data) - per_step)
        x = data[start:start + per_step]
        loss = model(input_ids=x, labels=x).loss
        acc.backward(loss)
        wrapped.step()
        wrapped.zero_grad()
        losses.append(loss.item())
        if args.save_at and step + 1 == args.save_at:
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=os.path.join(out, f"step{step + 1}"))
    return model, opt, before, seen, losses


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        run = run_trainer if args.engine == "trainer" else run_accelerate
        model, opt, before, seen, losses = run(args, args.output_dir or tmp)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    changed = {n: not torch.equal(full[n], before[n]) for n in before}
    sharded = all(hasattr(p, "full_tensor") for p in model.parameters())
    if torch.distributed.get_rank() == 0:
        print(f"{args.engine}: parameters are FSDP2 DTensor shards: {sharded}; {opt!r}")
        print(f"losses {[round(x, 3) for x in losses[:2]]} ... {[round(x, 3) for x in losses[-2:]]}")
        print(f"{sum(changed.values())} of {len(changed)} params changed; blocks trained: {sorted(seen)}; "
              f"optimizer device bytes on this rank: {opt.memory_stats()['device_bytes']}")
    return {"changed": changed, "ever_active": seen, "sharded": sharded, "losses": losses,
            "params": full, "global_step": opt._global_step, "active_layers": opt.active_layers}


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()  # (gloo aborts at exit while a group is alive)
