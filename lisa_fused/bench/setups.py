"""`Setup`: one benchmarked method, ready to train: the model, its optimizer, and how to read what the
optimizer keeps. methods.py and peers.py build them; run.py trains them."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..plan import kept as kept_bytes


@dataclass
class Setup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    describe: str                       # one line for the report: what exactly this method runs
    backend: str = "torch"              # the kernel that ran; "<name> FALLBACK (<why>)" when not the best one
    kept: Callable[[], Iterable[torch.Tensor]] | None = None  # what the optimizer keeps (None: its .state)
    on_step_begin: Callable[[int], None] | None = None  # run before step i's forward (published LISA's switch)
    switch_every: int | None = None     # K: a switch lands in step K-1 (FusedLISA) or K (published); run.py splits

    def trainable_params(self) -> int:
        """Parameters trained at one time (for LISA: gamma blocks plus the always-trained ones)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_bytes(self) -> tuple[int, int]:
        """(bytes on the model's device, bytes elsewhere, i.e. on the host) of what the optimizer keeps
        between steps, grads not included (`grad_bytes` counts those the same way for every method).

        FusedLISA: its own `memory_stats()` ("device_bytes", "host_bytes"). Every other optimizer: the
        distinct storages of the tensors it keeps (`kept()`, default the tensors in `optimizer.state`,
        nested structures and quantized tensor subclasses opened: lisa_fused.plan.kept), by device.
        """
        opt = self.optimizer
        if self.kept is None and hasattr(opt, "memory_stats"):
            stats = opt.memory_stats()
            return int(stats["device_bytes"]), int(stats["host_bytes"])
        tensors = list(self.kept()) if self.kept is not None else kept_bytes.state_tensors(opt)
        by_type = kept_bytes.storage_bytes(tensors)
        on_device = by_type.pop(_device_type(self.model), 0)
        return on_device, sum(by_type.values())

    def grad_bytes(self) -> int:
        """Bytes of the `.grad` of the model's parameters right now (distinct storages), for every method
        the same walk of `model.parameters()`. Read after backward, before step(): BAdam moves the grads to
        its fp32 masters inside step() and frees them there."""
        return sum(kept_bytes.storage_bytes(kept_bytes.grad_tensors(self.model)).values())


def _device_type(model: torch.nn.Module) -> str:
    return next(model.parameters()).device.type
