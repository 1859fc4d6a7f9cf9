"""The "loss_feedback" sampler (IST-style, Yao et al. 2024): a block's score rises when the smoothed
training loss falls faster than average while it is active; P = softmax(scores / temperature) (see
`LossFeedbackSampler`). It is fed by ``opt.observe_loss(loss)`` or ``opt.step(closure)``.
"""
from __future__ import annotations

import logging
import math

import torch

from .base import Sampler, _blocks

logger = logging.getLogger("lisa_fused")


class LossFeedbackSampler(Sampler):
    """IST-style (Yao et al. 2024): blocks trained while the loss fell faster than usual get more likely.

    Each step `observe_loss(loss, active_blocks)` records the loss. At each switch (`draw`) the interval
    just ended (n losses after its start, active set A) is scored:
        smoothed loss   L <- beta*L + (1-beta)*loss per loss, in order (L starts at the very first loss)
        reward          R = (L_start - L_end) / n        smoothed-loss decrease per step of this interval
        advantage       a = R - Rbar                     Rbar: running average of earlier intervals' R
                                                         (first interval: a = 0, Rbar = R)
        scale           c <- d*c + (1-d)*|a|             (c = |a| the first time a != 0; d = ema_decay)
        scores          H_b += score_lr * a / c for b in A, then H -= mean(H)   (|a/c| <= 1/(1-d))
        baseline        Rbar <- d*Rbar + (1-d)*R
    This is the gradient-bandit rule (Sutton & Barto 2018, sec. 2.8: preferences move by the reward minus
    a running-average baseline; probabilities are their softmax), with the reward made unit-free by c.
    Probabilities: p = floor + (1 - N*floor) * softmax(H / T).

    The smoothing lags by about 1/(1-beta) steps: keep switch_every well above that. Tensor losses stay
    on their device until the switch (or every 256 steps): no per-step host sync. Non-finite losses are
    skipped with a warning; an interval without a loss changes nothing (warned once).
    """

    name = "loss_feedback"
    shares_state = True
    _FOLD_EVERY = 256  # pending losses read to the host at least this often (bounded memory)

    def __init__(self, n_blocks, options=None):
        super().__init__(n_blocks, options)
        self.options.floor_for(n_blocks)
        self.scores = [0.0] * n_blocks
        self.loss_ema: float | None = None  # L at the start of the current interval
        self.baseline: float | None = None
        self.scale: float | None = None
        self.intervals = 0  # intervals that updated the scores
        self._run: float | None = None  # L after this interval's losses so far
        self._n = 0  # losses in this interval after its start
        self._pending: list = []  # losses not yet folded into _run (floats or 0-dim tensors)
        self._interval_blocks: list[int] | None = None
        self._warned_empty = False

    def observe_loss(self, loss, active_blocks):
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"observe_loss takes a scalar loss, got a tensor of shape {tuple(loss.shape)}")
            loss = loss.detach().reshape(())
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"observe_loss takes a float or a 1-element tensor, got {type(loss).__name__}")
        idx = sorted(_blocks(self.n_blocks, active_blocks, "observe_loss"))
        if self._interval_blocks is None:
            self._interval_blocks = idx
        elif idx != self._interval_blocks:
            raise ValueError(f"observe_loss: active_blocks {idx} changed within an interval that began with "
                             f"{self._interval_blocks}; the sampler's draw() must run at every switch")
        self._pending.append(loss)
        if len(self._pending) >= self._FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """Read pending losses (one host transfer for the tensors) into the running smoothed loss."""
        tensors = [x for x in self._pending if isinstance(x, torch.Tensor)]
        host = iter(torch.stack([t.double() for t in tensors]).cpu().tolist() if tensors else [])
        losses = [next(host) if isinstance(x, torch.Tensor) else float(x) for x in self._pending]
        self._pending = []
        beta = self.options.loss_smoothing
        bad = 0
        for x in losses:
            if not math.isfinite(x):
                bad += 1
            elif self.loss_ema is None:  # the very first loss starts the average; it is not a step of decrease
                self.loss_ema = x
            else:
                self._run = beta * (self.loss_ema if self._run is None else self._run) + (1.0 - beta) * x
                self._n += 1
        if bad:
            logger.warning("loss_feedback sampler: skipped %d non-finite losses", bad)

    def _refresh(self):
        """Close the interval that just ended and update the scores."""
        self._fold()
        blocks, n = self._interval_blocks, self._n
        self._interval_blocks = None
        if n == 0:
            if blocks is not None and self.intervals > 0 and not self._warned_empty:
                logger.warning("loss_feedback sampler: an interval ended without a finite loss after its start; "
                               "pass step(closure) or call observe_loss every step (scores unchanged)")
                self._warned_empty = True
            return
        reward = (self.loss_ema - self._run) / n
        self.loss_ema, self._run, self._n = self._run, None, 0
        d = self.options.ema_decay
        adv = 0.0 if self.baseline is None else reward - self.baseline
        self.baseline = reward if self.baseline is None else d * self.baseline + (1.0 - d) * reward
        if adv != 0.0:
            self.scale = abs(adv) if self.scale is None else d * self.scale + (1.0 - d) * abs(adv)
            step = self.options.score_lr * adv / self.scale
            for b in blocks:
                self.scores[b] += step
            mean = sum(self.scores) / self.n_blocks
            self.scores = [s - mean for s in self.scores]
        self.intervals += 1

    def _weights(self):
        h = torch.tensor(self.scores, dtype=torch.float64) / self.options.temperature
        return self._with_floor(torch.softmax(h, dim=0))

    def _state(self):
        self._fold()
        return {"scores": list(self.scores), "loss_ema": self.loss_ema, "baseline": self.baseline,
                "scale": self.scale, "intervals": self.intervals, "run": self._run, "n": self._n,
                "interval_blocks": self._interval_blocks}

    def _load(self, state):
        self.scores = [float(s) for s in state["scores"]]
        self.loss_ema, self.baseline, self.scale, self._run = (
            None if state[k] is None else float(state[k]) for k in ("loss_ema", "baseline", "scale", "run"))
        self.intervals, self._n, self._pending = int(state["intervals"]), int(state["n"]), []
        ib = state["interval_blocks"]
        self._interval_blocks = None if ib is None else [int(b) for b in ib]
