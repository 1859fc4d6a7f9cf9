"""What an optimizer keeps, in bytes: the tensors inside its state, however they are nested, counted once
per storage. Shared by the bench (real tensors) and the planner (fake tensors), so both count the same way.

`leaves(obj)` walks dicts, lists, tuples and plain objects (GaLore keeps its projection matrix on a
`GaLoreProjector` in the state) down to plain tensors; a tensor subclass that stores its data in inner
tensors (torchao's `OptimState8bit`: uint8 codes, fp32 block scales and the code map, behind a float32
`shape`) is opened with `__tensor_flatten__`, since its own `element_size()` is that of the dtype it
presents, not of what it holds. `storage_bytes` counts each storage once, whole: a view keeps its whole
base alive (GaLore's `Vh[:rank]` slice of an SVD keeps all of `Vh`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_MAX_DEPTH = 6  # state dict -> param state -> projector -> its attributes: 4 levels are enough


def leaves(obj, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Plain tensors inside `obj` (a tensor, a container, an object with attributes), subclasses opened."""
    if _depth > _MAX_DEPTH or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from leaves(getattr(obj, name), _depth + 1)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v, _depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from leaves(v, _depth + 1)
    elif isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
        return  # a reference back to the model or an optimizer: not state
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            yield from leaves(v, _depth + 1)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    """{device type ("cpu", "cuda", "meta"...): bytes} of the distinct storages of `tensors`."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        key = storage._cdata  # one per allocation, shared by views; works on fake tensors too
        if key in seen:
            continue
        seen.add(key)
        out[t.device.type] = out.get(t.device.type, 0) + storage.nbytes()
    return out


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The plain tensors in `optimizer.state` (the torch.optim convention: per-parameter dicts)."""
    return list(leaves(dict(optimizer.state)))


def grad_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The `.grad` of every parameter of `model` that has one (tied parameters once)."""
    return [p.grad for p in model.parameters() if p.grad is not None]
