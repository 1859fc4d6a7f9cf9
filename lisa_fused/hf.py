"""Hugging Face Trainer glue: `LISACallback`.

    from lisa_fused import FusedLISA
    from lisa_fused.hf import LISACallback

    args = TrainingArguments(..., learning_rate=1e-5)  # first: under torchrun this sets up the process group
    opt = FusedLISA(model, n_active_layers=2, switch_every=20)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None),          # the Trainer builds the LR scheduler over opt
                      callbacks=[LISACallback()])      # in the constructor, not add_callback()
    trainer.train()

The Trainer works with FusedLISA without this callback on one process; the callback adds:

* TrainingArguments' learning_rate, weight_decay, adam_beta1/2 and adam_epsilon reach a FusedLISA passed
  in `optimizers=` (at the end of Trainer.__init__, before the Trainer builds its scheduler), for each
  hyperparameter not given to FusedLISA(...) itself; lr stays FusedLISA's when `optimizers=(opt,
  scheduler)` brings a scheduler built over it. At train begin one log line says which values train and,
  as a WARNING, why each that differs from TrainingArguments does (trainer_hparams.py). Without the
  callback the Trainer trains the optimizer's own values, as for any optimizer it is handed.
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

Under FSDP (`fsdp=...`) the Trainer refuses `optimizers=`, and under DeepSpeed it drops it (it rebuilds
the optimizer in `deepspeed_init`); pass the optimizer as a class and kwargs instead, which the Trainer
calls in `create_optimizer` before accelerate shards or wraps the model:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(FusedLISAFactory, dict(n_active_layers=2, switch_every=20)),
                      callbacks=[LISACallback()])

The factory gives FusedLISA TrainingArguments' learning_rate, weight_decay, adam_beta1/2 and adam_epsilon
for each of lr, weight_decay, betas, eps its kwargs do not set, and logs which values train (callback or
not). See docs/integration.md for the settings each setup needs.
"""
from __future__ import annotations

import logging
import sys
import weakref

from torch import nn
from transformers import Trainer, TrainerCallback

from . import trainer_hparams
from .binding import _OWNERS
from .optimizer import FusedLISA

logger = logging.getLogger("lisa_fused")

__all__ = ["FusedLISAFactory", "LISACallback", "unwrap_optimizer"]


class FusedLISAFactory:
    """`Trainer(optimizer_cls_and_kwargs=(FusedLISAFactory, kwargs))`: the Trainer (transformers >= 5.24,
    trainer.py `create_optimizer`: a class that is not a torch Optimizer is a factory, called as
    `FusedLISAFactory()(model, **kwargs)`) builds FusedLISA(model, **kwargs) on its model when training
    starts: before accelerate's FSDP2 sharding (which FusedLISA then follows) and before DeepSpeed's
    initialize. kwargs are FusedLISA's keyword arguments. lr, betas, eps, weight_decay that kwargs do not
    set come from the calling Trainer's TrainingArguments (learning_rate, adam_beta1/2, adam_epsilon,
    weight_decay), as the Trainer's own AdamW takes them; one log line says which values train (a WARNING
    naming each that differs from TrainingArguments, and why). The Trainer passes the factory only the model
    and kwargs, so the Trainer is found as the `self` of the calling `create_optimizer` frame; called
    outside a Trainer, the factory builds FusedLISA(model, **kwargs). ValueError / TypeError naming the
    TrainingArguments field for a value FusedLISA refuses."""

    def __call__(self, model, **kwargs) -> FusedLISA:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FusedLISAFactory is called with the model; got {type(model).__name__}: this transformers "
                            "version does not call optimizer factories (transformers >= 5.24 does)")
        trainer = _calling_trainer(sys._getframe(1))
        if trainer is None:
            return FusedLISA(model, **kwargs)
        values = trainer_hparams.from_args(trainer.args)
        opt = FusedLISA(model, **{k: v for k, v in values.items() if k not in kwargs}, **kwargs)
        trainer_hparams.say(opt, values, "given in optimizer_cls_and_kwargs", {})
        _MATCHED[opt] = trainer.args
        return opt


# {FusedLISA: the TrainingArguments its hyperparameters were matched against} (by the factory or on_init_end;
# a FusedLISA handed to a second Trainer is matched against that one's)
_MATCHED: "weakref.WeakKeyDictionary[FusedLISA, object]" = weakref.WeakKeyDictionary()


def _calling_trainer(frame, depth: int = 4):
    """The transformers Trainer among the `self` of `frame` and its callers (Trainer.create_optimizer calls the
    factory: `optimizer_cls()(opt_model, **optimizer_kwargs)`, transformers 5.24 trainer.py), or None."""
    for _ in range(depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


def unwrap_optimizer(optimizer) -> FusedLISA | None:
    """The FusedLISA inside accelerate's AcceleratedOptimizer (or any `.optimizer` wrapper), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, FusedLISA) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, FusedLISA) else None


class LISACallback(TrainerCallback):
    """Hands TrainingArguments' AdamW hyperparameters to a FusedLISA passed in `optimizers=`, logs FusedLISA's
    active layers in the Trainer's logs and makes DDP register every block (module docstring).

    optimizer:       the FusedLISA to watch; None (default) takes the Trainer's optimizer.
    log_on_switch:   force a Trainer log at every switch (every switch_every optimizer steps taken).
    """

    def __init__(self, optimizer: FusedLISA | None = None, log_on_switch: bool = True):
        self._given = optimizer
        self.log_on_switch = log_on_switch
        self._seen_step = 0  # optimizer steps FusedLISA had taken at the last on_step_end
        self._to_say = None  # (values, kept) matched at on_init_end, said at on_train_begin

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
        if opt is not None and _MATCHED.get(opt) is not args:  # optimizers=: before the Trainer's scheduler
            values = trainer_hparams.from_args(args)
            scheduler = kwargs.get("lr_scheduler")
            why = None if scheduler is None else (f"the {type(scheduler).__name__} passed in Trainer(optimizers=(opt, "
                                                  "lr_scheduler)) was built over it")
            self._to_say = (values, trainer_hparams.apply(opt, values, why))
            _MATCHED[opt] = args
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
        if _MATCHED.get(opt) is not args:  # not seen at on_init_end (add_callback) nor built by FusedLISAFactory
            values = trainer_hparams.from_args(args)
            self._to_say = (values, trainer_hparams.apply(opt, values, (
                "the Trainer built its LR scheduler over it before LISACallback saw the optimizer (pass the "
                "callback in Trainer(callbacks=[...]), not add_callback)"), by_value=True))
            _MATCHED[opt] = args
        if self._to_say is not None:
            (values, kept), self._to_say = self._to_say, None
            trainer_hparams.say(opt, values, "given to FusedLISA(...)", kept)
        _set_blocks_trainable(opt, opt.active_layers)
        self._seen_step = opt._global_step
        self._loss_from = opt._global_step  # optimizer steps taken at the last log
        if opt._sampler.name == "loss_feedback" and getattr(args, "logging_steps", 1) >= opt.switch_every:
            logger.warning("LISACallback: sampler='loss_feedback' learns from the logged loss, but logging_steps=%s "
                           ">= switch_every=%d: every logged loss spans a switch and none is fed; set "
                           "logging_steps well below switch_every (e.g. 1)", args.logging_steps, opt.switch_every)

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
