"""SamplerOptions: the knobs of the adaptive samplers, checked when they are made.

``FusedLISA(sampler=..., sampler_options={...})`` hands a dict (or a SamplerOptions) to
`SamplerOptions.for_sampler`, which refuses unknown names, bad values and options that the chosen sampler
does not read, each with a ValueError naming the option, the value and the valid range.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Knobs of the adaptive samplers (``FusedLISA(sampler=..., sampler_options={...})``).

    temperature         grad_norm, outlier: p_i ∝ score_i^(1/T); loss_feedback: p = softmax(score / T).
                        T > 0; 1 is proportional, larger flattens toward uniform, smaller sharpens.
    floor               least first-pick probability of every block, in [0, 1/N]; None: 0.1/N.
                        p_i = floor + (1 - N*floor) * q_i. floor = 1/N is uniform.
    ema_decay           grad_norm: weight of a block's old score when it is measured again,
                        score <- d*score + (1-d)*measured. loss_feedback: decay of the running
                        average (baseline) of the per-interval loss decrease and of its scale. In [0, 1).
    prior               grad_norm: score of a block never measured: "max" (optimistic: as likely as the
                        best measured block, so it gets explored), "mean", or a number > 0 (same unit
                        as the grad norms).
    stale_decay         grad_norm: each interval a measured block sits out, its score moves this fraction
                        of the way to the mean measured score (old evidence fades). In [0, 1].
    outlier_multiplier  outlier: M in |w| > M * mean|w| (see `block_outlier_ratios`). > 0.
    loss_smoothing      loss_feedback: beta of the loss EMA, L <- beta*L + (1-beta)*loss. In [0, 1).
    score_lr            loss_feedback: step size of the score update (log-odds per normalised reward). > 0.

    Bad values raise ValueError naming the option, the value and the valid range.
    """

    temperature: float = 1.0
    floor: float | None = None
    ema_decay: float = 0.5
    prior: str | float = "max"
    stale_decay: float = 0.05
    outlier_multiplier: float = 5.0
    loss_smoothing: float = 0.9
    score_lr: float = 0.5

    # Which options each sampler reads; giving one to a sampler that ignores it is an error.
    APPLIES = {
        "uniform": (), "weight_norm": (), "callable": (),
        "grad_norm": ("temperature", "floor", "ema_decay", "prior", "stale_decay"),
        "outlier": ("temperature", "floor", "outlier_multiplier"),
        "loss_feedback": ("temperature", "floor", "ema_decay", "loss_smoothing", "score_lr"),
    }

    def __post_init__(self):
        _check_real("temperature", self.temperature, 0.0, math.inf, "> 0 and finite", lo_open=True, hi_open=True)
        if self.floor is not None:
            _check_real("floor", self.floor, 0.0, 1.0, "in [0, 1/N] for N blocks, or None for 0.1/N")
        _check_real("ema_decay", self.ema_decay, 0.0, 1.0, "in [0, 1)", hi_open=True)
        if isinstance(self.prior, str):
            if self.prior not in ("max", "mean"):
                raise ValueError(f"Invalid sampler_options prior={self.prior!r}: must be 'max', 'mean' or a number > 0")
        else:
            _check_real("prior", self.prior, 0.0, math.inf, "'max', 'mean' or a finite number > 0",
                        lo_open=True, hi_open=True)
        _check_real("stale_decay", self.stale_decay, 0.0, 1.0, "in [0, 1]")
        _check_real("outlier_multiplier", self.outlier_multiplier, 0.0, math.inf, "> 0 and finite",
                    lo_open=True, hi_open=True)
        _check_real("loss_smoothing", self.loss_smoothing, 0.0, 1.0, "in [0, 1)", hi_open=True)
        _check_real("score_lr", self.score_lr, 0.0, math.inf, "> 0 and finite", lo_open=True, hi_open=True)

    @classmethod
    def for_sampler(cls, sampler: str, given: "SamplerOptions | Mapping[str, Any] | None") -> "SamplerOptions":
        """Validated options for `sampler` from None (defaults), a dict or a SamplerOptions."""
        names = [f.name for f in dataclasses.fields(cls)]
        applies = cls.APPLIES[sampler]
        if given is None:
            return cls()
        if isinstance(given, cls):
            chosen = [n for n in names if getattr(given, n) != getattr(cls, n)]
            opts = given
        elif isinstance(given, Mapping):
            unknown = [k for k in given if k not in names]
            if unknown:
                raise ValueError(f"Unknown sampler_options {unknown}; valid options: {names}")
            chosen = list(given)
            opts = cls(**given)
        else:
            raise TypeError(f"sampler_options must be a dict or SamplerOptions, got {type(given).__name__}")
        stray = [k for k in chosen if k not in applies]
        if stray:
            raise ValueError(f"sampler_options {stray} do not apply to sampler {sampler!r}, which takes "
                             f"{list(applies) if applies else 'no options'}")
        return opts

    def floor_for(self, n_blocks: int) -> float:
        """The floor as a probability for N = `n_blocks` (checks floor <= 1/N)."""
        if self.floor is None:
            return 0.1 / n_blocks
        if self.floor > 1.0 / n_blocks:
            raise ValueError(f"Invalid sampler_options floor={self.floor}: must be in [0, 1/N] = "
                             f"[0, {1.0 / n_blocks:.6g}] for N={n_blocks} blocks (default 0.1/N)")
        return float(self.floor)


def _check_real(name, value, lo, hi, what, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"Invalid sampler_options {name}={value!r}: must be {what}")
