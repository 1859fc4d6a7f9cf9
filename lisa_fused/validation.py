"""Checks FusedLISA runs on its arguments before anything about the model changes. Each raises with the bad
value and the fix (torch's wording where torch has one: "Invalid beta parameter at index 0: 1.0")."""
from __future__ import annotations

import torch
from torch import nn

from . import sampling
from .paging import POLICIES


def check_options(model, switch_every, inactive_moments, sampler) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"FusedLISA takes the model (an nn.Module), got {type(model).__name__}")
    if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
        raise ValueError(f"Invalid switch_every: {switch_every!r} (must be an integer >= 1)")
    if inactive_moments not in POLICIES:
        raise ValueError(f"Invalid inactive_moments: {inactive_moments!r}; choose one of {POLICIES}")
    if not callable(sampler) and sampler not in sampling.SAMPLER_NAMES:
        raise ValueError(f"Invalid sampler: {sampler!r}; choose one of {sampling.SAMPLER_NAMES} or pass a callable")


def check_n_active(n_active_layers, layout) -> None:
    n_blocks = layout.num_blocks
    if isinstance(n_active_layers, bool) or not isinstance(n_active_layers, int) or not 1 <= n_active_layers <= n_blocks:
        raise ValueError(f"Invalid n_active_layers: {n_active_layers!r} (must be an integer in 1..{n_blocks}, "
                         f"the number of blocks in {layout.stack_path or 'the stack'})")


def trainable_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}


def device_and_dtype(params):
    """The one device and floating dtype of the trainable params; ValueError naming what was found."""
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
    if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"all trainable parameters must share one floating dtype, found {sorted(map(str, dtypes))}")
    dtype = next(iter(dtypes))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported parameter dtype {dtype}; use float32, bfloat16 or float16")
    return next(iter(devices)), dtype


def check_ddp(model) -> None:
    """Inactive blocks get no gradient: a DDP wrapper must be built to expect that (before FusedLISA, with
    find_unused_parameters=True and no static_graph), or its second backward fails with a cryptic error."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, ddp) and (not model.find_unused_parameters or getattr(model, "static_graph", False)):
        raise ValueError(
            "FusedLISA trains a different set of blocks every switch_every steps, so DistributedDataParallel must "
            "expect parameters without a gradient: wrap the model with DistributedDataParallel(model, "
            "find_unused_parameters=True) (and without static_graph) before constructing FusedLISA; got "
            f"find_unused_parameters={model.find_unused_parameters}, "
            f"static_graph={getattr(model, 'static_graph', False)}")


def refuse_graph_capture() -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # Bias corrections and the switch are host-side per step; a captured graph would replay step 1's.
        raise RuntimeError("FusedLISA.step() cannot be captured in a CUDA graph (torch.cuda.graph / "
                           "mode='reduce-overhead' compile of the step): its per-step bias corrections and "
                           "layer switches are computed on the host; capture the forward/backward only")


def check_loss(loss) -> None:
    """observe_loss takes a float or a 1-element tensor (ValueError / TypeError otherwise)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"observe_loss takes a scalar loss, got a tensor of shape {tuple(loss.shape)}")
    elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"observe_loss takes a float or a 1-element tensor, got {type(loss).__name__}")
