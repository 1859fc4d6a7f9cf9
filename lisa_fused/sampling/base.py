"""The Sampler interface and the draw, plus the rules that learn nothing: uniform (LISA) and a callable.

Every sampler is a `Sampler`: callable as ``sampler(n_blocks, n_active, generator)`` (the signature of a
user callable, so `checked_draw` takes either), with `probabilities()`, `describe()`, `state_dict()`.
A draw returns `n_active` distinct block indices in [0, n_blocks), ascending.

- "uniform" (LISA, Pan et al. 2024): every subset of `n_active` blocks equally likely (`uniform`,
  `UniformSampler`).
- a callable fn(n_blocks, n_active, generator) -> indices (`CallableSampler`): `checked_draw` verifies
  its answer, so a faulty callable fails loudly.

The adaptive samplers mix a floor into their probabilities, p_i = floor + (1 - N*floor) * q_i
(`Sampler._with_floor`), so every block keeps a chance of at least `floor` (default 0.1/N) and a block that
looks useless can still be re-measured. `probabilities()` are the weights of the first pick; the
`n_active` blocks are drawn without replacement (torch.multinomial with the explicit generator), so later
picks renormalise over the blocks not yet taken.

Blocks without a trainable parameter (peft `layers_to_transform`, blocks the user froze) are never drawn:
`Sampler.restrict(blocks)` limits every sampler to the blocks that have one (`drawable`); the weights of
the others are 0, the floor is spread over the drawable blocks only (p_i = floor + (1 - M*floor) * q_i
over the M drawable blocks, floor default 0.1/M), and a callable is asked for indices among the drawable
blocks (`CallableSampler`). `draw_active` trains every drawable block, without a draw, when there are no
more of them than `n_active`. The restriction is derived from the model, not saved: the learned state
stays per block of the stack, so a state_dict loads whatever the restriction.

Every rank must draw the same blocks: `Sampler.draw` broadcasts rank 0's learned state before it picks
when torch.distributed is initialised (one small collective per switch, only for samplers that learn),
so float differences between ranks (per-rank losses, reduction order) cannot make ranks diverge.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from .options import SamplerOptions

# fn(n_layers, n_active, generator) -> indices
SamplerFn = Callable[[int, int, torch.Generator], Sequence[int]]


def uniform(n_layers: int, n_active: int, generator: torch.Generator) -> list[int]:
    """The paper's rule: n_active distinct blocks, every subset equally likely."""
    return torch.randperm(n_layers, generator=generator)[:n_active].tolist()


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
        self.drawable: tuple[int, ...] = tuple(range(n_blocks))  # the blocks a draw may pick (restrict())

    def restrict(self, blocks: Sequence[int]) -> None:
        """Draw only from `blocks` (the blocks that have a trainable parameter), ascending distinct indices in
        [0, n_blocks); the others get probability 0. ValueError for a bad list or a floor above 1/len(blocks)."""
        idx = sorted(int(b) for b in blocks)
        if len(set(idx)) != len(idx) or any(not 0 <= b < self.n_blocks for b in idx):
            raise ValueError(f"{self.name} sampler: drawable blocks {list(blocks)} are not distinct blocks in "
                             f"[0, {self.n_blocks})")
        if idx and "floor" in SamplerOptions.APPLIES.get(self.name, ()):
            self.options.floor_for(len(idx))
        self.drawable = tuple(idx)

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
        if not 1 <= n_active <= len(self.drawable):
            raise ValueError(f"n_active={n_active} must be in 1..{len(self.drawable)}, the blocks with a trainable "
                             f"parameter ({list(self.drawable)}); draw_active trains them all when there are fewer")
        # The draw is host work on the CPU generator: a caller's `with torch.device("meta")` (or "cuda")
        # around the optimizer must not move its factory calls.
        with torch.device("cpu"):
            self._refresh()
        if self.shares_state:
            self.broadcast_state()
        with torch.device("cpu"):
            return tuple(sorted(self._pick(self._drawable_weights(), n_active, generator)))

    __call__ = draw

    def _drawable_weights(self) -> torch.Tensor:
        """`_weights()` with 0 for the blocks a draw may not pick."""
        w = self._weights()
        if len(self.drawable) == self.n_blocks:
            return w
        mask = torch.zeros_like(w)
        mask[list(self.drawable)] = 1.0
        return w * mask

    def _pick(self, weights: torch.Tensor, n_active: int, generator: torch.Generator) -> list[int]:
        positive = int((weights > 0).sum())
        if positive < n_active:
            raise ValueError(f"{self.name} sampler has only {positive} blocks with probability > 0 for "
                             f"n_active={n_active}; set sampler_options floor > 0")
        return torch.multinomial(weights, n_active, replacement=False, generator=generator).tolist()

    def probabilities(self) -> list[float] | None:
        """First-pick probability of each block for the next draw (sums to 1; 0 for a block that is not drawable;
        all 0 when none is), or None if unknown."""
        w = self._drawable_weights()
        total = w.sum()
        return (w / total).tolist() if total > 0 else [0.0] * self.n_blocks

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
        """Over the M drawable blocks, p = floor + (1 - M*floor) * q/sum(q) (all-zero q counts as uniform);
        0 for the others. M = N unless restricted (restrict())."""
        if len(self.drawable) == self.n_blocks:
            return self._floored(q)
        out = torch.zeros_like(q)
        if self.drawable:
            idx = list(self.drawable)
            out[idx] = self._floored(q[idx])
        return out

    def _floored(self, q: torch.Tensor) -> torch.Tensor:
        n = q.numel()
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
        if len(self.drawable) == self.n_blocks:
            return uniform(self.n_blocks, n_active, generator)
        return [self.drawable[i] for i in uniform(len(self.drawable), n_active, generator)]


class CallableSampler(Sampler):
    """A user function fn(n_blocks, n_active, generator) -> indices; its probabilities are unknown.

    Restricted to M < N drawable blocks (restrict()), fn is called as fn(M, n_active, generator) and its
    indices count among the drawable blocks, in stack order: index j means block drawable[j]. So a
    function that picks from range(n_blocks) never draws a block without a trainable parameter."""

    def __init__(self, n_blocks, fn: SamplerFn):
        super().__init__(n_blocks)
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def draw(self, n_blocks, n_active, generator):
        if n_blocks != self.n_blocks:
            raise ValueError(f"{self.name} sampler was built for {self.n_blocks} blocks, asked to draw from {n_blocks}")
        if len(self.drawable) == n_blocks:
            return checked_draw(self.fn, n_blocks, n_active, generator)
        return tuple(self.drawable[j] for j in checked_draw(self.fn, len(self.drawable), n_active, generator))

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


def draw_active(sampler: Sampler, n_active: int, generator: torch.Generator) -> tuple[int, ...]:
    """The next active set: every drawable block when there are no more than `n_active` of them (no draw,
    the generator untouched: LISA with gamma >= N is plain AdamW), else `sampler.draw` of `n_active`."""
    if n_active >= len(sampler.drawable):
        return sampler.drawable
    return sampler.draw(sampler.n_blocks, n_active, generator)


def sync_generator_from_rank0(generator: torch.Generator) -> None:
    """Every rank must draw the same blocks: take rank 0's generator state when torch.distributed is
    initialized (one broadcast; nothing otherwise)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    state = [generator.get_state()]
    torch.distributed.broadcast_object_list(state, src=0)
    generator.set_state(state[0])
