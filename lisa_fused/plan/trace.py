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


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the C++ StorageImpl: one per allocation, shared by views


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of tensors created while the mode is active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, object] = {}

    def preexisting(self, tensors) -> None:
        """Mark storages that exist before the step (weights, state) as already paid for."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._refs.setdefault(_key(t), None)

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


def trace_step(model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int,
               optimizer: torch.optim.Optimizer | None = None) -> int:
    """Peak bytes allocated above what exists at the start by one forward (logits and loss included),
    backward and, when given, `optimizer.step()` + `zero_grad()` of a fake model.

    Existing `.grad`s (FusedLISA's packed grads) are accumulated into and not counted; grads that
    backward creates (torch optimizers after zero_grad(set_to_none=True)) are counted while they live.
    A torch optimizer's lazily created state is created before the trace by one step on fake grads, so
    the traced step is a steady-state step (its state is counted by the caller, from `optimizer.state`).
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
        tracker.preexisting(t for st in optimizer.state.values() for t in st.values())
    with tracker:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        del loss
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak
