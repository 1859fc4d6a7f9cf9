"""AdamW hyperparameter values (lr, betas, eps, weight_decay) as torch.optim.AdamW takes them: the check
(at construction, in param_groups edited in place, written by any LR scheduler) and the read into Python
floats for the host-side hyperparameter table (update.py).

Accepted, as torch 2.13's Adam/AdamW constructor (torch/optim/adam.py: `0.0 <= lr`, `0.0 <= eps`,
`0.0 <= weight_decay`, `0.0 <= betas[k] < 1.0`, a tensor must have 1 element):

    lr, eps, weight_decay   a real number >= 0 (inf included, NaN refused): a Python int, float or bool, a
                            numpy scalar (np.float32 from a LambdaLR over a numpy table, np.int64, ...),
                            any numbers.Real (fractions.Fraction), a 0-dim numpy array, or a 1-element
                            torch.Tensor of a real dtype (0-dim or not, on any device)
    betas                   a pair (tuple or list) of such values, each in [0, 1)

torch's constructor also insists that both betas are Python floats or both tensors (it refuses
`betas=(0, 0.999)` and numpy float32 betas) and that eps and weight_decay edited in place support its
tensor arithmetic; FusedLISA takes any mix of the values above, everywhere. torch checks nothing when
param_groups are edited in place; FusedLISA checks edits with the same rules at the next step(), before
anything changes.

Meaning: a value is its exact real value, read as a Python float (`float(x)`; `tensor.item()`, one host
read per step of a tensor on a device). The bias corrections are then computed in Python floats, as torch
computes them for Python-float hyperparameters: numpy 2 keeps np.float32 arithmetic in float32 (NEP 50),
so torch itself, given an np.float32 lr, rounds its step size lr / (1 - beta1^t) to float32; FusedLISA
with that lr equals torch.optim.AdamW given float(lr).

A refused value raises TypeError (not a real number: a str, None, complex, a numpy array of more than 0
dimensions) or ValueError (out of range, NaN, a tensor of more than one element), naming the group, the
key, the value, its type and what is accepted.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

KEYS = ("lr", "betas", "eps", "weight_decay")
_TORCH_WORDS = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value"}
ACCEPTED = ("a real number >= 0 (a Python int or float, a numpy scalar such as np.float32, a 0-dim numpy array) "
            "or a 1-element tensor, as torch.optim.AdamW")
ACCEPTED_BETA = "a real number in [0, 1) (a Python int or float, a numpy scalar) or a 1-element tensor"


class _Default(float):
    """One of FusedLISA's constructor defaults (torch.optim.AdamW's), as the signature holds it: equal to the
    float, and telling the constructor that the caller left it (`given`)."""

    __slots__ = ()
    __repr__ = float.__repr__


class _DefaultPair(tuple):
    """The betas default, as `_Default`."""

    __slots__ = ()


# FusedLISA's signature defaults: torch.optim.AdamW's (torch 2.13 adam.py / adamw.py)
LR, BETAS, EPS, WEIGHT_DECAY = _Default(1e-3), _DefaultPair((0.9, 0.999)), _Default(1e-8), _Default(1e-2)


def given(**values) -> tuple[frozenset, dict]:
    """(the keys among `values` (lr=, betas=, ...) the caller gave FusedLISA, the values with every default
    as a plain float / tuple). FusedLISA keeps the keys (`_hparams_given`): under the Hugging Face Trainer,
    TrainingArguments' values replace the defaults left (trainer_hparams.py), not the ones given."""
    left = {k for k, v in values.items() if isinstance(v, (_Default, _DefaultPair))}
    plain = {k: (tuple(v) if isinstance(v, tuple) else float(v)) if k in left else v for k, v in values.items()}
    return frozenset(values) - left, plain


class HParams(NamedTuple):
    """One param group's hyperparameters as Python floats."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    t = type(value)
    return f"a {t.__qualname__}" if t.__module__ == "builtins" else f"a {t.__module__}.{t.__qualname__}"


def to_float(value, what: str, accepted: str = ACCEPTED) -> float:
    """`value` as a Python float, or TypeError / ValueError starting with `what` (e.g. "Invalid learning
    rate: ...") naming the value, its type and `accepted`. Range checks are the caller's."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{what}: {value!r} is {_kind(value)}; takes {accepted}")
        if value.numel() != 1:
            raise ValueError(f"{what}: {_kind(value)} (tensor values must have 1 element); takes {accepted}")
        return float(value.item())
    if getattr(value, "ndim", 0) != 0:  # a numpy array with dimensions (torch's step refuses it too)
        raise TypeError(f"{what}: {value!r} is {_kind(value)} with {value.ndim} dimension(s); pass a scalar "
                        f"(e.g. arr.item()) or a 1-element tensor; takes {accepted}")
    is_complex = isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real)
    if isinstance(value, (str, bytes)) or is_complex or not hasattr(value, "__float__"):
        raise TypeError(f"{what}: {value!r} is {_kind(value)}; takes {accepted}")
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError) as err:
        raise ValueError(f"{what}: {value!r} ({_kind(value)}) has no float value ({err}); takes {accepted}") from None


def check(options: dict, where: str) -> None:
    """Check the AdamW keys present in `options` (a group or the constructor's defaults); `where` prefixes
    every message (e.g. "opt.param_groups[1] (edited in place)")."""
    for key in ("lr", "eps", "weight_decay"):
        if key in options:
            _nonnegative(options[key], key, where)
    if "betas" in options:
        _betas(options["betas"], where)


def read(group: dict, where: str = "param group") -> HParams:
    """A group's lr, betas, eps, weight_decay as Python floats (raising as `check` for a bad value)."""
    beta1, beta2 = _betas(group["betas"], where)
    return HParams(_nonnegative(group["lr"], "lr", where), beta1, beta2, _nonnegative(group["eps"], "eps", where),
                   _nonnegative(group["weight_decay"], "weight_decay", where))


def read_all(groups) -> dict[int, HParams]:
    """{id(group): read(group)} over distinct groups (each read once: one host read per tensor value). step()
    reads every group once (groups.check_unchanged) and hands the result to update.py."""
    out: dict[int, HParams] = {}
    for g in groups:
        if id(g) not in out:
            out[id(g)] = read(g)
    return out


def _nonnegative(value, key: str, where: str) -> float:
    what = f"{where}: Invalid {_TORCH_WORDS[key]}"
    x = to_float(value, what)
    if math.isnan(x) or x < 0:
        raise ValueError(f"{what}: {_shown(value)} ({_kind(value)}); {key} takes {ACCEPTED}")
    return x


def _betas(betas, where: str) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: Invalid betas: {betas!r} (expected a pair (beta1, beta2), each "
                         f"{ACCEPTED_BETA})")
    out = []
    for k, b in enumerate(betas):
        what = f"{where}: Invalid beta parameter at index {k}"
        x = to_float(b, what, ACCEPTED_BETA)
        if not 0.0 <= x < 1.0:  # (False for NaN)
            raise ValueError(f"{what}: {_shown(b)} ({_kind(b)}); each beta takes {ACCEPTED_BETA}")
        out.append(x)
    return out[0], out[1]


def _shown(value) -> str:
    """torch's rendering of a bad value ("Invalid learning rate: -0.001"), a tensor by its value."""
    return str(value.item()) if isinstance(value, torch.Tensor) else str(value)
