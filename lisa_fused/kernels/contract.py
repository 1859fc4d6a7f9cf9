"""The data contract every AdamW backend implements.

A packed buffer is a flat 1-D tensor; a *segment* is one parameter tensor inside it (offset, numel).
Per step the optimizer hands over a host table `hparams` of shape [S, 4], float64, one row per segment:

    COL_STEP_SIZE  lr / (1 - beta1**step)                   (bias-corrected step size)
    COL_DECAY      1 - lr * weight_decay                    (decoupled weight decay factor)
    COL_BC2_SQRT   sqrt(1 - beta2**step)
    COL_ENABLED    1.0 to update this segment, 0.0 to leave param and moments untouched

The scalars are computed on the host in double, so every backend starts from the same rounded fp32
values that torch's AdamW feeds its kernels. Element math, in fp32 whatever the storage dtype:

    g  = grad / grad_scale            (grad_scale: optional 1-element fp32 tensor on the device)
    p  = p * decay
    m  = m + (1 - beta1) * (g - m)     (torch's lerp for weight < 0.5)
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - step_size * (m / (sqrt(v) / bc2_sqrt + eps))
    param_lowp = round_to_nearest_even(p)   (optional bf16/fp16 copy)

Roundings, as torch's own CPU kernels do them (reference.py calls those kernels): the m and v updates
are one fused multiply-add each where the CPU has FMA (torch's AVX2/AVX-512 kernels; every GPU), two
roundings otherwise; p is updated as p + ((-step_size * m) / denom). The native kernels do the same and
take a correctly rounded sqrt, where torch's CPU sqrt is off by one ulp on some inputs: with that one
exception they match the reference bit for bit (tests/test_kernels.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

COL_STEP_SIZE, COL_DECAY, COL_BC2_SQRT, COL_ENABLED = range(4)
N_COLS = 4

# Segment offsets in packed buffers are multiples of this many elements: 16-byte vector loads work for
# fp32 (4 elements) and bf16 (8), and 64 keeps every segment start on a 128/256-byte boundary.
ALIGN = 64


@dataclass
class Segments:
    """Host-side segment layout: where each parameter lives in the packed buffers.

    `bounds` is a list of (offset, numel) pairs. Backends may cache device-side tables (chunk lists) in
    `cache`, keyed by whatever they need; the optimizer builds a new Segments whenever the layout
    changes, so a cache never goes stale.
    """

    bounds: list[tuple[int, int]]
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for off, n in self.bounds:
            if off < 0 or n < 0:
                raise ValueError(f"invalid segment (offset={off}, numel={n})")

    def __len__(self) -> int:
        return len(self.bounds)

    def tensor(self) -> torch.Tensor:
        """int64 [S, 2] host tensor of (offset, numel)."""
        if "bounds_cpu" not in self.cache:
            self.cache["bounds_cpu"] = torch.tensor(self.bounds, dtype=torch.int64).reshape(-1, 2)
        return self.cache["bounds_cpu"]


def host_scalars(beta1: float, beta2: float, eps: float) -> tuple[float, float, float, float]:
    """(1-beta1, beta2, 1-beta2, eps): computed in double on the host, then handed to kernels."""
    return 1.0 - beta1, beta2, 1.0 - beta2, eps
