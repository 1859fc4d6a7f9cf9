"""Shared by the tests/_engines_*.py scenario modules: sizes, data, the expected optimizer bytes."""
from __future__ import annotations

import torch

from lisa_fused.packing import aligned

LR, N_LAYERS, VOCAB, SEQ, BATCH = 1e-2, 3, 97, 10, 2


def lm_batches(steps, world, seed=7):
    """steps x world batches of token ids; rank r trains on [step][r]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, world, BATCH, SEQ), generator=g)


def expected_device_bytes(opt):
    """8 B (exp_avg, exp_avg_sq: an fp32 param is its own master, its grad the model's) per element of the
    packed layout, recomputed from the
    rank-local shapes of the params: the always-trained ones plus n_active_layers slots of the largest block."""
    locals_ = [p.to_local() if hasattr(p, "to_local") else p for p in opt._params]
    names = opt._names
    always = sum(aligned(t.numel()) for n, t in zip(names, locals_) if ".layers." not in n)
    blocks = {}
    for n, t in zip(names, locals_):
        if ".layers." in n:
            b = int(n.split(".layers.")[1].split(".")[0])
            blocks[b] = blocks.get(b, 0) + aligned(t.numel())
    return 8 * (always + opt.n_active_layers * max(blocks.values())), 8 * sum(t.numel() for t in locals_)
