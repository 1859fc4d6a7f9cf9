"""Before a long bench: will each method fit, and how long will it take? Refuse (unless --force) what
cannot fit or would run for more than an hour, with the numbers.

Memory comes from the planner (`lisa_fused.plan`, fake-tensor trace of one step) for the bench's own
settings (`plan_bench`, run once by bench.py for every model: its rows also go into the table's
"planned MiB" column and results.json); the refusal applies only to models above SMALL_PARAMS
parameters (the tiny preset fits anywhere). Time on a CPU: forward + backward + step cost about
6 x params FLOPs per token (Kaplan et al., 2020, "Scaling Laws for Neural Language Models", sec. 2.1),
divided by a matmul rate measured here for 0.2 s; CPU runs go through the steps twice (run.py).
"""
from __future__ import annotations

import time

import torch

SMALL_PARAMS = 100_000_000
REFUSE_SECONDS = 3600
# Every bench method maps to a planner row or to None (no planner row: its planned columns stay empty);
# LoRA-FA (A frozen) is planned as LoRA, an upper bound.
BENCH_TO_PLAN = {"full": ("full", None), "lora": ("lora", None), "lora-fa": ("lora", None),
                 "lisa": ("lisa", {"inactive_moments": "host"}),
                 "lisa-device": ("lisa", {"inactive_moments": "device"}),
                 "lisa-8bit": ("lisa", {"inactive_moments": "host", "moments": "8bit"}),
                 "lisa-4bit": ("lisa", {"inactive_moments": "host", "moments": "4bit"}),
                 "lisa-4bit-sr": ("lisa", {"inactive_moments": "host", "moments": "4bit", "master_weights": "stochastic"}),
                 "badam": ("badam", None),
                 # the planner has no row for these (yet): GaLore's projections, the 8-bit optimizers' codes,
                 # and the published callbacks' state, which grows with the blocks drawn so far
                 "lisa-published": None, "galore": None, "adamw-8bit": None, "adamw-8bit-bnb": None}
PLANNED_KINDS = ("full", "lora", "lisa", "badam")  # planner methods, in the planner's order


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


def plan_bench(args, config) -> dict:
    """The planner's rows for the bench's methods and settings (dtype, batch, seq, LoRA rank, gamma,
    target = the bench's device type), run once in the parent: {"rows": [Row], "skipped": [Skipped],
    "weights_bytes": bytes of the model's parameters (tied ones once), what a method's memory
    baseline already holds}. Costs a few seconds for the tiny preset, ~10-20 s at 7B."""
    from ..plan.models import meta_model
    from ..plan.planner import plan

    dtype = getattr(torch, args.dtype)
    model = meta_model(config, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters(): tied ones once
    n_params = sum(p.numel() for p in model.parameters())
    mapped = [BENCH_TO_PLAN[m] for m in args.methods if BENCH_TO_PLAN[m] is not None]
    wanted = {kind for kind, _ in mapped}
    settings = []
    for _, kwargs in mapped:
        if kwargs and kwargs not in settings:
            settings.append(kwargs)
    rows, skipped, _ = plan(config, dtype=dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                            target=torch.device(args.device).type,
                            methods=[m for m in PLANNED_KINDS if m in wanted],
                            lora_rank=args.lora_rank, gamma=args.gamma, lisa_settings=tuple(settings))
    return {"rows": rows, "skipped": skipped, "weights_bytes": weights, "n_params": n_params}


def planner_row(method: str, planned: dict):
    """The planner Row of bench method `method` (BENCH_TO_PLAN), or None (no planner row for the method, or
    a setting the planner skipped)."""
    if BENCH_TO_PLAN[method] is None:
        return None
    kind, kwargs = BENCH_TO_PLAN[method]
    for r in planned["rows"]:
        if r.method == kind and (kwargs is None or r.kwargs == kwargs):
            return r
    return None


def planned_above_baseline(row: dict, planned: dict, device_type: str) -> dict:
    """The planner's peak above the bench's memory baseline for a bench result `row`, three ways (bytes,
    None where the planner has no row for the method):

    planned_peak_bytes: the planner's peak_bytes minus the model's parameter bytes (the baseline holds
    the whole model; a LISA Row's weights_bytes leaves out what FusedLISA binds, which is in its state
    instead, so the model's total is subtracted, not the Row's weights). For LISA this is the steady
    state: every block has been active and has left once.
    planned_tensor_bytes: what to hold against peak_tensor_bytes. A short run has paged fewer blocks:
    under inactive_moments="device" the resident moments are allocated as blocks leave, so for LISA
    rows the planner's device state is replaced by the run's (opt_state_device_bytes: memory_stats' device
    bytes, max over steps, the same quantity as the planner's state). The
    "host" store is reserved (torch.empty) up front for every block, so the tensor count sees all of it
    and the planner's steady host bytes stay.
    planned_mem_bytes: what to hold against peak_mem_bytes. On a CPU the RSS holds only the host pages
    written so far, so the host store is also taken at the run's size (opt_host_bytes); elsewhere
    (CUDA: the host store is not device memory) it equals planned_tensor_bytes.
    """
    r = planner_row(row["base_method"], planned)
    if r is None:
        return dict.fromkeys(("planned_peak_bytes", "planned_tensor_bytes", "planned_mem_bytes"))
    steady = r.peak_bytes - planned["weights_bytes"]
    tensor = steady
    if r.method == "lisa":
        tensor += row["opt_state_device_bytes"] - r.state_bytes
    mem = tensor
    if r.method == "lisa" and device_type == "cpu":
        mem += row["opt_host_bytes"] - r.host_bytes
    return {"planned_peak_bytes": steady, "planned_tensor_bytes": tensor, "planned_mem_bytes": mem}


def check(args, config, planned: dict | None = None) -> str | None:
    """None when the run may go ahead; else the one-paragraph reason (with --force: printed, not refused).
    `planned`: plan_bench's result when the caller already has it (else planned here, big models only)."""
    from ..plan.models import meta_model

    dtype = getattr(torch, args.dtype)
    n_params = planned["n_params"] if planned else sum(p.numel() for p in meta_model(config, dtype).parameters())
    if n_params < SMALL_PARAMS:
        return None
    device = torch.device(args.device)
    avail = _available_bytes(device)
    problems = []
    rows = (planned or plan_bench(args, config))["rows"]
    for r in rows:
        if r.peak_bytes > avail:
            problems.append(f"{r.method} ({r.setting}) needs about {r.peak_bytes / 2**30:.1f} GiB, "
                            f"{device.type} has {avail / 2**30:.1f} GiB available")
    if device.type == "cpu":
        tokens = args.batch_size * args.seq_len * args.steps * 2 * len(args.methods)
        seconds = 6 * n_params * tokens / matmul_flops_per_s()
        if seconds > REFUSE_SECONDS:
            problems.append(f"{n_params / 1e9:.1f}B parameters x {tokens:,} tokens ({len(args.methods)} methods x 2 "
                            f"passes x {args.steps} steps x {args.batch_size} x {args.seq_len}) at this CPU's matmul rate "
                            f"take about {seconds / 3600:.1f} h")
    if not problems:
        return None
    text = "; ".join(problems)
    if args.force:
        print(f"lisa-fused bench: --force: running although {text}", flush=True)
        return None
    return f"{text}. Use fewer --steps, a smaller --batch-size/--seq-len or --methods, or --force to insist."
