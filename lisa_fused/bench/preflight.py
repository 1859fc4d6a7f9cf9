"""Before a long bench: will each method fit, and how long will it take? Refuse (unless --force) what
cannot fit or would run for more than an hour, with the numbers.

Memory comes from the planner (`lisa_fused.plan`, fake-tensor trace of one step) for the bench's own
settings; it runs only for models above SMALL_PARAMS parameters (the tiny preset fits anywhere, and
planning it would take longer than running it). Time on a CPU: forward + backward + step cost about
6 x params FLOPs per token (Kaplan et al., 2020, "Scaling Laws for Neural Language Models", sec. 2.1),
divided by a matmul rate measured here for 0.2 s; CPU runs go through the steps twice (run.py).
"""
from __future__ import annotations

import time

import torch

SMALL_PARAMS = 100_000_000
REFUSE_SECONDS = 3600
# Every bench method maps to a planner row; LoRA-FA (A frozen) is planned as LoRA, an upper bound.
BENCH_TO_PLAN = {"full": ("full", None), "lora": ("lora", None), "lora-fa": ("lora", None),
                 "lisa": ("lisa", {"inactive_moments": "host"}),
                 "lisa-device": ("lisa", {"inactive_moments": "device"}),
                 "lisa-8bit": ("lisa", {"inactive_moments": "host", "moments": "8bit"}),
                 "lisa-4bit": ("lisa", {"inactive_moments": "host", "moments": "4bit"}),
                 "lisa-4bit-sr": ("lisa", {"inactive_moments": "host", "moments": "4bit", "master_weights": "stochastic"})}


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def matmul_flops_per_s(seconds: float = 0.2) -> float:
    a = torch.randn(512, 512)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    return n * 2 * 512**3 / (time.perf_counter() - t0)


def check(args, config) -> str | None:
    """None when the run may go ahead; else the one-paragraph reason (with --force: printed, not refused)."""
    from ..plan.models import meta_model
    from ..plan.planner import plan

    dtype = getattr(torch, args.dtype)
    n_params = sum(p.numel() for p in meta_model(config, dtype).parameters())
    if n_params < SMALL_PARAMS:
        return None
    device = torch.device(args.device)
    avail = _available_bytes(device)
    problems = []
    wanted = {BENCH_TO_PLAN[m][0] for m in args.methods}
    settings = tuple(BENCH_TO_PLAN[m][1] for m in args.methods if BENCH_TO_PLAN[m][1])
    rows, _, _ = plan(config, dtype=dtype, batch_size=args.batch_size, seq_len=args.seq_len, target=device.type,
                      methods=[m for m in ("full", "lora", "lisa") if m in wanted], lora_rank=args.lora_rank,
                      gamma=args.gamma, gpu_mem=avail, lisa_settings=settings)
    for r in rows:
        if not r.fits:
            problems.append(f"{r.method} ({r.setting}) needs about {r.peak_bytes / 2**30:.1f} GiB, "
                            f"{device.type} has {avail / 2**30:.1f} GiB available")
    if device.type == "cpu":
        tokens = args.batch_size * args.seq_len * args.steps * 2 * len(args.methods)
        seconds = 6 * n_params * tokens / matmul_flops_per_s()
        if seconds > REFUSE_SECONDS:
            problems.append(f"{n_params / 1e9:.1f}B parameters x {tokens:,} tokens at this CPU's matmul rate "
                            f"take about {seconds / 3600:.1f} h")
    if not problems:
        return None
    text = "; ".join(problems)
    if args.force:
        print(f"lisa-fused bench: --force: running although {text}", flush=True)
        return None
    return f"{text}. Use fewer --steps, a smaller --batch-size/--seq-len or --methods, or --force to insist."
