"""Hugging Face Trainer glue: `LISACallback`.

    from lisa_fused import FusedLISA
    from lisa_fused.hf import LISACallback

    args = TrainingArguments(...)            # first: under torchrun this sets up the process group
    opt = FusedLISA(model, lr=1e-5, n_active_layers=2, switch_every=20)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None),          # the Trainer builds the LR scheduler over opt
                      callbacks=[LISACallback()])      # in the constructor, not add_callback()
    trainer.train()

The Trainer works with FusedLISA without this callback on one process; the callback adds:

* `lisa_active_layers` (a list of block indices, the blocks that train from the next step on) in every
  log entry (`trainer.state.log_history`, the console, trainer_state.json), and a log at every switch
  (`log_on_switch=True`), so each switch shows up with the step it happened at.
* DDP: FusedLISA freezes the inactive blocks when it is built, before the Trainer wraps the model in
  DistributedDataParallel, and DDP only registers parameters that require a gradient when it is built:
  blocks that become active later would never be all-reduced and the ranks would drift apart, silently.
  The callback makes every block trainable at the end of Trainer.__init__ (so the wrapper registers them
  all) and freezes the inactive ones again when training begins.
* Samplers: the Trainer's logged training loss ("loss") goes to `opt.observe_loss` (what the
  "loss_feedback" sampler learns from), and `lisa_sampler_probabilities` (each block's first-pick
  probability for the next draw) joins the logs. A logged loss is the mean over the steps since the
  previous log; it is fed only when all those steps trained the blocks active now (one that spans a
  switch belongs to an interval already scored), so keep `logging_steps` well below `switch_every`
  (e.g. logging_steps=1): with logging_steps >= switch_every no loss is ever fed (warned at train begin).
* `keep_grad_views=True`: calls `opt.zero_grad()` at the start of each step. Backward accumulates into
  FusedLISA's packed gradient buffer after the Trainer's `model.zero_grad()` anyway (the views are
  re-pointed just before autograd writes a gradient); this only makes FusedLISA see a model the Trainer
  moved (`model.to(...)`) before the first forward rather than at the first step.

Under FSDP (`fsdp=...`) the Trainer refuses `optimizers=`, and under DeepSpeed it drops it (it rebuilds
the optimizer in `deepspeed_init`); pass the optimizer as a class and kwargs instead, which the Trainer
calls in `create_optimizer` before accelerate shards or wraps the model:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(FusedLISAFactory, dict(lr=1e-5, n_active_layers=2, switch_every=20)),
                      callbacks=[LISACallback()])

See docs/integration.md for the settings each setup needs.
"""
from __future__ import annotations

import logging

from torch import nn
from transformers import TrainerCallback

from .binding import _OWNERS
from .optimizer import FusedLISA

logger = logging.getLogger("lisa_fused")

__all__ = ["FusedLISAFactory", "LISACallback", "unwrap_optimizer"]


class FusedLISAFactory:
    """`Trainer(optimizer_cls_and_kwargs=(FusedLISAFactory, kwargs))`: the Trainer (transformers >= 5.24,
    trainer.py `create_optimizer`: a class that is not a torch Optimizer is a factory, called as
    `FusedLISAFactory()(model, **kwargs)`) builds FusedLISA(model, **kwargs) on its model when training
    starts: before accelerate's FSDP2 sharding (which FusedLISA then follows) and before DeepSpeed's
    initialize. kwargs are FusedLISA's keyword arguments (lr is FusedLISA's, not args.learning_rate)."""

    def __call__(self, model, **kwargs) -> FusedLISA:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FusedLISAFactory is called with the model; got {type(model).__name__}: this transformers "
                            "version does not call optimizer factories (transformers >= 5.24 does)")
        return FusedLISA(model, **kwargs)


def unwrap_optimizer(optimizer) -> FusedLISA | None:
    """The FusedLISA inside accelerate's AcceleratedOptimizer (or any `.optimizer` wrapper), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, FusedLISA) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, FusedLISA) else None


class LISACallback(TrainerCallback):
    """Logs FusedLISA's active layers in the Trainer's logs and makes DDP register every block.

    optimizer:       the FusedLISA to watch; None (default) takes the Trainer's optimizer.
    log_on_switch:   force a Trainer log at every switch (every switch_every optimizer steps taken).
    keep_grad_views: call opt.zero_grad() before each step (see the module docstring).
    """

    def __init__(self, optimizer: FusedLISA | None = None, log_on_switch: bool = True,
                 keep_grad_views: bool = True):
        self._given = optimizer
        self.log_on_switch = log_on_switch
        self.keep_grad_views = keep_grad_views
        self._seen_step = 0  # optimizer steps FusedLISA had taken at the last on_step_end

    def _opt(self, kwargs) -> FusedLISA | None:
        return self._given if self._given is not None else unwrap_optimizer(kwargs.get("optimizer"))

    def on_init_end(self, args, state, control, **kwargs):
        opt = self._opt(kwargs)
        if opt is not None and (getattr(args, "deepspeed", None) or getattr(args, "hf_deepspeed_config", None)):
            raise ValueError(
                "Trainer(optimizers=(FusedLISA(...), ...)) under DeepSpeed: the Trainer drops that optimizer "
                "(transformers' deepspeed_init sets trainer.optimizer = None and builds AdamW over whatever is "
                "trainable, so LISA would not run); pass optimizer_cls_and_kwargs=(FusedLISAFactory, dict(...)) "
                "from lisa_fused.hf instead")
        if opt is not None:  # every block trainable while the Trainer wraps the model (DDP registration)
            _set_blocks_trainable(opt, range(opt.model_layout.num_blocks))

    def on_train_begin(self, args, state, control, **kwargs):
        opt = self._opt(kwargs)
        if opt is None:
            model = kwargs.get("model")
            driven = [n for n, p in (model.named_parameters() if model is not None else ())
                      if p in _OWNERS and _OWNERS[p][0]() is not None]
            if driven:
                raise RuntimeError(
                    f"LISACallback: a FusedLISA drives this model ({driven[0]!r}, ...) but the Trainer steps a "
                    f"{type(kwargs.get('optimizer')).__name__}: the Trainer replaced the FusedLISA (under DeepSpeed it "
                    "drops optimizers=); pass optimizer_cls_and_kwargs=(FusedLISAFactory, dict(...)) instead")
            logger.warning("LISACallback: the Trainer's optimizer is not a FusedLISA; nothing to do")
            return
        _set_blocks_trainable(opt, opt.active_layers)
        self._seen_step = opt._global_step
        self._loss_from = opt._global_step  # optimizer steps taken at the last log
        if opt._sampler.name == "loss_feedback" and getattr(args, "logging_steps", 1) >= opt.switch_every:
            logger.warning("LISACallback: sampler='loss_feedback' learns from the logged loss, but logging_steps=%s "
                           ">= switch_every=%d: every logged loss spans a switch and none is fed; set "
                           "logging_steps well below switch_every (e.g. 1)", args.logging_steps, opt.switch_every)

    def on_step_begin(self, args, state, control, **kwargs):
        opt = self._opt(kwargs)
        if opt is not None and self.keep_grad_views:
            opt.zero_grad()  # grads are None here (model.zero_grad()); this also follows a moved model

    def on_step_end(self, args, state, control, **kwargs):
        opt = self._opt(kwargs)
        if opt is None:
            return
        # FusedLISA re-draws inside step() every switch_every optimizer steps it actually took (a step
        # skipped by GradScaler on overflow does not count), even when the draw repeats the set.
        step = opt._global_step
        if step != self._seen_step and step % opt.switch_every == 0 and self.log_on_switch:
            control.should_log = True
        self._seen_step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        opt = self._opt(kwargs)
        if opt is None or logs is None:
            return
        step = opt._global_step
        start = step - step % opt.switch_every  # the current blocks train from the step after `start`
        if "loss" in logs and step > getattr(self, "_loss_from", step) >= start:
            opt.observe_loss(float(logs["loss"]))
        if "loss" in logs:
            self._loss_from = step
        extra = {"lisa_active_layers": list(opt.active_layers)}
        probs = opt.sampler_probabilities()
        if probs is not None:
            extra["lisa_sampler_probabilities"] = [round(p, 4) for p in probs]
        logs.update(extra)
        # The Trainer appended a copy of `logs` to log_history just before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def _set_blocks_trainable(opt: FusedLISA, trainable) -> None:
    keep = set(trainable)
    for b in range(opt.model_layout.num_blocks):
        opt._slots.set_trainable(b, b in keep)  # (keeps frozen what the user froze)
