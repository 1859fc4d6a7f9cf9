"""Which blocks train next: samplers driven by an explicit torch.Generator.

The generator lives on the CPU and is seeded from `seed`, so every rank that starts from the same seed
(or from rank 0's generator state, see FusedLISA) draws the same blocks, and a state_dict resumes the
exact sequence. A sampler returns `n_active` distinct block indices in [0, n_layers).

Samplers
--------
Every sampler is a `Sampler`: callable as ``sampler(n_blocks, n_active, generator)`` (the signature of a
user callable, so `checked_draw` takes either), with `probabilities()`, `describe()`, `state_dict()`.

- "uniform" (LISA, Pan et al. 2024): every subset of `n_active` blocks equally likely.
- "weight_norm": P(block i) proportional to its mean weight norm, read from the live weights at each draw.
- "grad_norm" (GRASS-style, Tian et al. 2026, arXiv 2604.07808): P(i) ∝ score_i^(1/temperature), the
  score an exponential average of the block's measured gradient norm (see `GradNormSampler`).
- "outlier" (OwLore-style, Li et al. 2024, arXiv 2405.18380): P(i) ∝ the fraction of outlier entries in
  the block's 2-D weights (see `block_outlier_ratios`).
- "loss_feedback" (IST-style, Yao et al. 2024): a block's score rises when the smoothed training loss
  falls faster than average while it is active; P = softmax(scores / temperature) (see `LossFeedbackSampler`).

The adaptive three mix a floor into their probabilities, p_i = floor + (1 - N*floor) * q_i, so every block
keeps a chance of at least `floor` (default 0.1/N) and a block that looks useless can still be re-measured.
`probabilities()` are the weights of the first pick; the `n_active` blocks are drawn without replacement
(torch.multinomial with the explicit generator), so later picks renormalise over the blocks not yet taken.

Every rank must draw the same blocks: `Sampler.draw` broadcasts rank 0's learned state before it picks
when torch.distributed is initialised (one small collective per switch, only for samplers that learn),
so float differences between ranks (per-rank losses, reduction order) cannot make ranks diverge.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from .layers import host_floats

logger = logging.getLogger("lisa_fused")

SAMPLERS = ("uniform", "weight_norm")  # the samplers that learn nothing
ADAPTIVE_SAMPLERS = ("grad_norm", "outlier", "loss_feedback")
SAMPLER_NAMES = SAMPLERS + ADAPTIVE_SAMPLERS

# fn(n_layers, n_active, generator) -> indices
SamplerFn = Callable[[int, int, torch.Generator], Sequence[int]]


def uniform(n_layers: int, n_active: int, generator: torch.Generator) -> list[int]:
    """The paper's rule: n_active distinct blocks, every subset equally likely."""
    return torch.randperm(n_layers, generator=generator)[:n_active].tolist()


def weight_norm_sampler(norms_fn: Callable[[], Sequence[float]]) -> SamplerFn:
    """P(block i) proportional to its mean weight norm w_i = mean_p ||p||_F over the block's params.

    Blocks are drawn without replacement with torch.multinomial, so after a block is drawn the rest are
    renormalised. The norms are read at every draw (`norms_fn`), so they follow training. (A function
    form of `WeightNormSampler`, which it calls.)
    """

    def draw(n_layers: int, n_active: int, generator: torch.Generator) -> list[int]:
        return list(WeightNormSampler(n_layers, norms_fn).draw(n_layers, n_active, generator))

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


# -- options -------------------------------------------------------------------------------------------


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


# -- the interface ---------------------------------------------------------------------------------------


class Sampler:
    """Base class: draws `n_active` distinct blocks out of `n_blocks` from first-pick weights.

    Subclasses implement `_weights()` (float64 [N], >= 0, what the next draw uses) and, if they learn,
    the observe hooks and `_state()/_load()` of plain Python values (floats, ints, lists, None), so a
    state_dict loads under ``torch.load(weights_only=True)``.
    """

    name = "sampler"
    shares_state = False  # True: draw() first takes rank 0's state (it learns, or reads reductions)

    def __init__(self, n_blocks: int, options: SamplerOptions | None = None):
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
            raise ValueError(f"n_blocks must be an integer >= 1, got {n_blocks!r}")
        self.n_blocks = n_blocks
        self.options = options or SamplerOptions()

    # hooks (no-ops unless the sampler uses them)
    def observe_grad_norms(self, active_blocks: Sequence[int], norms: Sequence[float]) -> None:
        """End of an interval: each active block's measured grad norm (see `GradNormMeter.read`)."""

    def observe_loss(self, loss, active_blocks: Sequence[int]) -> None:
        """One training step's loss (a float, or a 1-element tensor: kept on its device, read at the switch)."""

    def _refresh(self) -> None:
        """Bring the weights up to date at a switch (close an interval, re-read live weights)."""

    def _weights(self) -> torch.Tensor:
        raise NotImplementedError

    # drawing
    def draw(self, n_blocks: int, n_active: int, generator: torch.Generator) -> tuple[int, ...]:
        """`n_active` distinct blocks, ascending. Call at every switch, on every rank (it may broadcast)."""
        if n_blocks != self.n_blocks:
            raise ValueError(f"{self.name} sampler was built for {self.n_blocks} blocks, asked to draw from {n_blocks}")
        if not 1 <= n_active <= n_blocks:
            raise ValueError(f"n_active={n_active} must be in 1..{n_blocks}")
        # The draw is host work on the CPU generator: a caller's `with torch.device("meta")` (or "cuda")
        # around the optimizer must not move its factory calls.
        with torch.device("cpu"):
            self._refresh()
        if self.shares_state:
            self.broadcast_state()
        with torch.device("cpu"):
            return tuple(sorted(self._pick(self._weights(), n_active, generator)))

    __call__ = draw

    def _pick(self, weights: torch.Tensor, n_active: int, generator: torch.Generator) -> list[int]:
        positive = int((weights > 0).sum())
        if positive < n_active:
            raise ValueError(f"{self.name} sampler has only {positive} blocks with probability > 0 for "
                             f"n_active={n_active}; set sampler_options floor > 0")
        return torch.multinomial(weights, n_active, replacement=False, generator=generator).tolist()

    def probabilities(self) -> list[float] | None:
        """First-pick probability of each block for the next draw (sums to 1), or None if unknown."""
        w = self._weights()
        return (w / w.sum()).tolist()

    def describe(self) -> str:
        """One line for repr(opt) and logs: name, key options, probabilities."""
        p = self.probabilities()
        probs = "?" if p is None else "[" + " ".join(f"{x:.3f}" for x in p) + "]"
        shown = {k: getattr(self.options, k) for k in SamplerOptions.APPLIES.get(self.name, ())}
        if "floor" in shown:
            shown["floor"] = f"{self.options.floor_for(self.n_blocks):.4g}"
        opts = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.name}({opts}) p={probs}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # state
    def state_dict(self) -> dict:
        """Plain Python values: {"name", "n_blocks", ...sampler state}."""
        return {"name": self.name, "n_blocks": self.n_blocks, **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name or state.get("n_blocks") != self.n_blocks:
            raise ValueError(f"sampler state is for {state.get('name')!r} over {state.get('n_blocks')} blocks, "
                             f"this sampler is {self.name!r} over {self.n_blocks}")
        self._load(state)

    def _state(self) -> dict:
        return {}

    def _load(self, state: Mapping[str, Any]) -> None:
        pass

    def broadcast_state(self, src: int = 0, group=None) -> None:
        """Under torch.distributed, replace this rank's state with rank `src`'s (a no-op otherwise)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        box = [self.state_dict()]
        torch.distributed.broadcast_object_list(box, src=src, group=group)
        self.load_state_dict(box[0])

    def _with_floor(self, q: torch.Tensor) -> torch.Tensor:
        """p = floor + (1 - N*floor) * q/sum(q); all-zero q counts as uniform."""
        n = self.n_blocks
        floor = self.options.floor_for(n)
        total = q.sum()
        q = q / total if total > 0 else torch.full_like(q, 1.0 / n)
        return floor + (1.0 - n * floor) * q


class UniformSampler(Sampler):
    """The paper's rule; draws exactly what `uniform` draws for the same generator state."""

    name = "uniform"

    def _weights(self):
        return torch.ones(self.n_blocks, dtype=torch.float64)

    def _pick(self, weights, n_active, generator):
        return uniform(self.n_blocks, n_active, generator)


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


class CallableSampler(Sampler):
    """A user function fn(n_blocks, n_active, generator) -> indices; its probabilities are unknown."""

    def __init__(self, n_blocks, fn: SamplerFn):
        super().__init__(n_blocks)
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def draw(self, n_blocks, n_active, generator):
        return checked_draw(self.fn, n_blocks, n_active, generator)

    __call__ = draw

    def probabilities(self):
        return None

    def describe(self):
        return f"{self.name} (callable) p=?"

    def load_state_dict(self, state):
        pass  # a callable keeps its own state, if any


def _checked_weights(sampler: str, what: str, values: Sequence[float], n_blocks: int) -> torch.Tensor:
    w = torch.tensor(list(values), dtype=torch.float64)
    if w.numel() != n_blocks:
        raise RuntimeError(f"{sampler} sampler got {w.numel()} {what} for {n_blocks} blocks")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise RuntimeError(f"{sampler} sampler got invalid {what} {w.tolist()}")
    return w


def _power(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores^(1/T), scaled by the max first so that small T cannot overflow."""
    top = scores.max()
    return (scores / top) ** (1.0 / temperature) if top > 0 else torch.ones_like(scores)


def _blocks(n_blocks: int, active_blocks: Sequence[int], what: str) -> list[int]:
    idx = [int(b) for b in active_blocks]
    if len(set(idx)) != len(idx) or any(not 0 <= b < n_blocks for b in idx):
        raise ValueError(f"{what}: active_blocks {list(active_blocks)} are not distinct blocks in [0, {n_blocks})")
    return idx


# -- GRASS-style: measured gradient norms ------------------------------------------------------------------


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


# -- OwLore-style: outlier ratio of the weights -----------------------------------------------------------


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


# -- IST-style: loss feedback -------------------------------------------------------------------------------


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


# -- factory ------------------------------------------------------------------------------------------------


def build_sampler(sampler: str | SamplerFn, layout, options: SamplerOptions | Mapping[str, Any] | None = None) -> Sampler:
    """The Sampler for FusedLISA's `sampler=` / `sampler_options=` over `layout` (a layers.ModelLayout).

    Raises ValueError for an unknown name or bad options (naming the value and the valid range).
    """
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
        from .layers import block_weight_norms
        return WeightNormSampler(n, lambda: block_weight_norms(layout), opts)
    if sampler == "grad_norm":
        return GradNormSampler(n, opts)
    if sampler == "outlier":
        return OutlierSampler(n, lambda: block_outlier_ratios(layout.blocks, opts.outlier_multiplier), opts)
    return LossFeedbackSampler(n, opts)
