"""The "outlier" sampler (OwLore-style, Li et al. 2024, arXiv 2405.18380): P(i) ∝ the fraction of outlier
entries in the block's 2-D weights (see `block_outlier_ratios`), re-read from the live weights at each draw.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..layers import host_floats
from .base import Sampler, _checked_weights, _power


def block_outlier_ratios(blocks: Sequence[Sequence[tuple[str, torch.Tensor]]], multiplier: float) -> list[float]:
    """Each block's outlier ratio (OwLore, Li et al. 2024, after OWL, Yin et al. 2023):

        D_i = #{ w in W_i : |w| > M * mean_{W_i} |w| } / |W_i|

    W_i: every entry of block i's 2-D weights (the projections; biases and norm weights are left out),
    pooled, so one threshold per block as in OWL's `check_outlier_mean`. `blocks` is
    `ModelLayout.blocks` (per block, (name, Parameter) pairs). M = `multiplier`.

    OwLore scores A_ij = |W_ij| * ||X_j||_2 (Wanda's metric, which needs calibration activations);
    this is the weight-only variant, |W_ij|. OWL's scripts use M = 5 (`--Hyper_m 5`) and OwLore's
    released LLaMA-2-7B scores are named `ratio_13`; both apply M to the activation-weighted metric,
    whose tails are heavier than the weights' alone, so our default is the lower M = 5.

    Returns a float in [0, 1] per block (0.0 for a block without 2-D weights). Counts are computed in
    fp32 on the weights' device in chunks (bounded temporaries); FSDP2 (DTensor) shards are summed over
    the mesh (two small all-reduces per weight), so every rank gets the whole tensor's value.
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier > 0:
        raise ValueError(f"Invalid outlier multiplier M={multiplier!r}: must be a number > 0")
    weights = [[p for _, p in blk if p.dim() == 2] for blk in blocks]
    abs_sums = [[_global(p, lambda t: _chunked(t, lambda c: c.abs().sum(dtype=torch.float64))) for p in ws]
                for ws in weights]
    means = []
    for ws, sums in zip(weights, abs_sums):
        n = sum(p.numel() for p in ws)
        means.append(sum(host_floats(sums)) / n if n else 0.0)
    ratios = []
    for ws, mean in zip(weights, means):
        n = sum(p.numel() for p in ws)
        if n == 0:
            ratios.append(0.0)
            continue
        thr = multiplier * mean
        counts = [_global(p, lambda t: _chunked(t, lambda c: (c.abs().float() > thr).sum(dtype=torch.float64)))
                  for p in ws]
        ratios.append(sum(host_floats(counts)) / n)
    return ratios


_CHUNK = 1 << 22  # elements per fp32 temporary (16 MiB)


def _chunked(t: torch.Tensor, fn) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for c in flat.split(_CHUNK):
        total += fn(c)
    return total


def _global(p: torch.Tensor, fn) -> torch.Tensor:
    """fn over the whole tensor: over the local shard, summed over the mesh dims it is sharded on."""
    if not hasattr(p, "to_local"):
        return fn(p)
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    local = fn(p.to_local())
    placements = []
    for pl in p.placements:
        if isinstance(pl, Shard):
            placements.append(Partial())
        elif isinstance(pl, Replicate):
            placements.append(Replicate())
        else:
            raise ValueError(f"outlier ratio: unsupported DTensor placement {pl} (expected Shard or Replicate)")
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False).full_tensor()


class OutlierSampler(Sampler):
    """OwLore-style: p_i = floor + (1 - N*floor) * D_i^(1/T) / sum_j D_j^(1/T), D_i the block's outlier
    ratio (`block_outlier_ratios`) re-read from the live weights at each draw (T = 1 is OwLore's rule).
    All ratios 0 (no entry beyond M x mean anywhere): uniform."""

    name = "outlier"
    shares_state = True  # ratios come from reductions that could differ by a ulp between ranks

    def __init__(self, n_blocks, ratios_fn: Callable[[], Sequence[float]], options=None):
        super().__init__(n_blocks, options)
        self.options.floor_for(n_blocks)
        self._ratios_fn = ratios_fn
        self.ratios: list[float] | None = None

    def _refresh(self):
        self.ratios = _checked_weights(self.name, "outlier ratios", self._ratios_fn(), self.n_blocks).tolist()

    def _weights(self):
        if self.ratios is None:
            return torch.full((self.n_blocks,), 1.0 / self.n_blocks, dtype=torch.float64)
        r = torch.tensor(self.ratios, dtype=torch.float64)
        return self._with_floor(_power(r, self.options.temperature))

    def _state(self):
        return {"ratios": self.ratios}

    def _load(self, state):
        self.ratios = None if state["ratios"] is None else [float(r) for r in state["ratios"]]
