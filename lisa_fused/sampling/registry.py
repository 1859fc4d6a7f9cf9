"""The sampler names FusedLISA accepts and `build_sampler`, which turns `sampler=` / `sampler_options=`
into a Sampler.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..layers import block_weight_norms
from .base import CallableSampler, Sampler, SamplerFn, UniformSampler
from .grad_norm import GradNormSampler
from .loss_feedback import LossFeedbackSampler
from .options import SamplerOptions
from .trainable import trainable_blocks
from .outlier import OutlierSampler, block_outlier_ratios
from .weight_norm import WeightNormSampler

SAMPLERS = ("uniform", "weight_norm")  # the samplers that learn nothing
ADAPTIVE_SAMPLERS = ("grad_norm", "outlier", "loss_feedback")
SAMPLER_NAMES = SAMPLERS + ADAPTIVE_SAMPLERS


def build_sampler(sampler: str | SamplerFn, layout, options: SamplerOptions | Mapping[str, Any] | None = None) -> Sampler:
    """The Sampler for FusedLISA's `sampler=` / `sampler_options=` over `layout` (a layers.ModelLayout).

    Blocks of `layout` without a trainable parameter are never drawn (`Sampler.restrict`, trainable.py).
    Raises ValueError for an unknown name or bad options (naming the value and the valid range).
    """
    made = _build(sampler, layout, options)
    blocks = trainable_blocks(layout)
    if len(blocks) < layout.num_blocks:
        made.restrict(blocks)  # blocks without a trainable parameter are never drawn (trainable.py)
    return made


def _build(sampler, layout, options) -> Sampler:
    n = layout.num_blocks
    if callable(sampler):
        SamplerOptions.for_sampler("callable", options)
        return CallableSampler(n, sampler)
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"Invalid sampler: {sampler!r}; choose one of {SAMPLER_NAMES} or pass a callable")
    opts = SamplerOptions.for_sampler(sampler, options)
    if sampler == "uniform":
        return UniformSampler(n, opts)
    if sampler == "weight_norm":
        return WeightNormSampler(n, lambda: block_weight_norms(layout), opts)
    if sampler == "grad_norm":
        return GradNormSampler(n, opts)
    if sampler == "outlier":
        return OutlierSampler(n, lambda: block_outlier_ratios(layout.blocks, opts.outlier_multiplier), opts)
    return LossFeedbackSampler(n, opts)
