"""The cost of a LISA switch with FusedLISA, two ways.

test_switch_copies: the copies alone. A two-block model, n_active_layers=1, switch_every=1, a sampler
that alternates blocks and no grads, so every step() pages one block out and the other in (plus the
param re-binding); the timed call synchronizes so that the whole switch is inside it. extra_info: paged
bytes (out + in: exp_avg, exp_avg_sq, and the fp32 master for a bf16 model), switch time and GB/s, and
the measured pinned host<->device bandwidth with both directions at once (FusedLISA pages out and in on
two streams, one copy engine each), so "% of pinned" is against what the hardware can do.

test_switch_step_in_training: the switch inside training. A stack of Llama-shaped blocks with a
forward/backward big enough to hide the copies, switch_every=2, a timing event after each iteration and
no synchronize() until the end (a sync after step() would serialize the side-stream copies and hide
nothing). extra_info: the normal step, the step that switches and the one after it (its forward
overlaps the copies, its kernel waits for them), and the ratio (switch + after) / (2 x normal): the goal
is <= 1.05 where the compute of a step covers the copies.

    pytest benchmarks/test_bench_switch.py                 # time it
    pytest benchmarks/ --benchmark-disable                 # smoke run (CI): once each, small
    LISA_FUSED_BENCH_SMALL=1 pytest ...                    # timed, small
"""
from __future__ import annotations

import itertools
import os
import platform
import statistics
import time

import pytest
import torch
from torch import nn

from lisa_fused import FusedLISA

DEVICES = [d for d in os.environ.get("LISA_FUSED_BENCH_DEVICES", "cuda" if torch.cuda.is_available() else "cpu")
           .split(",") if d]
# Block hidden sizes (MLP = 2.6875 x hidden, as in Llama-2); 4096 is one Llama-2-7B block (202M params).
HIDDEN = {"cpu": (256, 512, 1024), "cuda": (1024, 2048, 4096)}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# in training: (hidden, blocks, tokens per step)
TRAIN = {"cpu": (256, 4, 64), "cuda": (4096, 4, 16384)}  # cuda: a step estimated (not measured) at ~1.5x a block's copies


class Block(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        m = h * 43 // 16
        self.attn = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(4))
        self.mlp = nn.ModuleList([nn.Linear(h, m, bias=False), nn.Linear(h, m, bias=False), nn.Linear(m, h, bias=False)])
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(h)), nn.Parameter(torch.ones(h))])

    def forward(self, x):
        q, k, v, o = self.attn
        x = x + o(v(k(q(x * self.norms[0])))) * 0.1  # attention's matmul work, no attention
        y = x * self.norms[1]
        gate, up, down = self.mlp
        return x + down(nn.functional.silu(gate(y)) * up(y)) * 0.1


class Stack(nn.Module):
    def __init__(self, h: int, n_blocks: int):
        super().__init__()
        self.head = nn.Linear(h, 8, bias=False)
        self.layers = nn.ModuleList(Block(h) for _ in range(n_blocks))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def small(benchmark) -> bool:
    """Smoke size: under --benchmark-disable, or LISA_FUSED_BENCH_SMALL=1 (gpu_check.sh --cpu rehearsal)."""
    return benchmark.disabled or os.environ.get("LISA_FUSED_BENCH_SMALL") == "1"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def pinned_bandwidth(nbytes: int, device: str, reps: int = 5) -> dict:
    """GB/s of plain copies of `nbytes` per direction: device->host, host->device, and both at once on
    two streams (pinned host memory on CUDA; plain memory on CPU)."""
    n = max(1, nbytes // 4)
    pin = device == "cuda"
    src_h, dst_h = torch.empty(n, pin_memory=pin), torch.empty(n, pin_memory=pin)
    src_d, dst_d = torch.empty(n, device=device), torch.empty(n, device=device)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()] if pin else [None, None]

    def timed(pairs):
        times = []
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            for (dst, src), s in zip(pairs, streams):
                if s is None:
                    dst.copy_(src)
                else:
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        dst.copy_(src, non_blocking=True)
            sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    d2h, h2d = timed([(dst_h, src_d)]), timed([(dst_d, src_h)])
    both = timed([(dst_h, src_d), (dst_d, src_h)])
    return {"d2h_GBps": round(4 * n / d2h / 1e9, 2), "h2d_GBps": round(4 * n / h2d / 1e9, 2),
            "pinned_GBps": round(8 * n / both / 1e9, 2)}


def paged_bytes(opt, dtype) -> int:
    n_rows = 2 if dtype == torch.float32 else 3  # exp_avg, exp_avg_sq (+ fp32 master)
    return n_rows * 4 * opt.memory_stats()["slot_numel"]  # one block's state, one way


@pytest.mark.parametrize("policy", ["host", "device"])
@pytest.mark.parametrize("hidden_index", range(3), ids=["small", "medium", "large"])
@pytest.mark.parametrize("device", DEVICES)
def test_switch_copies(benchmark, device, hidden_index, policy):
    hidden = HIDDEN[device][hidden_index] // (4 if small(benchmark) else 1)
    model = Stack(hidden, 2).to(device=device, dtype=DTYPE[device])
    order = itertools.count()
    opt = FusedLISA(model, lr=1e-4, n_active_layers=1, switch_every=1, layers="layers",
                    sampler=lambda n, k, g: [next(order) % 2], inactive_moments=policy)
    # The switch alone (a step() without gradients changes nothing and does not count towards switch_every).
    for _ in range(2):  # from here on both blocks have saved state: every switch pages out and in
        opt._switch()
    sync(device)
    stats = opt.memory_stats()

    def switch():
        opt._switch()
        sync(device)  # the copies are what is timed here

    before = opt.active_layers
    rounds, warmup = (1, 0) if benchmark.disabled else ((3, 1) if small(benchmark) else (20, 2))
    benchmark.pedantic(switch, rounds=rounds, warmup_rounds=warmup)
    assert opt.memory_stats() == stats, "the optimizer's memory changed over switches"
    assert opt.active_layers == (before if (rounds + warmup) % 2 == 0 else tuple(1 - b for b in before))

    moved = 2 * paged_bytes(opt, DTYPE[device])
    info = benchmark.extra_info
    info.update({"case": f"copies-{device}-{hidden}", "device": device_name(device), "torch": torch.__version__,
                 "torch_cuda": torch.version.cuda, "policy": policy, "dtype": str(DTYPE[device]).removeprefix("torch."),
                 "block_params": sum(p.numel() for p in model.layers[0].parameters()),
                 "paged_bytes_per_switch": moved, "pinned_bytes": stats["pinned_bytes"]})
    info.update(pinned_bandwidth(moved // 2, device))
    if not benchmark.disabled:
        seconds = benchmark.stats.stats.median
        info["switch_ms"] = round(1e3 * seconds, 3)
        if policy == "host":
            info["switch_GBps"] = round(moved / seconds / 1e9, 2)
            info["pct_of_pinned"] = round(100 * info["switch_GBps"] / info["pinned_GBps"], 1)


@pytest.mark.parametrize("device", DEVICES)
def test_switch_step_in_training(benchmark, device):
    hidden, n_blocks, tokens = TRAIN[device]
    if small(benchmark):
        hidden, tokens = hidden // 4, tokens // 4
    dtype, every = DTYPE[device], 2
    torch.manual_seed(0)
    model = Stack(hidden, n_blocks).to(device=device, dtype=dtype)
    opt = FusedLISA(model, lr=1e-4, n_active_layers=1, switch_every=every, layers="layers",
                    inactive_moments="host", seed=0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    start = [p.detach().clone() for p in model.layers.parameters()]
    visited = set()  # blocks trained by at least one step
    n_steps = 2 + (2 if benchmark.disabled else 8) * every  # two warm-up steps, then 2 or 8 intervals
    marks, switched = [], []

    def mark():
        if device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    def train():
        mark()
        for _ in range(n_steps):
            model(x).float().square().mean().backward()
            visited.update(opt.active_layers)
            opt.step()
            opt.zero_grad()
            switched.append(opt._global_step % every == 0)
            mark()  # no synchronize: the copies run behind the next forward/backward
        sync(device)

    benchmark.pedantic(train, rounds=1, iterations=1)
    if device == "cuda":
        dur = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]  # ms
    else:
        dur = [1e3 * (b - a) for a, b in zip(marks, marks[1:])]
    skip = 2  # warm-up: allocator, kernels' first launches
    sw = [i for i in range(skip, n_steps - 1) if switched[i]]
    after = [i + 1 for i in sw]
    normal = [dur[i] for i in range(skip, n_steps) if i not in sw and i not in after]
    info = benchmark.extra_info
    info.update({"case": f"training-{device}-{hidden}x{n_blocks}-{tokens}tok", "device": device_name(device),
                 "torch": torch.__version__, "torch_cuda": torch.version.cuda, "policy": "host",
                 "dtype": str(dtype).removeprefix("torch."), "switch_every": every,
                 "block_params": sum(p.numel() for p in model.layers[0].parameters()),
                 "paged_bytes_per_switch": 2 * paged_bytes(opt, dtype), "step_ms_all": [round(d, 3) for d in dur]})
    if normal and sw:
        n, s, a = statistics.median(normal), statistics.median(dur[i] for i in sw), statistics.median(dur[i] for i in after)
        info.update(normal_step_ms=round(n, 3), switch_step_ms=round(s, 3), after_switch_step_ms=round(a, 3),
                    switch_step_ratio=round((s + a) / (2 * n), 3))
    # training happened: visited blocks moved, never-visited ones did not
    now = list(model.layers.parameters())
    per_block = len(now) // n_blocks
    for b in range(n_blocks):
        same = all(torch.equal(p0, p) for p0, p in zip(start[b * per_block:(b + 1) * per_block],
                                                       now[b * per_block:(b + 1) * per_block]))
        assert same == (b not in visited), f"block {b}: visited {b in visited}, unchanged {same}"
