"""The packed AdamW step per backend vs torch.optim.AdamW (fused=True, foreach=True) on the same params.

Active set: Llama-shaped. On the CPU ~50M params in 90 tensors (10 blocks of hidden 640, MLP 1728); on a
GPU two Llama-2-7B blocks (405M params in 18 tensors). The torch optimizers step nn.Parameters that are
views of the same packed buffers the fused kernels update. Each result carries the achieved GB/s (bytes
of p, g, m, v read and written), its share of a measured in-place stream (`a.add_(b)`), the device and
the versions in `extra_info`. On the CPU the thread count is torch's (OMP_NUM_THREADS / set_num_threads).

    pytest benchmarks/test_bench_kernels.py                      # time it
    pytest benchmarks/ --benchmark-disable                       # smoke run (CI): once each, 10x smaller
"""
from __future__ import annotations

import platform
import time

import pytest
import torch

from lisa_fused.kernels import ALIGN, Segments, adamw_packed_, backend_unavailable_reason

BETAS, EPS, LR, WD = (0.9, 0.999), 1e-8, 1e-4, 0.01


def llama_block_shapes(hidden: int, mlp: int) -> list[tuple[int, ...]]:
    return [(hidden, hidden)] * 4 + [(mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]


ACTIVE_SETS = {
    "cpu": dict(blocks=10, hidden=640, mlp=1728),     # 49.6M params, 90 tensors
    "cuda": dict(blocks=2, hidden=4096, mlp=11008),   # two Llama-2-7B blocks: 405M params, 18 tensors
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


class Problem:
    """Packed fp32 buffers for one active set, and torch Parameters viewing them."""

    def __init__(self, device: str, scale_down: int):
        cfg = ACTIVE_SETS[device]
        hidden, mlp = cfg["hidden"] // scale_down, cfg["mlp"] // scale_down
        shapes = llama_block_shapes(hidden, mlp) * cfg["blocks"]
        bounds, off = [], 0
        for shape in shapes:
            n = torch.Size(shape).numel()
            bounds.append((off, n))
            off += -(-n // ALIGN) * ALIGN
        self.device, self.shapes, self.segments = device, shapes, Segments(bounds)
        self.numel = sum(n for _, n in bounds)
        gen = torch.Generator(device=device).manual_seed(0)
        self.param = torch.randn(off, device=device, generator=gen)
        self.grad = torch.randn(off, device=device, generator=gen) * 1e-3
        self.exp_avg = torch.zeros(off, device=device)
        self.exp_avg_sq = torch.zeros(off, device=device)
        b1, b2 = BETAS
        self.hparams = torch.tensor([[LR / (1 - b1), 1 - LR * WD, (1 - b2) ** 0.5, 1.0]] * len(bounds),
                                    dtype=torch.float64)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(s) for (o, n), s in zip(self.segments.bounds, self.shapes)]

    def torch_params(self) -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(v) for v in self.views(self.param)]  # shares the packed storage
        for q, g in zip(params, self.views(self.grad)):
            q.grad = g
        return params

    def bytes_per_step(self) -> int:
        # read p, g, m, v; write p, m, v (fp32 everywhere here)
        return self.numel * 4 * 7


_problems: dict[tuple[str, int], Problem] = {}


@pytest.fixture
def problem(request, device) -> Problem:
    scale_down = 10 if request.config.getoption("benchmark_disable") else 1
    key = (device, scale_down)
    if key not in _problems:
        _problems.clear()  # one active set in memory at a time
        _problems[key] = Problem(device, scale_down)
    return _problems[key]


_stream_gbps: dict[str, float] = {}


def stream_bandwidth(device: str, n: int) -> float:
    """GB/s of `a.add_(b)` over n fp32 (12 bytes per element: read a and b, write a in place, so no
    write-allocate traffic, like the AdamW update): the practical ceiling for this kernel."""
    if device not in _stream_gbps:
        a, b = torch.randn(n, device=device), torch.randn(n, device=device)
        a.add_(b)
        sync(device)
        t0, reps = time.perf_counter(), 5
        for _ in range(reps):
            a.add_(b)
        sync(device)
        _stream_gbps[device] = 12 * n * reps / (time.perf_counter() - t0) / 1e9
    return _stream_gbps[device]


def record(benchmark, problem: Problem, method: str):
    info = benchmark.extra_info
    info.update(method=method, device=device_name(problem.device), torch=torch.__version__,
                params=problem.numel, tensors=len(problem.shapes), bytes_per_step=problem.bytes_per_step())
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        gbps = problem.bytes_per_step() / seconds / 1e9
        ceiling = stream_bandwidth(problem.device, problem.numel)
        info.update(gbps=round(gbps, 2), stream_gbps=round(ceiling, 2), pct_of_stream=round(100 * gbps / ceiling, 1))


def packed_backends(device: str):
    names = ("cpu", "triton", "torch") if device == "cpu" else ("cuda", "triton", "torch")
    for name in names:
        reason = backend_unavailable_reason(name, torch.device(device))
        if device == "cpu" and name == "triton":
            reason = "Triton on CPU runs in its interpreter, in Python: timing it measures the interpreter"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(device, name, marks=marks, id=f"{device}-packed-{name}")


@pytest.mark.parametrize("device,backend", [p for d in DEVICES for p in packed_backends(d)])
def test_packed_step(benchmark, problem, device, backend):
    benchmark.group = f"adamw-step-{device}"
    pr = problem

    def step():
        adamw_packed_(pr.param, pr.grad, pr.exp_avg, pr.exp_avg_sq, pr.segments, pr.hparams, beta1=BETAS[0],
                      beta2=BETAS[1], eps=EPS, backend=backend)
        sync(device)

    step()  # warm-up: chunk tables, Triton compile
    benchmark(step)
    record(benchmark, pr, f"packed-{backend}")
    if backend == "cpu":
        from lisa_fused import _C

        benchmark.extra_info["cpu_kernel_isa"] = _C.cpu_kernel_isa()


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_adamw_step(benchmark, problem, device, impl):
    benchmark.group = f"adamw-step-{device}"
    opt = torch.optim.AdamW(problem.torch_params(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **{impl: True})

    def step():
        opt.step()
        sync(device)

    step()  # warm-up: allocates the moments
    benchmark(step)
    record(benchmark, problem, f"torch-adamw-{impl}")
    del opt
