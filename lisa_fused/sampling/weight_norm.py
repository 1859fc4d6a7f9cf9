"""The "weight_norm" sampler: P(block i) proportional to its mean weight norm, read from the live weights
at each draw (`layers.block_weight_norms`); it learns nothing and has no floor.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .base import Sampler, SamplerFn, _checked_weights


def weight_norm_sampler(norms_fn: Callable[[], Sequence[float]]) -> SamplerFn:
    """P(block i) proportional to its mean weight norm w_i = mean_p ||p||_F over the block's params.

    Blocks are drawn without replacement with torch.multinomial, so after a block is drawn the rest are
    renormalised. The norms are read at every draw (`norms_fn`), so they follow training. (A function
    form of `WeightNormSampler`, which it calls.)
    """

    def draw(n_layers: int, n_active: int, generator: torch.Generator) -> list[int]:
        return list(WeightNormSampler(n_layers, norms_fn).draw(n_layers, n_active, generator))

    return draw


class WeightNormSampler(Sampler):
    """P(i) ∝ mean weight norm (`layers.block_weight_norms`), re-read at each draw; no floor. Draws exactly
    what `weight_norm_sampler` draws for the same generator state and norms."""

    name = "weight_norm"

    def __init__(self, n_blocks, norms_fn: Callable[[], Sequence[float]], options=None):
        super().__init__(n_blocks, options)
        self._norms_fn = norms_fn
        self._last: list[float] | None = None  # norms of the last draw, for probabilities()

    def _refresh(self):
        self._last = _checked_weights(self.name, "block norms", self._norms_fn(), self.n_blocks).tolist()

    def _weights(self):
        if self._last is None:
            return torch.ones(self.n_blocks, dtype=torch.float64)  # before the first draw: nothing read yet
        w = torch.tensor(self._last, dtype=torch.float64)
        return w if w.sum() > 0 else torch.ones_like(w)

    def _state(self):
        return {"last_norms": self._last}

    def _load(self, state):
        self._last = None if state["last_norms"] is None else [float(x) for x in state["last_norms"]]
