"""gpu_check.sh stage `sync-debug` (issue 29): no host synchronization anywhere in FusedLISA's step or
switch. For every moments x master_weights mode (gpu_stage_models.MODES) on backend "cuda" and "triton",
and once with the grad_norm sampler and a param group of its own betas: a warm-up of 3 steps (first-step
allocations, Triton compiles, the first switch), then torch.cuda.set_sync_debug_mode("error") and 6 steps
with switch_every=2 (3 switches, paging through inactive_moments="host"). Any CUDA call that makes the
host wait (a copy from pageable memory, .item(), a blocking device-to-host copy, torch.cuda.synchronize)
raises inside the window; the run reports it with the mode and fails. FusedLISA's public API only.

    python benchmarks/gpu_sync_debug.py [--backends cuda,triton] [--cpu]

--cpu rehearses the same loop on the CPU ("cpu" backend; sync-debug mode is a no-op there): it checks the
script, not the GPU path. Exit status: 0 when every mode ran clean, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from gpu_stage_models import MODES, Stack, batches, mode_name, train


def run_one(device: str, backend: str, moments: str, master: str, dtype, extra: dict) -> None:
    from lisa_fused import FusedLISA

    model = Stack().to(device=device, dtype=dtype)
    opt = FusedLISA(model, lr=1e-3, n_active_layers=2, switch_every=2, seed=0, backend=backend, moments=moments,
                    master_weights=master, inactive_moments="host", min_quantized_size=0, **extra)
    data = batches(9, device, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, data[:3])  # warm-up: allocations, compiles, the first switch (after step 2)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        train(model, opt, data[3:])  # 6 steps: switches after steps 4, 6 and 8
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    if not changed:
        raise AssertionError("no parameter changed in 9 steps")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--cpu", action="store_true", help="rehearse on the CPU (backend 'cpu')")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("sync-debug: no CUDA device", file=sys.stderr)
        return 1
    backends = ["cpu"] if args.cpu else args.backends.split(",")
    cases = [(b, m, w, d, {}) for b in backends for m, w, d in MODES]
    # the grad_norm sampler with groups of different betas (a per-step index tensor once synced the host)
    cases += [(b, "8bit", "fp32", torch.bfloat16,
               dict(sampler="grad_norm", param_groups=[{"params": ["out"], "betas": (0.8, 0.99)}])) for b in backends]
    failures = []
    for backend, moments, master, dtype, extra in cases:
        what = f"{backend}: {mode_name(moments, master, dtype)}" + (" + grad_norm sampler, 2 groups" if extra else "")
        t0 = time.perf_counter()
        try:
            run_one(device, backend, moments, master, dtype, extra)
            print(f"ok    {what} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:  # every mode runs; each failure is reported with its traceback
            failures.append(what)
            print(f"FAIL  {what}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=6)
    print(f"sync-debug: {len(cases) - len(failures)} of {len(cases)} modes ran 6 steps (3 switches) without a "
          f"host sync" + (f"; failed: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
