"""gpu_check.sh stage `delayed-copies` (issue 29): the step never reads state the page-in / page-out streams
have not finished. A bf16 model whose params are overwritten after FusedLISA is built (the fp32 masters
must re-read them), trained 7 steps with switch_every=2 (3 switches) with inactive_moments="host", where
~1 s of GPU sleep is queued on both copy streams before each switch (wrapping MomentStore.switch, the one
place the copies are queued: lisa_fused/paging.py), must give the same params, bit for bit, and the same
state_dict as inactive_moments="device" (no copy streams). A missing wait (e.g. the masters adopted on the
compute stream before the page-in that initialized them, issue 29 item 2) shows as a difference.
FusedLISA's public API only, besides the delay.

    python benchmarks/gpu_delayed_copies.py [--backends cuda,triton] [--moments fp32,8bit] [--cpu]

--cpu rehearses on the CPU (no copy streams, no delay): it checks the script. Exit status 0 when every
case matches, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from gpu_stage_models import Stack, batches, train

SLEEP_S = 1.0


def cycles_per_second() -> float:
    """GPU clock cycles per second, measured with torch.cuda._sleep against CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / (start.elapsed_time(end) / 1e3)


@contextlib.contextmanager
def delayed_switches(cycles: int):
    """Queue `cycles` of GPU sleep on the page-out and page-in streams before each switch's copies."""
    from lisa_fused import paging

    original = paging.MomentStore.switch
    count = [0]

    def switch(self, *args, **kwargs):
        if self.out_stream is not None and cycles:
            for stream in (self.out_stream, self.in_stream):
                with torch.cuda.stream(stream):
                    torch.cuda._sleep(cycles)
            count[0] += 1
        return original(self, *args, **kwargs)

    paging.MomentStore.switch = switch
    try:
        yield count
    finally:
        paging.MomentStore.switch = original


def run(device, backend, moments, policy, cycles) -> tuple[dict, dict, int]:
    from lisa_fused import FusedLISA

    model = Stack(seed=3).to(device=device, dtype=torch.bfloat16)
    with delayed_switches(cycles if policy == "host" else 0) as delays:
        opt = FusedLISA(model, lr=1e-3, n_active_layers=2, switch_every=2, seed=7, backend=backend,
                        moments=moments, master_weights="fp32", inactive_moments=policy, min_quantized_size=0)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():  # overwritten after construction: the masters must follow
            for p in model.parameters():
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(device=device, dtype=p.dtype))
        start = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        train(model, opt, batches(7, device, torch.bfloat16))
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        state = opt.state_dict()
    if not any(not torch.equal(params[n], start[n]) for n in params):
        raise AssertionError(f"{backend}, moments={moments}, {policy}: no parameter changed in 7 steps")
    return params, state, delays[0]


def diff(a, b, path="") -> list[str]:
    """Paths where two state_dict-like trees differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in sorted(keys, key=str) for d in diff(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--moments", default="fp32,8bit")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("delayed-copies: no CUDA device", file=sys.stderr)
        return 1
    cycles = 0 if args.cpu else int(SLEEP_S * cycles_per_second())
    failures = []
    for backend in (["cpu"] if args.cpu else args.backends.split(",")):
        for moments in args.moments.split(","):
            t0 = time.perf_counter()
            host, host_state, delays = run(device, backend, moments, "host", cycles)
            dev, dev_state, _ = run(device, backend, moments, "device", 0)
            # the state_dict records the policy itself (lisa/inactive_moments); everything else must match
            host_state["lisa"] = {k: v for k, v in host_state["lisa"].items() if k != "inactive_moments"}
            dev_state["lisa"] = {k: v for k, v in dev_state["lisa"].items() if k != "inactive_moments"}
            bad = [n for n in host if not torch.equal(host[n], dev[n])] + diff(host_state, dev_state)
            what = f"{backend}, moments={moments}: {delays} delayed switches"
            if not args.cpu and delays < 3:
                bad.append(f"only {delays} switches were delayed, expected at least 3")
            print(f"{'ok  ' if not bad else 'FAIL'}  {what}, host vs device policy "
                  f"{'bitwise equal' if not bad else 'differ at ' + ', '.join(bad[:8])} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            if bad:
                failures.append(what)
    print(f"delayed-copies: {'all equal' if not failures else 'failed: ' + '; '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
