"""Models, data and modes shared by the GPU-check stages of benchmarks/gpu_check.sh (gpu_sync_debug.py,
gpu_delayed_copies.py): a small block-stack model with odd sizes, built from seeds, and the training loop
they run through FusedLISA's public API (construction, zero_grad, backward, step, state_dict)."""
from __future__ import annotations

import torch
from torch import nn

# Every moment format x master-weights mode: bf16 models for every master mode, fp32 models for fp32.
MOMENTS = ("fp32", "bf16", "8bit", "4bit")
MODES = [(m, w, torch.bfloat16) for m in MOMENTS for w in ("fp32", "kahan", "stochastic")] + [
    (m, "fp32", torch.float32) for m in MOMENTS]


class Stack(nn.Module):
    """Input layer, `n_layers` residual blocks of `width` (257: a weight of 66049 elements spans two 64K
    chunks and a tail), head. The blocks are the layer stack FusedLISA samples from."""

    def __init__(self, width: int = 257, n_layers: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(5, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_layers))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def batches(n: int, device, dtype, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (input, target) pairs, made on the host and copied once, so the timed loop builds none."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, generator=g).to(device=device, dtype=dtype),
             torch.randn(8, 3, generator=g).to(device=device, dtype=dtype)) for _ in range(n)]


def train(model: nn.Module, opt, data) -> None:
    """One step per batch: zero_grad, forward, MSE loss, backward, step (no .item(): nothing syncs)."""
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()


def mode_name(moments: str, master: str, dtype: torch.dtype) -> str:
    return f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} model, moments={moments}, master_weights={master}"
