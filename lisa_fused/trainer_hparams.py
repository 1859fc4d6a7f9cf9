"""TrainingArguments' AdamW hyperparameters for a FusedLISA under the Hugging Face Trainer (used by hf.py).

The Trainer builds its own AdamW from `TrainingArguments` (learning_rate, adam_beta1, adam_beta2,
adam_epsilon, weight_decay: transformers 5.24 trainer.py `get_optimizer_cls_and_kwargs`), but gives none
of them to an optimizer it is handed (`optimizers=`) or to a factory (`optimizer_cls_and_kwargs`, called
as `factory()(model, **kwargs)` in `create_optimizer`). Here they reach FusedLISA by one rule:

* a hyperparameter the user gave FusedLISA trains as given: a FusedLISA(...) keyword, a key of the
  factory's kwargs, or a param group's own value (a key of `param_groups=`/`add_param_group`, or a group
  value edited or loaded since; a group holds its own value when it is not the very object in
  `opt.defaults`);
* every other one takes the TrainingArguments value, in `opt.defaults` and in every group that took the
  constructor's default;
* except lr once an LR scheduler is built over the optimizer (`optimizers=(opt, scheduler)`, or a group
  with an 'initial_lr'): the scheduler scales the lr it found, so that one trains.

`describe` then says which values train: one INFO line when all are TrainingArguments', else one WARNING
naming each value that differs from TrainingArguments, the group(s) it trains in and why.
Weight decay applies to every parameter of a group; the Trainer's own AdamW exempts biases and norm
weights (`Trainer.get_decay_parameter_names`): give those a group with `"weight_decay": 0.0` to do the same.
"""
from __future__ import annotations

import logging

from . import hparams

logger = logging.getLogger("lisa_fused")

FIELDS = {"lr": "learning_rate", "betas": "(adam_beta1, adam_beta2)", "eps": "adam_epsilon",
          "weight_decay": "weight_decay"}


def from_args(args) -> dict:
    """{lr, betas, eps, weight_decay} from a TrainingArguments; ValueError / TypeError naming the field for a
    value FusedLISA refuses (hparams.py), before anything changes."""
    values = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
              "weight_decay": args.weight_decay}
    for key, value in values.items():
        hparams.check({key: value}, f"TrainingArguments.{FIELDS[key]} (set it, or give FusedLISA its own {key}=)")
    return values


def apply(opt, values: dict, lr_scheduled: str | None = None, by_value: bool = False) -> dict[str, str]:
    """Give `opt` (a FusedLISA) the `values` (from_args) it was not given. `lr_scheduled`: why an LR
    scheduler already holds the lr (None: look for an 'initial_lr' in the groups). by_value: a group whose
    value equals the default took it (after accelerate's prepare, which round-trips the state_dict and so
    rebuilds the betas tuples; else only the very default object counts). Returns {key: why} for a default
    kept (only lr: a scheduler was built over it)."""
    if lr_scheduled is None and any("initial_lr" in g for g in opt.param_groups):
        lr_scheduled = "an LR scheduler was built over the optimizer before the Trainer saw it (its 'initial_lr')"
    kept = {}
    for key, value in values.items():
        if key in opt._hparams_given:
            continue
        if key == "lr" and lr_scheduled:
            kept[key] = f"FusedLISA's default, kept: {lr_scheduled}; pass lr= to FusedLISA"
            continue
        old = opt.defaults[key]
        opt.defaults[key] = value
        for g in opt.param_groups:
            if g[key] is old or (by_value and _floats(g[key]) == _floats(old)):  # the default, not the group's own
                g[key] = value
    return kept


def describe(opt, values: dict, given_where: str, kept: dict) -> tuple[int, str]:
    """(logging level, message) saying which values train in `opt` against TrainingArguments' `values`;
    `given_where` names where FusedLISA's own keywords came from (e.g. "given to FusedLISA(...)")."""
    differ: dict[tuple, list[int]] = {}
    for k, g in enumerate(opt.param_groups):
        for key, want in values.items():
            have = g.get("initial_lr", g["lr"]) if key == "lr" else g[key]  # lr: what the scheduler scales
            if _floats(have) == _floats(want):
                continue
            if have is opt.defaults[key]:
                why = kept.get(key) or (given_where if key in opt._hparams_given else "FusedLISA's default")
            else:
                why = "the group's own value (param_groups=, add_param_group, an edit or load_state_dict)"
            differ.setdefault((key, _shown(have), why), []).append(k)
    if not differ:
        shown = ", ".join(f"{key}={_shown(v)}" for key, v in values.items())
        return logging.INFO, f"FusedLISA under the Trainer trains TrainingArguments' {shown} in every param group"
    parts = [f"{key}={have} trains in opt.param_groups{ks} ({why}), not TrainingArguments.{FIELDS[key]}="
             f"{_shown(values[key])}" for (key, have, why), ks in differ.items()]
    rest = [f"{key}={_shown(values[key])}" for key in values if key not in {d[0] for d in differ}]
    tail = f"; from TrainingArguments: {', '.join(rest)}" if rest else ""
    return logging.WARNING, "FusedLISA under the Trainer: " + "; ".join(parts) + tail


def say(opt, values: dict, given_where: str, kept: dict) -> None:
    level, message = describe(opt, values, given_where, kept)
    logger.log(level, message)


def _floats(value):
    if isinstance(value, (tuple, list)):
        return tuple(hparams.to_float(v, "value") for v in value)
    return hparams.to_float(value, "value")


def _shown(value) -> str:
    f = _floats(value)
    return repr(f)
