"""DeepSpeed scenarios of tests/_engines_worker.py (see there): ZeRO-0 through deepspeed.initialize and the
Trainer, and the stages and modes FusedLISA refuses."""
from __future__ import annotations

import torch

import _dist_worker as W
from _dist_worker import changed, flat, snapshot
from _engines_common import BATCH, LR, N_LAYERS, SEQ, lm_batches
from helpers import tiny_llama
from lisa_fused import FusedLISA
from lisa_fused.hf import FusedLISAFactory, LISACallback, unwrap_optimizer

OUT_DIR = None  # set by _engines_worker.main


def _deepspeed(model, opt, stage=0, **cfg):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": W.BATCH // 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0,  # (DeepSpeed 0.19.8 clips at 1.0 by default; the reference does not clip)
              "steps_per_print": 10 ** 9, **cfg}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def scenario_deepspeed_zero0(rank, world, dtype=torch.float32):
    """deepspeed.initialize(model, optimizer=FusedLISA), ZeRO stage 0 with DeepSpeed's fp16/bf16 off: the
    engine all-reduces the gradients of the params trainable at each backward and calls FusedLISA.step().
    dtype=bf16: a bf16 model, FusedLISA keeping the fp32 masters (the supported bf16 recipe)."""
    model = W.MLPStack(W.WIDTH, W.N_LAYERS, seed=rank).to(dtype)  # the engine broadcasts rank 0's weights
    opt = W.make_opt(model, rank)
    engine = _deepspeed(model, opt)
    before = snapshot(model)
    seq, mem = [], []
    for x, y in W.batches():
        n = x.shape[0] // world
        seq.append(opt.active_layers)
        out = engine(x[rank * n:(rank + 1) * n].to(dtype)).float()
        engine.backward(torch.nn.functional.mse_loss(out, y[rank * n:(rank + 1) * n]))
        engine.step()
        mem.append(opt.memory_stats()["device_bytes"])
    total = sum(p.numel() for p in model.parameters())
    # the optimizer's own bytes: exp_avg + exp_avg_sq, and a bf16 param's fp32 master (params and grads
    # are the model's)
    per_elt = 8 if dtype == torch.float32 else 4 + 8
    return {"seq": seq, "params": flat(model), "changed": changed(model, before), "mem": mem,
            "packed_bytes": per_elt * opt._packed_state.layouts[0].total, "full_bytes": per_elt * total,
            "engine_optimizer": type(engine.optimizer).__name__}


def scenario_deepspeed_refused(rank, world):
    """ZeRO 0 with bf16 (DeepSpeed's wrapper replaces the optimizer's params), and what FusedLISA does not
    support under ZeRO 1-3 (lean moments, optimizer offload, a bf16 model with DeepSpeed's bf16 off): refused."""
    out = {}
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
               "zero_force_ds_cpu_optimizer": False}  # (else DeepSpeed refuses a client optimizer with offload first)
    for name, stage, cfg, dtype, kw in [
            ("zero0_bf16", 0, {"bf16": {"enabled": True}}, torch.float32, {}),
            ("zero2_8bit", 2, {}, torch.float32, {"moments": "8bit"}),
            ("zero3_offload", 3, offload, torch.float32, {}),
            ("zero2_bf16_model", 2, {}, torch.bfloat16, {})]:
        model = W.MLPStack(W.WIDTH, W.N_LAYERS, seed=0).to(dtype)
        opt = W.make_opt(model, rank, **kw)
        try:
            _deepspeed(model, opt, stage, **cfg)
            out[name] = "no error"
        except RuntimeError as err:
            out[name] = str(err)
        opt.release()
    return out


def scenario_trainer_deepspeed_zero0(rank, world):
    """TrainingArguments(deepspeed=ZeRO-0 config) with FusedLISAFactory: transformers' deepspeed_init builds
    FusedLISA through the factory and hands it to deepspeed.initialize."""
    import transformers
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    args = TrainingArguments(
        output_dir=f"{OUT_DIR}/trainer_ds", report_to=[], max_steps=6, per_device_train_batch_size=BATCH,
        learning_rate=LR, logging_steps=100, disable_tqdm=True, seed=0, save_strategy="no",
        lr_scheduler_type="constant", deepspeed={"zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu":
                                                 "auto", "gradient_accumulation_steps": "auto", "steps_per_print": 10 ** 9})
    model = tiny_llama(N_LAYERS, seed=rank)  # the engine broadcasts rank 0's weights
    data = [{"input_ids": x, "labels": x} for x in lm_batches(6, world).reshape(-1, SEQ)]
    seq = []

    class Record(LISACallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seq.append(unwrap_optimizer(optimizer).active_layers)
            return super().on_step_begin(args, state, control, optimizer=optimizer, **kw)

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Record()],
                      optimizer_cls_and_kwargs=(FusedLISAFactory, dict(lr=LR, n_active_layers=1, switch_every=2,
                                                                       seed=rank, backend="torch")))
    before = snapshot(model) if rank == 0 else None
    trainer.train()
    fl = unwrap_optimizer(trainer.optimizer)
    out = {"seq": seq, "params": flat(model), "changed": changed(model, before) if before else None,
           "wrapped": type(trainer.model_wrapped).__name__, "global_step": fl._global_step}
    AcceleratorState._reset_state(True)
    return out


def scenario_trainer_deepspeed_optimizers_refused(rank, world):
    """optimizers=(FusedLISA, None) under DeepSpeed: the Trainer would drop it; LISACallback refuses."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=f"{OUT_DIR}/trainer_ds_refused", report_to=[], max_steps=1,
                             deepspeed={"zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu": "auto"})
    model = tiny_llama(N_LAYERS, seed=0)
    opt = FusedLISA(model, lr=LR, n_active_layers=1, switch_every=2, backend="torch")
    try:
        Trainer(model=model, args=args, train_dataset=[], optimizers=(opt, None), callbacks=[LISACallback()])
        text = "no error"
    except ValueError as err:
        text = str(err)
    AcceleratorState._reset_state(True)
    return {"error_text": text}


