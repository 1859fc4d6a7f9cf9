"""The cost of one LISA switch with FusedLISA: page the leaving block's state out and the arriving
block's in, plus the param re-binding around it, at a few Llama-shaped block sizes.

A two-block model with n_active_layers=1, switch_every=1 and a sampler that alternates blocks, so every
step() moves one block out and the other in. The grads are None, so the step's AdamW launch updates
nothing and the timed call is the switch plus a gradient-less step's bookkeeping. On CUDA the timed
function synchronizes the device (the copies run on FusedLISA's side stream). `extra_info` carries the
block size, the paged bytes per switch (out + in: exp_avg, exp_avg_sq, and the fp32 master for a bf16
model), GB/s over those bytes, the same for a plain copy of that many bytes, the device and versions.

    pytest benchmarks/test_bench_switch.py                 # time it
    pytest benchmarks/ --benchmark-disable                 # smoke run (CI): once each, 4x smaller blocks
"""
from __future__ import annotations

import itertools
import platform
import time

import pytest
import torch
from torch import nn

from lisa_fused import FusedLISA

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Block hidden sizes (MLP = 2.6875 x hidden, as in Llama-2); 4096 is one Llama-2-7B block (202M params).
HIDDEN = {"cpu": (256, 512, 1024), "cuda": (1024, 2048, 4096)}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


class Block(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        m = h * 43 // 16
        self.attn = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(4))
        self.mlp = nn.ModuleList([nn.Linear(h, m, bias=False), nn.Linear(h, m, bias=False), nn.Linear(m, h, bias=False)])
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(h)), nn.Parameter(torch.ones(h))])


class TwoBlocks(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.head = nn.Linear(h, 8, bias=False)
        self.layers = nn.ModuleList([Block(h), Block(h)])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_seconds(nbytes: int, device: str, reps: int = 5) -> float:
    """Median time of a plain copy of `nbytes` in each direction (pinned host <-> device on CUDA)."""
    n = nbytes // 2 // 4
    if device == "cuda":
        host, dev = torch.empty(n, pin_memory=True), torch.empty(n, device=device)
        pairs = [(dev, host), (host, dev)]
    else:
        a, b = torch.empty(n), torch.empty(n)
        pairs = [(a, b), (b, a)]
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2]


@pytest.mark.parametrize("policy", ["host", "device"])
@pytest.mark.parametrize("hidden_index", range(3), ids=["small", "medium", "large"])
@pytest.mark.parametrize("device", DEVICES)
def test_switch(benchmark, device, hidden_index, policy):
    hidden = HIDDEN[device][hidden_index] // (4 if benchmark.disabled else 1)
    model = TwoBlocks(hidden).to(device=device, dtype=DTYPE[device])
    order = itertools.count()
    opt = FusedLISA(model, lr=1e-4, n_active_layers=1, switch_every=1, layers="layers",
                    sampler=lambda n, k, g: [next(order) % 2], inactive_moments=policy)
    for _ in range(2):  # from here on both blocks have saved state: every switch pages out and in
        opt.step()
    sync(device)
    stats = opt.memory_stats()
    n_paged = 2 if DTYPE[device] == torch.float32 else 3  # exp_avg, exp_avg_sq (+ fp32 master)
    paged = n_paged * 4 * stats["slot_numel"]  # one block's state, each way

    def switch():
        opt.step()
        sync(device)

    before = opt.active_layers
    benchmark.pedantic(switch, rounds=1 if benchmark.disabled else 20, warmup_rounds=0 if benchmark.disabled else 2)
    assert opt.memory_stats() == stats, "the optimizer's memory changed over switches"
    rounds = 1 if benchmark.disabled else 22
    assert opt.active_layers == (before if rounds % 2 == 0 else tuple(1 - b for b in before))

    block_params = sum(p.numel() for p in model.layers[0].parameters())
    moved = 2 * paged
    copy_s = copy_seconds(moved, device)
    benchmark.extra_info.update({
        "device": device_name(device), "torch": torch.__version__, "policy": policy,
        "dtype": str(DTYPE[device]).removeprefix("torch."), "block_params": block_params,
        "paged_bytes_per_switch": moved, "plain_copy_GBps": moved / copy_s / 1e9,
    })
    if not benchmark.disabled:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["GBps"] = moved / seconds / 1e9
        benchmark.extra_info["pct_of_plain_copy"] = 100 * copy_s / seconds
