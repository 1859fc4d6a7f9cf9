"""The packed AdamW step per backend vs torch.optim.AdamW (fused=True, foreach=True) on the same tensors.

Active sets (Llama-shaped):
- cpu: ~50M fp32 params in 90 tensors (10 blocks of hidden 640, MLP 1728).
- cuda: what FusedLISA trains on Llama-2-7B with gamma=2: embedding + LM head (32000 x 4096 each) + two
  blocks, 667M params in 21 tensors. Modes: "fp32" (fp32 params and grads) and "bf16" (bf16 params,
  fp32 masters, bf16 grads: what a bf16 model trains with).
The torch optimizers step nn.Parameters that view the same packed buffers: in "bf16" mode
"torch-*-master" steps the fp32 masters with fp32 copies of the grads (the classic mixed-precision
recipe; same 28 bytes per param as the packed step) and "torch-*-bf16" steps the bf16 params with bf16
state (14 bytes per param, a different, less precise update: reported for reference).

Each result's extra_info: method, backend actually run (an explicit backend: unavailable is a skip with
its reason, never a fallback), achieved GB/s, its share of a measured in-place stream (`a.add_(b)`, the
ceiling for an update) and of a device copy, the device, torch / CUDA / Triton versions.

    pytest benchmarks/test_bench_kernels.py                      # time it
    pytest benchmarks/ --benchmark-disable                       # smoke run (CI): once each, 10x smaller
    LISA_FUSED_BENCH_SMALL=1 pytest ...                          # timed, at the smoke size
    LISA_FUSED_BENCH_DEVICES=cpu,cuda pytest ...                 # default: cuda where present, else cpu
"""
from __future__ import annotations

import os
import platform
import time

import pytest
import torch

from lisa_fused.kernels import ALIGN, Segments, adamw_packed_, backend_unavailable_reason

BETAS, EPS, LR, WD = (0.9, 0.999), 1e-8, 1e-4, 0.01


def llama_block_shapes(hidden: int, mlp: int) -> list[tuple[int, ...]]:
    return [(hidden, hidden)] * 4 + [(mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]


ACTIVE_SETS = {
    "cpu": dict(blocks=10, hidden=640, mlp=1728, vocab=0),       # 49.6M params, 90 tensors
    "cuda": dict(blocks=2, hidden=4096, mlp=11008, vocab=32000),  # Llama-2-7B, gamma=2: 667M params, 21 tensors
}
MODES = {"cpu": ("fp32",), "cuda": ("fp32", "bf16")}
# Lean optimizer state (issue 11), timed on the "bf16" problem (bf16 grads and params) beside the packed
# fp32-moments / fp32-master step of the same group: (moments, master_weights).
LEAN_SETTINGS = (("bf16", "fp32"), ("8bit", "fp32"), ("4bit", "fp32"), ("fp32", "kahan"), ("fp32", "stochastic"),
                 ("8bit", "kahan"), ("4bit", "stochastic"))
# On a GPU machine the CPU cases measure the host, not what the machine is there for: skipped by default.
DEVICES = [d for d in os.environ.get("LISA_FUSED_BENCH_DEVICES", "cuda" if torch.cuda.is_available() else "cpu")
           .split(",") if d]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def small(disabled: bool) -> bool:
    """Smoke size: under --benchmark-disable, or LISA_FUSED_BENCH_SMALL=1 (gpu_check.sh --cpu rehearsal)."""
    return disabled or os.environ.get("LISA_FUSED_BENCH_SMALL") == "1"


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


class Problem:
    """Packed buffers for one active set and mode, and torch Parameters viewing them."""

    def __init__(self, device: str, mode: str, scale_down: int):
        cfg = ACTIVE_SETS[device]
        hidden, mlp, vocab = cfg["hidden"] // scale_down, cfg["mlp"] // scale_down, cfg["vocab"] // scale_down
        shapes = ([(vocab, hidden)] * 2 if vocab else []) + [(hidden,)] * (vocab > 0)  # embed, head, final norm
        shapes += llama_block_shapes(hidden, mlp) * cfg["blocks"]
        bounds, off = [], 0
        for shape in shapes:
            n = torch.Size(shape).numel()
            bounds.append((off, n))
            off += -(-n // ALIGN) * ALIGN
        self.device, self.mode, self.shapes, self.segments = device, mode, shapes, Segments(bounds)
        self.numel = sum(n for _, n in bounds)
        gen = torch.Generator(device=device).manual_seed(0)
        self.master = torch.randn(off, device=device, generator=gen)
        lowp = mode == "bf16"
        self.lowp = self.master.to(torch.bfloat16) if lowp else None
        self.grad = (torch.randn(off, device=device, generator=gen) * 1e-3).to(torch.bfloat16 if lowp else torch.float32)
        self.exp_avg = torch.zeros(off, device=device)
        self.exp_avg_sq = torch.zeros(off, device=device)
        b1, b2 = BETAS
        self.hparams = torch.tensor([[LR / (1 - b1), 1 - LR * WD, (1 - b2) ** 0.5, 1.0]] * len(bounds),
                                    dtype=torch.float64)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(s) for (o, n), s in zip(self.segments.bounds, self.shapes)]

    def torch_params(self, target: str) -> list[torch.nn.Parameter]:
        """Parameters sharing the packed storage: the fp32 masters ("master") or the bf16 params ("bf16")."""
        flat = self.lowp if target == "bf16" else self.master
        grad = self.grad if self.grad.dtype == flat.dtype else self.grad.float()  # fused AdamW: same dtypes
        params = [torch.nn.Parameter(v) for v in self.views(flat)]
        for q, g in zip(params, self.views(grad)):
            q.grad = g
        return params

    def bytes_per_step(self, method: str) -> int:
        if method.endswith("-bf16"):  # torch on bf16 params: read p, g, m, v; write p, m, v, all bf16
            return self.numel * 2 * 7
        if self.mode == "bf16" and method.startswith("packed"):
            # read master, m, v (fp32) + grad (bf16); write master, m, v (fp32) + bf16 param
            return self.numel * (3 * 4 + 2 + 3 * 4 + 2)
        return self.numel * 4 * 7  # fp32: read p, g, m, v; write p, m, v


_problems: dict[tuple[str, str, int], Problem] = {}


@pytest.fixture
def problem(request, device, mode) -> Problem:
    scale_down = 10 if small(request.config.getoption("benchmark_disable")) else 1
    key = (device, mode, scale_down)
    if key not in _problems:
        _problems.clear()  # one active set in memory at a time
        if device == "cuda":
            torch.cuda.empty_cache()
        _problems[key] = Problem(device, mode, scale_down)
    return _problems[key]


_ceilings: dict[str, tuple[float, float]] = {}


def ceilings(device: str, n: int) -> tuple[float, float]:
    """(stream, copy) GB/s over n fp32: `a.add_(b)` moves 12 bytes per element (read a and b, write a in
    place, no write-allocate, like the AdamW update): the practical ceiling; `b.copy_(a)` moves 8."""
    if device not in _ceilings:
        a, b = torch.randn(n, device=device), torch.randn(n, device=device)
        out = []
        for op, nbytes in ((lambda: a.add_(b), 12), (lambda: b.copy_(a), 8)):
            op()
            sync(device)
            t0, reps = time.perf_counter(), 10
            for _ in range(reps):
                op()
            sync(device)
            out.append(nbytes * n * reps / (time.perf_counter() - t0) / 1e9)
        _ceilings[device] = tuple(out)
    return _ceilings[device]


def record(benchmark, problem: Problem, method: str, backend: str):
    info = benchmark.extra_info
    nbytes = problem.bytes_per_step(method)
    info.update(method=method, backend=backend, mode=problem.mode, device=device_name(problem.device),
                params=problem.numel, tensors=len(problem.shapes), bytes_per_step=nbytes, **versions())
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        gbps = nbytes / seconds / 1e9
        stream, copy = ceilings(problem.device, problem.numel)
        info.update(ms=round(1e3 * seconds, 3), gbps=round(gbps, 1), stream_gbps=round(stream, 1),
                    copy_gbps=round(copy, 1), pct_of_stream=round(100 * gbps / stream, 1),
                    pct_of_copy=round(100 * gbps / copy, 1))


def cases(kind: str):
    for device in DEVICES:
        for mode in MODES[device]:
            if kind == "packed":
                names = ("cpu", "triton", "torch") if device == "cpu" else ("cuda", "triton")
                for name in names:
                    reason = backend_unavailable_reason(name, torch.device(device))
                    if device == "cpu" and name == "triton":
                        reason = "Triton on CPU runs in its interpreter, in Python: timing it measures the interpreter"
                    marks = [pytest.mark.skip(reason=reason)] if reason else []
                    yield pytest.param(device, mode, name, marks=marks, id=f"{device}-{mode}-packed-{name}")
            else:
                targets = ("master", "bf16") if mode == "bf16" else ("master",)
                for impl in ("fused", "foreach"):
                    for target in targets:
                        yield pytest.param(device, mode, impl, target, id=f"{device}-{mode}-torch-{impl}-{target}")


@pytest.mark.parametrize("device,mode,backend", list(cases("packed")))
def test_packed_step(benchmark, problem, device, mode, backend):
    benchmark.group = f"adamw-step-{device}-{mode}"
    pr = problem

    def step():
        adamw_packed_(pr.master, pr.grad, pr.exp_avg, pr.exp_avg_sq, pr.segments, pr.hparams, beta1=BETAS[0],
                      beta2=BETAS[1], eps=EPS, param_lowp=pr.lowp, backend=backend)
        sync(device)

    step()  # warm-up: chunk tables, Triton compile
    benchmark(step)
    record(benchmark, pr, f"packed-{backend}", backend)
    if backend == "cpu":
        from lisa_fused import _C

        benchmark.extra_info["cpu_kernel_isa"] = _C.cpu_kernel_isa()
    if backend == "triton":
        from lisa_fused.kernels import triton_interpreted

        assert not triton_interpreted(), "Triton ran in its interpreter: this would time Python, not the kernel"


# On a GPU, the two settings the memory goal needs (8-bit moments; the leanest, 4-bit + stochastic
# rounding) keep gpu_check.sh's bench-kernels stage inside its budget (each Triton variant compiles).
LEAN_SETTINGS_GPU = (("8bit", "fp32"), ("4bit", "stochastic"))


def lean_cases():
    for device in DEVICES:
        names = ("cpu",) if device == "cpu" else ("cuda", "triton")
        settings = LEAN_SETTINGS if device == "cpu" else LEAN_SETTINGS_GPU
        for name in names:
            reason = backend_unavailable_reason(name, torch.device(device))
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            yield pytest.param(device, "bf16", name, ("fp32", "fp32"), marks=marks,
                               id=f"{device}-bf16-packed-{name}-fp32-fp32")
            for moments, master in settings:
                yield pytest.param(device, "bf16", name, (moments, master), marks=marks,
                                   id=f"{device}-bf16-packed-{name}-{moments}-{master}")


@pytest.mark.parametrize("device,mode,backend,setting", list(lean_cases()))
def test_packed_lean_step(benchmark, problem, device, mode, backend, setting):
    """One packed step per lean setting on the same bf16 active set (on CPU the fp32 problem's shapes with
    bf16 grads/params); extra_info has the bytes it moves, so GB/s compare across settings, and the group
    puts each setting beside ("fp32", "fp32")."""
    from lisa_fused.kernels import quant

    moments, master = setting
    benchmark.group = f"adamw-lean-{device}-{backend}"
    pr = problem
    n = pr.master.numel()
    lowp = pr.lowp if pr.lowp is not None else pr.master.to(torch.bfloat16)
    grad = pr.grad.to(torch.bfloat16)
    state = quant.state_buffers(n, moments, master, torch.bfloat16, device)
    table = torch.cat([pr.hparams, torch.tensor([[float(i), 1.0] for i in range(len(pr.hparams))],
                                                dtype=torch.float64)], dim=1)
    master_fp32 = master == "fp32"
    param = pr.master.clone() if master_fp32 else lowp.clone()

    def step():
        adamw_packed_(param, grad, state["exp_avg"], state["exp_avg_sq"], pr.segments, table, beta1=BETAS[0],
                      beta2=BETAS[1], eps=EPS, param_lowp=lowp if master_fp32 else None,
                      backend=backend, moments=moments, master_weights=master,
                      exp_avg_scale=state.get("exp_avg_scale"), exp_avg_sq_scale=state.get("exp_avg_sq_scale"),
                      compensation=state.get("compensation"), seed=0)
        sync(device)

    step()  # warm-up: chunk tables, Triton compile
    benchmark(step)
    kinds = quant.state_bytes(pr.numel, moments, master, torch.bfloat16)
    state_rw = 2 * sum(kinds.values())  # read and write every state byte
    param_rw = 2 * pr.numel * (4 + 2) if master_fp32 else 2 * pr.numel * 2  # master + bf16 copy, or bf16 only
    nbytes = state_rw + param_rw + pr.numel * 2  # + the bf16 grad, read once
    info = benchmark.extra_info
    info.update(method=f"packed-{backend}-{moments}-{master}", backend=backend, moments=moments,
                master_weights=master, device=device_name(device), params=pr.numel, bytes_per_step=nbytes,
                **versions())
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        info.update(ms=round(1e3 * seconds, 3), gbps=round(nbytes / seconds / 1e9, 1),
                    ns_per_param=round(1e9 * seconds / pr.numel, 2))


@pytest.mark.parametrize("device,mode,impl,target", list(cases("torch")))
def test_torch_adamw_step(benchmark, problem, device, mode, impl, target):
    benchmark.group = f"adamw-step-{device}-{mode}"
    params = problem.torch_params(target)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **{impl: True})

    def step():
        opt.step()
        sync(device)

    step()  # warm-up: allocates the moments
    benchmark(step)
    method = f"torch-{impl}" + (f"-{target}" if mode == "bf16" else "")
    record(benchmark, problem, method, f"torch.optim.AdamW({impl}=True)")
    del opt, params
