"""The "grad_norm" sampler (GRASS-style, Tian et al. 2026, arXiv 2604.07808): P(i) ∝ score_i^(1/T), the
score an exponential average of the block's measured gradient norm (see `GradNormSampler`).

`GradNormMeter` does the measuring on the device: it adds up the fused kernel's per-segment sums of
squares of the gradients over one interval, read once at the switch (no per-step host sync).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .base import Sampler, _blocks, _power


class GradNormSampler(Sampler):
    """GRASS-style (Tian et al. 2026, arXiv 2604.07808): blocks with larger gradients train more often.

    Measurement (`GradNormMeter`): over one interval of n steps, for each param p of an active block the
    kernel's per-step sums of squares are added up, S_p = sum_t ||g_{p,t}||_2^2, and

        m_b = (1 / |P_b|) * sum_{p in P_b} sqrt(S_p / n)

    is the mean over the block's params of the root-mean-square (over the steps) of ||g_p||_2. The RMS,
    not the arithmetic mean over steps, because sums of squares add across steps and across FSDP2
    shards: one device accumulator, read and reduced once per interval, no per-step host sync.

    Scores (`observe_grad_norms`, once per interval):
        measured block:   s_b <- m_b the first time, then s_b <- d*s_b + (1-d)*m_b    (d = ema_decay)
        other seen block: s_b <- s_b + stale_decay * (mean_seen - s_b)   (old evidence fades to the mean)
        never-seen block: s_b = prior ("max" / "mean" of the seen scores, or a number); all unseen: uniform
    Probabilities: p_b = floor + (1 - N*floor) * s_b^(1/T) / sum_c s_c^(1/T).
    """

    name = "grad_norm"
    shares_state = True

    def __init__(self, n_blocks, options=None):
        super().__init__(n_blocks, options)
        self.options.floor_for(n_blocks)  # validate now, not at the first draw
        self.scores: list[float | None] = [None] * n_blocks
        self.intervals_seen = [0] * n_blocks

    def observe_grad_norms(self, active_blocks, norms):
        idx = _blocks(self.n_blocks, active_blocks, "observe_grad_norms")
        vals = [float(v) for v in norms]
        if len(vals) != len(idx) or any(not math.isfinite(v) or v < 0 for v in vals):
            raise ValueError(f"observe_grad_norms: norms {list(norms)} must be {len(idx)} finite values >= 0, "
                             f"one per active block {idx}")
        if not idx:  # nothing measured (GradNormMeter.read after no step)
            return
        d = self.options.ema_decay
        for b, v in zip(idx, vals):
            old = self.scores[b]
            self.scores[b] = v if old is None else d * old + (1.0 - d) * v
            self.intervals_seen[b] += 1
        seen = [s for s in self.scores if s is not None]
        mean = sum(seen) / len(seen)
        for b, s in enumerate(self.scores):
            if s is not None and b not in idx:
                self.scores[b] = s + self.options.stale_decay * (mean - s)

    def effective_scores(self) -> list[float]:
        """Scores with the prior filled in for never-seen blocks (all equal while nothing is seen)."""
        seen = [s for s in self.scores if s is not None]
        if not seen:
            return [1.0] * self.n_blocks
        prior = self.options.prior
        fill = max(seen) if prior == "max" else sum(seen) / len(seen) if prior == "mean" else float(prior)
        return [fill if s is None else s for s in self.scores]

    def _weights(self):
        s = torch.tensor(self.effective_scores(), dtype=torch.float64)
        return self._with_floor(_power(s, self.options.temperature))

    def _state(self):
        return {"scores": list(self.scores), "intervals_seen": list(self.intervals_seen)}

    def _load(self, state):
        self.scores = [None if s is None else float(s) for s in state["scores"]]
        self.intervals_seen = [int(c) for c in state["intervals_seen"]]


class GradNormMeter:
    """Device-side accumulator of the fused kernel's per-segment grad sums of squares over one interval.

    segment_blocks: for each kernel segment (one per packed param, in the kernel's segment order), the
    block index that param belongs to, or None for an always-trained param.
    `add(sumsq)` each step after the kernel (sumsq: [S] fp32 on the buffers' device, ||g||_2^2 of the
    unscaled gradient of each segment): one in-place add, no host sync. At the switch, under FSDP2 call
    `all_reduce_()` (shards' sums of squares add up to the full tensor's), then `read(active_blocks)`
    (one host transfer) and hand the result to `Sampler.observe_grad_norms`; then `reset(...)` with the
    new segment order.
    """

    def __init__(self, segment_blocks: Sequence[int | None], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset(segment_blocks)

    def reset(self, segment_blocks: Sequence[int | None]) -> None:
        self.segment_blocks = tuple(None if b is None else int(b) for b in segment_blocks)
        self.sumsq = torch.zeros(len(self.segment_blocks), dtype=torch.float32, device=self.device)
        self.device = self.sumsq.device  # "cuda" -> "cuda:0", as tensors report it
        self.n_steps = 0

    def add(self, sumsq: torch.Tensor) -> None:
        if sumsq.shape != self.sumsq.shape or sumsq.dtype != torch.float32 or sumsq.device != self.device:
            raise ValueError(f"GradNormMeter.add: sumsq must be float32 of shape {tuple(self.sumsq.shape)} on "
                             f"{self.device}, got {sumsq.dtype} {tuple(sumsq.shape)} on {sumsq.device}")
        self.sumsq.add_(sumsq)
        self.n_steps += 1

    def kernel_buffer(self) -> torch.Tensor:
        """Count one step and return the accumulator itself, for a kernel that ADDS each segment's sum of
        squares into its `grad_sumsq` (kernels/contract.py): no per-step buffer, zeroing or add."""
        self.n_steps += 1
        return self.sumsq

    def to(self, device) -> None:
        """Follow a model moved to `device`, keeping what this interval measured."""
        self.sumsq = self.sumsq.to(device)
        self.device = self.sumsq.device

    def all_reduce_(self, group=None) -> None:
        """Sum the accumulators over ranks: for sharded params (FSDP2). Under DDP every rank already holds
        the same averaged grads, so skip it (summing would multiply by the world size)."""
        torch.distributed.all_reduce(self.sumsq, op=torch.distributed.ReduceOp.SUM, group=group)

    def read(self, active_blocks: Sequence[int]) -> tuple[list[int], list[float]]:
        """(active_blocks, m_b): per block, the mean over its segments of sqrt(sum of squares / n_steps);
        0.0 for a block without segments. ([], []) when no step was added (nothing measured)."""
        if self.n_steps == 0:
            return [], []
        vals = self.sumsq.double().cpu().tolist()
        per: dict[int, list[float]] = {}
        for b, v in zip(self.segment_blocks, vals):
            if b is not None:
                per.setdefault(b, []).append(math.sqrt(max(v, 0.0) / self.n_steps))
        blocks = [int(b) for b in active_blocks]
        return blocks, [sum(per[b]) / len(per[b]) if per.get(b) else 0.0 for b in blocks]

    def state_dict(self) -> dict:
        return {"segment_blocks": list(self.segment_blocks), "sumsq": self.sumsq.cpu().clone(),
                "n_steps": self.n_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved interval. The saved segments may come in another block order (a resumed
        optimizer can put the same blocks in other slots): each block's segments keep their order within
        the block, so they are matched block by block."""
        saved = [None if b is None else int(b) for b in state["segment_blocks"]]
        queues: dict[int | None, list[int]] = {}
        for j, b in enumerate(saved):
            queues.setdefault(b, []).append(j)
        if sorted(map(str, saved)) != sorted(map(str, self.segment_blocks)):
            raise ValueError(f"GradNormMeter state is for segments {saved}, this meter has {list(self.segment_blocks)}")
        order = [queues[b].pop(0) for b in self.segment_blocks]
        self.sumsq.copy_(state["sumsq"].reshape(-1)[order])
        self.n_steps = int(state["n_steps"])
