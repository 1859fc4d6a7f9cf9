"""Worker for tests/test_integration_engines.py, run by torchrun with 2 CPU processes (gloo).

    torchrun --standalone --nproc_per_node=2 tests/_engines_worker.py OUT_DIR

Every scenario runs in one process group and writes OUT_DIR/rank{r}.pt: {scenario: result}. The engines
are the ones users launch: accelerate's FSDP2 prepare (alone and inside the Hugging Face Trainer),
DeepSpeed's engine, and torch.distributed.checkpoint; scenarios reuse tests/_dist_worker.py's model,
data and checks. OUT_DIR/dcp_* keep the DCP checkpoints for the test's one-process (consolidated) loads.

accelerate 1.16 selects FSDP only for GPU-like distributed types, so on CPU/gloo examples/cpu_fsdp2.py
sets the state a GPU launch would have; everything after that (fsdp2_prepare_model, the parameter switch,
the Trainer's FSDP2 train and checkpoint paths) is accelerate's and transformers' own code.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from _dist_worker import changed, flat, local_ptrs, snapshot
from helpers import tiny_llama
from lisa_fused import FusedLISA
from lisa_fused.hf import FusedLISAFactory, LISACallback, unwrap_optimizer
from _engines_common import BATCH, LR, N_LAYERS, SEQ, expected_device_bytes, lm_batches

sys.path.append(str(Path(__file__).resolve().parent.parent / "examples"))
from cpu_fsdp2 import force_fsdp2_on_cpu, fsdp2_trainer_class  # noqa: E402  (accelerate 1.16 ignores FSDP on CPU)

OUT_DIR = None


def scenario_accelerate_fsdp2(rank, world):
    """Accelerator(fsdp_plugin=FSDP2) + prepare(model, FusedLISA): accelerate shards after the optimizer
    exists and switches its params to DTensors; FusedLISA follows at that assignment."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.tensor import DTensor

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            cpu_ram_efficient_loading=True, reshard_after_forward=True)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    force_fsdp2_on_cpu(acc, plugin)
    model = tiny_llama(N_LAYERS, seed=0)
    opt = FusedLISA(model, lr=LR, n_active_layers=1, switch_every=2, seed=rank, backend="torch")
    before = snapshot(model)
    bytes_unsharded = opt.memory_stats()["device_bytes"]
    model, wrapped = acc.prepare(model, opt)
    fl = unwrap_optimizer(wrapped)
    ptrs = local_ptrs(fl._params)
    data = lm_batches(6, world)
    seq, mem = [], []
    for step in range(6):
        seq.append(fl.active_layers)
        x = data[step, rank]
        acc.backward(model(input_ids=x, labels=x).loss)
        wrapped.step()
        wrapped.zero_grad()
        mem.append(fl.memory_stats()["device_bytes"])
    out = {"seq": seq, "params": flat(model), "changed": changed(model, before), "mem": mem,
           "expected_bytes": expected_device_bytes(fl), "bytes_unsharded": bytes_unsharded,
           "dtensor": all(isinstance(p, DTensor) for p in model.parameters()), "in_place": local_ptrs(fl._params) == ptrs,
           "same_params": {id(p) for p in fl._params} <= {id(p) for p in model.parameters()}}
    AcceleratorState._reset_state(True)
    return out


def scenario_accelerate_fsdp2_mixed_precision_refused(rank, world):
    """mixed_precision="bf16" with FSDP2: refused at accelerate's parameter switch (FSDP2 would fail in
    backward at the first block FusedLISA activates after its lazy init)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    acc = Accelerator(cpu=True, fsdp_plugin=plugin, mixed_precision="bf16")
    force_fsdp2_on_cpu(acc, plugin)
    plugin.set_mixed_precision("bf16")  # (what AcceleratorState does with the plugin on GPUs)
    model = tiny_llama(N_LAYERS, seed=0)
    opt = FusedLISA(model, lr=LR, n_active_layers=1, switch_every=2, backend="torch")
    try:
        acc.prepare(model, opt)
        text = "no error"
    except RuntimeError as err:
        text = str(err)
    AcceleratorState._reset_state(True)
    return {"error_text": text}


def lm_reference(steps, world, seed=0):
    """One process, FusedLISA over the ranks' batches concatenated (what FSDP2 and ZeRO-0 average to)."""
    model = tiny_llama(N_LAYERS, seed=seed)
    opt = FusedLISA(model, lr=LR, n_active_layers=1, switch_every=2, seed=0, backend="torch")
    data = lm_batches(steps, world)
    seq = []
    for step in range(steps):
        seq.append(opt.active_layers)
        x = data[step].reshape(world * BATCH, SEQ)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return {"seq": seq, "params": flat(model)}


def scenario_lm_reference(rank, world):
    return lm_reference(6, world)


def _trainer_run(rank, world, out, steps=6, save_steps=0, resume=None, optimizers=None):
    import transformers
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments

    transformers.logging.set_verbosity_error()
    args = TrainingArguments(
        output_dir=out, use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=LR, logging_steps=100, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, max_grad_norm=1.0,
        fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                        "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})
    model = tiny_llama(N_LAYERS, seed=0)
    data = [{"input_ids": x, "labels": x} for x in lm_batches(steps, world).reshape(-1, SEQ)]
    seq, mem, ptrs = [], [], []

    class Record(LISACallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            if not ptrs:  # the params the optimizer steps, as the Trainer prepared them
                ptrs.append(local_ptrs(unwrap_optimizer(optimizer)._params))
            seq.append(unwrap_optimizer(optimizer).active_layers)
            return super().on_step_begin(args, state, control, optimizer=optimizer, **kw)

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            mem.append(unwrap_optimizer(optimizer).memory_stats()["device_bytes"])
            return super().on_step_end(args, state, control, optimizer=optimizer, **kw)

    kwargs = dict(optimizers=optimizers) if optimizers is not None else dict(
        optimizer_cls_and_kwargs=(FusedLISAFactory, dict(lr=LR, n_active_layers=1, switch_every=2, seed=rank,
                                                          backend="torch")))
    before = snapshot(model)
    trainer = fsdp2_trainer_class()(model=model, args=args, train_dataset=data, callbacks=[Record()], **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    fl = unwrap_optimizer(trainer.optimizer)
    result = {"seq": seq, "mem": mem, "params": flat(trainer.model), "changed": changed(trainer.model, before),
              "expected_bytes": expected_device_bytes(fl), "in_place": ptrs == [local_ptrs(fl._params)],
              "active": fl.active_layers, "global_step": fl._global_step}
    AcceleratorState._reset_state(True)
    return result


def scenario_trainer_fsdp2(rank, world):
    """TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2, ...}) with FusedLISAFactory: six
    steps spanning switches, then a run that checkpoints at step 3 (accelerate's FSDP2 save: DCP's
    get_optimizer_state_dict, full state dict) and one resumed from it (set_optimizer_state_dict)."""
    out = f"{OUT_DIR}/trainer_fsdp2"
    full = _trainer_run(rank, world, out + "/full", save_steps=3)
    resumed = _trainer_run(rank, world, out + "/full", resume=out + "/full/checkpoint-3")
    return {"full": full, "resumed": resumed}


def scenario_trainer_fsdp2_optimizers_refused(rank, world):
    """The Trainer itself refuses optimizers= under FSDP (its message names the fix)."""
    model = tiny_llama(N_LAYERS, seed=0)
    opt = FusedLISA(model, lr=LR, n_active_layers=1, switch_every=2, backend="torch")
    try:
        _trainer_run(rank, world, f"{OUT_DIR}/trainer_refused", optimizers=(opt, None))
    except RuntimeError as err:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        return {"error_text": str(err)}
    return {"error_text": "no error"}


EXAMPLE_ARGS = ["--layers", "3", "--hidden", "32", "--seq", "16", "--batch", "2", "--steps", "6", "--switch-every", "2"]


def _example(name, argv):
    """examples/NAME's main(argv) in this process group (the examples run under torchrun as they are)."""
    import runpy

    from accelerate.state import AcceleratorState

    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples" / name))["main"]
    try:
        out = main(argv)
    finally:
        AcceleratorState._reset_state(True)
    return {k: v for k, v in out.items() if k != "params"} | (
        {"params": torch.cat([t.reshape(-1).float() for t in out["params"].values()])} if "params" in out else {})


def scenario_example_fsdp2(rank, world):
    trainer = _example("train_fsdp2.py", EXAMPLE_ARGS)
    path = f"{OUT_DIR}/example_fsdp2"
    full = _example("train_fsdp2.py", EXAMPLE_ARGS + ["--engine", "accelerate", "--save-at", "3", "--output-dir", path])
    resumed = _example("train_fsdp2.py", EXAMPLE_ARGS + ["--engine", "accelerate", "--resume", f"{path}/step3"])
    return {"trainer": trainer, "full": full, "resumed": resumed}


def scenario_example_deepspeed(rank, world):
    return {"engine": _example("train_deepspeed.py", EXAMPLE_ARGS),
            "trainer": _example("train_deepspeed.py", EXAMPLE_ARGS + ["--engine", "trainer"]),
            "zero3": _example("train_deepspeed.py", EXAMPLE_ARGS + ["--zero-stage", "3"])}


import _engines_dcp as C  # noqa: E402  (the scenarios of the other two modules)
import _engines_deepspeed as D  # noqa: E402

SCENARIOS = {  # the FSDP2 Trainer runs come before any DeepSpeed Trainer: in one process, a later FSDP
    # Trainer still finds the DeepSpeed plugin in accelerate's state ("--fsdp together with --deepspeed")
    "accelerate_fsdp2": scenario_accelerate_fsdp2,
    "accelerate_fsdp2_mixed_precision_refused": scenario_accelerate_fsdp2_mixed_precision_refused,
    "lm_reference": scenario_lm_reference,
    "trainer_fsdp2": scenario_trainer_fsdp2,
    "trainer_fsdp2_optimizers_refused": scenario_trainer_fsdp2_optimizers_refused,
    "example_fsdp2": scenario_example_fsdp2,
    "dcp_fsdp2": C.scenario_dcp_fsdp2,
    "dcp_fsdp2_grad_norm": C.scenario_dcp_fsdp2_grad_norm,
    "dcp_ddp": C.scenario_dcp_ddp,
    "dcp_fsdp2_full_state_dict": C.scenario_dcp_fsdp2_full_state_dict,
    "deepspeed_zero0": D.scenario_deepspeed_zero0,
    "deepspeed_zero0_bf16_model": lambda r, w: D.scenario_deepspeed_zero0(r, w, torch.bfloat16),
    "deepspeed_refused": D.scenario_deepspeed_refused,
    "trainer_deepspeed_zero0": D.scenario_trainer_deepspeed_zero0,
    "trainer_deepspeed_optimizers_refused": D.scenario_trainer_deepspeed_optimizers_refused,
    "example_deepspeed": scenario_example_deepspeed,
}


def main(out_dir, only=None):
    global OUT_DIR
    OUT_DIR = C.OUT_DIR = D.OUT_DIR = out_dir
    if os.environ.get("LISA_ENGINES_HANG_S"):  # debugging aid: every thread's stack if a scenario hangs
        faulthandler.dump_traceback_later(float(os.environ["LISA_ENGINES_HANG_S"]), exit=True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    results = {}
    for name, fn in SCENARIOS.items():
        if only and name not in only:
            continue
        try:
            results[name] = fn(rank, world)
        except Exception:  # recorded for the test to show; the other scenarios still run
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank} failed in {name}:\n{results[name]['error']}", file=sys.stderr, flush=True)
        dist.barrier()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else None)
