"""Which blocks train next: samplers driven by an explicit torch.Generator.

The generator lives on the CPU and is seeded from `seed`, so every rank that starts from the same seed
(or from rank 0's generator state, see FusedLISA) draws the same blocks, and a state_dict resumes the
exact sequence. A sampler returns `n_active` distinct block indices in [0, n_layers).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

SAMPLERS = ("uniform", "weight_norm")

# fn(n_layers, n_active, generator) -> indices
SamplerFn = Callable[[int, int, torch.Generator], Sequence[int]]


def uniform(n_layers: int, n_active: int, generator: torch.Generator) -> list[int]:
    """The paper's rule: n_active distinct blocks, every subset equally likely."""
    return torch.randperm(n_layers, generator=generator)[:n_active].tolist()


def weight_norm_sampler(norms_fn: Callable[[], Sequence[float]]) -> SamplerFn:
    """P(block i) proportional to its mean weight norm w_i = mean_p ||p||_F over the block's params.

    Blocks are drawn without replacement with torch.multinomial, so after a block is drawn the rest are
    renormalised. The norms are read at every draw (`norms_fn`), so they follow training.
    """

    def draw(n_layers: int, n_active: int, generator: torch.Generator) -> list[int]:
        w = torch.tensor(list(norms_fn()), dtype=torch.float64)
        if w.numel() != n_layers:
            raise RuntimeError(f"weight_norm sampler got {w.numel()} norms for {n_layers} blocks")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise RuntimeError(f"weight_norm sampler got invalid block norms {w.tolist()}")
        if w.sum() <= 0:  # all-zero blocks: fall back to uniform weights rather than dividing by zero
            w = torch.ones_like(w)
        return torch.multinomial(w, n_active, replacement=False, generator=generator).tolist()

    return draw


def checked_draw(fn: SamplerFn, n_layers: int, n_active: int, generator: torch.Generator) -> tuple[int, ...]:
    """Call a sampler and verify its answer, so a faulty callable fails loudly and names what it returned."""
    got = fn(n_layers, n_active, generator)
    try:
        idx = [int(i) for i in got]
    except (TypeError, ValueError):
        raise ValueError(f"sampler returned {got!r}; expected a sequence of {n_active} block indices") from None
    if len(idx) != n_active or len(set(idx)) != n_active or any(not 0 <= i < n_layers for i in idx):
        raise ValueError(
            f"sampler returned {got!r}; expected {n_active} distinct block indices in [0, {n_layers})"
        )
    return tuple(sorted(idx))
