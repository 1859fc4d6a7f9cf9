"""Which blocks train next: samplers driven by an explicit torch.Generator.

The generator lives on the CPU and is seeded from `seed`, so every rank that starts from the same seed
(or from rank 0's generator state, see FusedLISA) draws the same blocks, and a state_dict resumes the
exact sequence. A sampler returns `n_active` distinct block indices in [0, n_layers).

`build_sampler(sampler, layout, options)` makes the `Sampler` for FusedLISA's `sampler=` and
`sampler_options=` (`SamplerOptions`). The rules, each told in full in its module's docstring:

    sampler=         rule                                                               module
    "uniform"        LISA (Pan et al. 2024): every subset of n_active blocks equally    base.py
                     likely
    "weight_norm"    P(i) ∝ the block's mean weight norm, read at each draw             weight_norm.py
    "grad_norm"      GRASS-style (Tian et al. 2026, arXiv 2604.07808): P(i) ∝           grad_norm.py
                     score^(1/T), score an EMA of the block's measured grad norm
    "outlier"        OwLore-style (Li et al. 2024, arXiv 2405.18380): P(i) ∝ the        outlier.py
                     fraction of outlier entries in the block's 2-D weights
    "loss_feedback"  IST-style (Yao et al. 2024): softmax of scores that rise while     loss_feedback.py
                     the smoothed loss falls faster than average
    a callable       fn(n_blocks, n_active, generator) -> indices, checked              base.py

Blocks without a trainable parameter (peft `layers_to_transform`, frozen blocks) are never drawn by any
of them (trainable.py). The three adaptive ones (ADAPTIVE_SAMPLERS) keep every block's first-pick
probability at least `floor`, and under torch.distributed every rank draws from rank 0's state (base.py says how).

Modules (each imports only the ones listed above it; this file re-exports their public names):
    options.py        SamplerOptions: the adaptive samplers' knobs and their checks
    base.py           Sampler (draw, probabilities, floor, restrict, state_dict, rank-0 broadcast),
                      checked_draw, draw_active, uniform / UniformSampler, CallableSampler, shared checks
    weight_norm.py    WeightNormSampler, weight_norm_sampler
    grad_norm.py      GradNormSampler, GradNormMeter (the device-side grad sums of squares of an interval)
    outlier.py        OutlierSampler, block_outlier_ratios
    loss_feedback.py  LossFeedbackSampler
    trainable.py      blocks with nothing to train: trainable_blocks, announce (the constructor's log),
                      check_saved_active (a resumed active set), the same blocks on every rank
    registry.py       the names (SAMPLERS, ADAPTIVE_SAMPLERS, SAMPLER_NAMES) and build_sampler
"""
from __future__ import annotations

from .base import (CallableSampler, Sampler, SamplerFn, UniformSampler, checked_draw, draw_active,
                   sync_generator_from_rank0, uniform)
from .grad_norm import GradNormMeter, GradNormSampler
from .loss_feedback import LossFeedbackSampler
from .options import SamplerOptions
from .outlier import OutlierSampler, block_outlier_ratios
from .registry import ADAPTIVE_SAMPLERS, SAMPLER_NAMES, SAMPLERS, build_sampler
from .trainable import announce, check_saved_active, trainable_blocks
from .weight_norm import WeightNormSampler, weight_norm_sampler

__all__ = [
    "ADAPTIVE_SAMPLERS", "SAMPLERS", "SAMPLER_NAMES", "build_sampler",
    "SamplerOptions",
    "Sampler", "SamplerFn", "checked_draw", "draw_active", "uniform", "UniformSampler", "CallableSampler",
    "sync_generator_from_rank0",
    "trainable_blocks", "announce", "check_saved_active",
    "WeightNormSampler", "weight_norm_sampler",
    "GradNormSampler", "GradNormMeter",
    "OutlierSampler", "block_outlier_ratios",
    "LossFeedbackSampler",
]
