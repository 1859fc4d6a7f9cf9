"""Bytes of one training step, traced with fake tensors (nothing is allocated, nothing computed).

`AllocationTracker` is a TorchDispatchMode that sees every aten op's outputs: an output whose storage
it has not seen is a new allocation (its storage's nbytes is added to the live count); a weakref on
the storage subtracts it again when the storage dies, as torch's own
`torch.distributed._tools.mem_tracker` does. Views share their base's storage, so they cost nothing;
storages that existed before the trace (weights, packed buffers, optimizer state) are registered with
`preexisting()` and never counted. The peak of the live count is the step's peak above what existed.
Allocator rounding and fragmentation are not modelled (the CUDA caching allocator rounds blocks to
512 bytes; a CPU malloc keeps freed blocks): the planner predicts live bytes.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .kept import state_tensors


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the C++ StorageImpl: one per allocation, shared by views


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of tensors created while the mode is active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.forward = False                # the first forward is running (trace_events)
        self.event = "pre"                   # where in the step we are (see trace_events)
        self.events: dict[object, int] = {}  # event -> peak live bytes while in it
        self._refs: dict[int, object] = {}

    def enter(self, event) -> None:
        """Attribute what follows to `event`; what is live on entry counts toward its peak."""
        self.event = event
        self.events[event] = max(self.events.get(event, 0), self.live)

    def preexisting(self, tensors) -> None:
        """Mark storages that exist before the step (weights, state) as already paid for."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._refs.setdefault(_key(t), None)

    def baseline(self, tensors) -> None:
        """Mark storages alive at the start of a measurement on REAL tensors as not counted, like
        `preexisting()`, but watched: when one is freed during the measurement (FusedLISA moves the
        params it binds into its packed buffer and frees their old storages) its bytes are subtracted
        from `live`, which can then go below zero. So `peak` is the peak of live tensor bytes above the
        start, the same baseline semantics as a resident-set meter. Storages already known (seen
        allocated or registered) are left as they are."""
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = _key(t)
            if key in self._refs:
                continue
            storage = t.untyped_storage()
            self._refs[key] = weakref.ref(storage, self._freed(key, storage.nbytes()))

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _key(t)
            if key in self._refs:
                continue
            storage = t.untyped_storage()
            n = storage.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            self.events[self.event] = max(self.events.get(self.event, 0), self.live)
            self._refs[key] = weakref.ref(storage, self._freed(key, n))
        return out

    def _freed(self, key: int, n: int):
        def callback(_ref):
            if self._refs.pop(key, None) is not None:
                self.live -= n
        return callback


def fakeify(model: torch.nn.Module, device: str) -> None:
    """Replace a meta model's parameters and buffers by fake tensors on `device`, in place (call inside
    a FakeTensorMode). Tied parameters stay tied; requires_grad flags are kept."""
    memo: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    fake = torch.empty(p.shape, dtype=p.dtype, device=device)
                    memo[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def _first_tensor(args, kwargs):
    for t in (kwargs.get("hidden_states"), *args):
        if isinstance(t, torch.Tensor):
            return t
    return None


def _mark_blocks(model: torch.nn.Module, tracker: AllocationTracker, layers) -> list:
    """Hooks that tell `tracker` which block the step is in: ("fwd", i) from block i's forward on,
    "head" after the last block, ("bwd", i) once the grad of block i's output exists (its backward
    starts), "post" once the grad of block 0's input exists (the embedding's backward). Forward hooks
    act only in the first forward: gradient checkpointing re-runs blocks inside the backward."""
    from ..layers import find_layout

    stack = find_layout(model, layers).stack
    handles = []
    for i, block in enumerate(stack):
        def pre(module, args, kwargs, i=i):
            if tracker.forward:
                tracker.enter(("fwd", i))
                x = _first_tensor(args, kwargs)
                if i == 0 and x is not None and x.requires_grad:
                    x.register_hook(lambda g: tracker.enter("post"))

        def post(module, args, kwargs, out, i=i):
            if tracker.forward:
                tracker.enter("head")
                y = out if isinstance(out, torch.Tensor) else _first_tensor(out, {})
                if y is not None and y.requires_grad:
                    y.register_hook(lambda g, i=i: tracker.enter(("bwd", i)))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    return handles


def trace_events(model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int,
                 optimizer: torch.optim.Optimizer | None = None, layers=None, kept=None) -> dict:
    """Peak bytes allocated above what exists at the start, per event of one forward (logits and loss
    included), backward and, when given, `optimizer.step()` + `zero_grad()` of a fake model.

    Events: "pre" (embedding), ("fwd", i) (block i's forward), "head" (norm, LM head, loss and their
    backward), ("bwd", i) (block i's backward, its recomputation under checkpointing included), "post"
    (the embedding's backward), "step". The step's peak is the largest value.

    Existing `.grad`s (FusedLISA's packed grads) are accumulated into and not counted; grads that
    backward creates (torch optimizers after zero_grad(set_to_none=True)) are counted while they live.
    A torch optimizer's lazily created state is created before the trace by one step on fake grads, so
    the traced step is a steady-state step (its state is counted by the caller, from `optimizer.state`).
    `layers`: the block stack as FusedLISA's `layers=` takes it (None: detected). `kept`: a callable
    returning the tensors the optimizer keeps, for an optimizer that keeps them outside `.state` (BAdam's
    masters and its wrapped AdamW's state); default the tensors in `optimizer.state`.
    """
    params = list(model.parameters())
    device = params[0].device
    if optimizer is not None:
        for p in params:
            if p.requires_grad:
                p.grad = torch.empty_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    x = torch.empty(batch_size, seq_len, dtype=torch.long, device=device)
    tracker = AllocationTracker()
    tracker.preexisting(params)
    tracker.preexisting(p.grad for p in params if p.grad is not None)
    tracker.preexisting(model.buffers())
    if optimizer is not None:
        tracker.preexisting(kept() if kept is not None else state_tensors(optimizer))
    handles = _mark_blocks(model, tracker, layers)
    tracker.forward = True
    try:
        with tracker:
            loss = model(input_ids=x, labels=x).loss
            tracker.forward = False
            loss.backward()
            del loss
            if optimizer is not None:
                tracker.enter("step")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return tracker.events


def trace_step(model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int,
               optimizer: torch.optim.Optimizer | None = None) -> int:
    """The step's peak: the largest of `trace_events` (same arguments)."""
    return max(trace_events(model, batch_size, seq_len, vocab_size, optimizer).values())


def roles(events: dict, kinds: list[str]) -> dict:
    """`trace_events` by role, for extrapolation in the number of blocks. `kinds[i]`: block i's kind
    ("frozen", "trainable"); blocks of a kind form one run. A block event becomes the role
    "fwd|bwd <kind> bottom|top" when the block ends its run (a one-block run is both); events inside
    a run are left out: live bytes inside block i are affine in i (i blocks of saved activations below,
    the grads of the blocks above), so the largest sits at an end of the run."""
    out: dict[str, int] = {}
    for key, value in events.items():
        names = [key]
        if isinstance(key, tuple):
            phase, i = key
            names = [f"{phase} {kinds[i]} bottom"] * (i == 0 or kinds[i - 1] != kinds[i])
            names += [f"{phase} {kinds[i]} top"] * (i == len(kinds) - 1 or kinds[i + 1] != kinds[i])
        for name in names:
            out[name] = max(out.get(name, 0), value)
    return out


def extrapolated_roles(base: dict, deltas: list[tuple[dict, int]]) -> dict:
    """Each role's peak at a deeper model, from the roles of traced shallow ones: every role's peak is
    affine in the number of blocks of each kind, so role r at `base` plus `count` times (r at a trace
    with one more block of a kind - r at `base`), summed over `deltas` [(roles one block deeper, count)].
    RuntimeError when the traces do not have the same roles."""
    for other, _ in deltas:
        if other.keys() != base.keys():
            raise RuntimeError(f"traces of different depth have different events: {sorted(base)} vs "
                               f"{sorted(other)}; the block stack is not uniform enough to extrapolate")
    return {k: v + sum(n * (other[k] - v) for other, n in deltas) for k, v in base.items()}


def extrapolate(base: dict, deltas: list[tuple[dict, int]]) -> int:
    """The step's peak at the deeper model: the largest of `extrapolated_roles`."""
    return max(extrapolated_roles(base, deltas).values())


ROLE_WORDS = {"pre": "embedding", "head": "LM head + loss", "post": "embedding backward", "step": "optimizer step"}


def peak_role(base: dict, deltas: list[tuple[dict, int]]) -> str:
    """Where in the step the extrapolated peak sits, in words: "optimizer step", "LM head + loss",
    "backward, top trainable block"..."""
    roles_at = extrapolated_roles(base, deltas)
    role = max(roles_at, key=roles_at.get)
    if role in ROLE_WORDS:
        return ROLE_WORDS[role]
    phase, kind, end = role.split()
    return f"{'forward' if phase == 'fwd' else 'backward'}, {end} {kind} block"
