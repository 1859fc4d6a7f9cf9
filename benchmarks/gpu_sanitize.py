"""gpu_check.sh stage `sanitizer` (issue 29): one kernel launch per mode, to run under compute-sanitizer
(memcheck, racecheck, synccheck) and, with --ptx-jit, under CUDA_FORCE_PTX_JIT=1 (the driver compiles the
extension's PTX, as on a GPU newer than the build's SASS).

Each launch updates six segments at once, sized 1, 255, 257, 2049 and 65537 elements (a segment shorter
than a warp's elements, odd tails, a chunk boundary) and a misaligned slice (params, grads and bf16 copy
one element into their buffers: the masked path), through lisa_fused.kernels.adamw_segments_, the kernels'
public entry point. Modes: moments fp32 / bf16 / 8bit / 4bit x master "fp32" (fp32 params), "fp32+bf16"
(fp32 masters, bf16 grads, a bf16 copy), "kahan" and "stochastic" (bf16 params), each plain and with
grad_sumsq and a grad_scale (which picks the other kernel for fp32 state). Every launch is checked against
the native CPU kernel on the same inputs, bit for bit (grad_sumsq to fp32 summation order), so a launch
that wrote nothing or the wrong elements fails here too; with --ptx-jit the first launch of each mode
(its PTX JIT compile) and a second one are timed and printed.

    compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/gpu_sanitize.py --backends cuda
    CUDA_FORCE_PTX_JIT=1 CUDA_CACHE_DISABLE=1 python benchmarks/gpu_sanitize.py --backends cuda --ptx-jit

The GPU tensors are made by host-to-device copies only (no torch kernel runs on the device: under
CUDA_FORCE_PTX_JIT=1 torch's kernels, built without PTX for this GPU, could not load). --cpu rehearses
with the CPU kernel against itself. Exit status 0 when every launch matched, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

SIZES = (1, 255, 257, 2049, 65537)
MISALIGNED = 1000  # elements of the misaligned slice
MASTERS = ("fp32", "fp32+bf16", "kahan", "stochastic")


def layout():
    from lisa_fused.kernels import ALIGN, Segments

    bounds, off = [], 0
    for n in (*SIZES, MISALIGNED):
        bounds.append((off, n))
        off += -(-n // ALIGN) * ALIGN
    return Segments(bounds), off


def host_inputs(moments: str, master: str, extras: bool, seed: int) -> dict:
    """Host tensors of one launch: per-segment params / grads / lowps, packed state, hparams."""
    from lisa_fused.kernels import quant

    segments, total = layout()
    g = torch.Generator().manual_seed(seed)
    pdtype = torch.float32 if master.startswith("fp32") else torch.bfloat16
    gdtype = torch.float32 if master == "fp32" else torch.bfloat16
    params = [(torch.randn(n, generator=g) * 0.05).to(pdtype) for _, n in segments.bounds]
    grads = [(torch.randn(n, generator=g) * 0.01).to(gdtype) for _, n in segments.bounds]
    lowps = [p.to(torch.bfloat16) for p in params] if master == "fp32+bf16" else None
    weights = "fp32" if master.startswith("fp32") else master
    st = quant.state_buffers(total, moments, weights, pdtype, "cpu")
    rows = [[1e-3 / (1 - 0.9), 1 - 1e-5, math.sqrt(1 - 0.999), 1.0, float(s), 1.0] for s in range(len(segments))]
    out = dict(params=params, grads=grads, lowps=lowps, segments=segments, moments=moments, weights=weights,
               hparams=torch.tensor(rows, dtype=torch.float64), state=st)
    if extras:
        out["grad_sumsq"] = torch.zeros(len(segments))
        out["grad_scale"] = torch.tensor([4.0])
    return out


def to_device(inputs: dict, device: str) -> dict:
    """A copy on `device` by host-to-device copies only; the misaligned slice sits 1 element in."""
    def move(t, misalign=False):
        if t is None:
            return None
        if not misalign:
            return t.to(device, copy=True)
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
        buf[1:].copy_(t)  # host -> device into the view: a copy, no kernel
        return buf[1:]

    last = len(inputs["params"]) - 1
    out = dict(inputs)
    for key in ("params", "grads", "lowps"):
        if inputs[key] is not None:
            out[key] = [move(t, misalign=(k == last)) for k, t in enumerate(inputs[key])]
    out["state"] = {k: move(v) for k, v in inputs["state"].items()}
    for key in ("grad_sumsq", "grad_scale"):
        if key in inputs:
            out[key] = move(inputs[key])
    return out


def launch(inputs: dict, backend: str) -> None:
    from lisa_fused.kernels import adamw_segments_

    st = dict(inputs["state"])
    adamw_segments_(inputs["params"], inputs["grads"], st.pop("exp_avg"), st.pop("exp_avg_sq"), inputs["segments"],
                    inputs["hparams"], beta1=0.9, beta2=0.999, eps=1e-8, lowps=inputs["lowps"],
                    grad_scale=inputs.get("grad_scale"), backend=backend, moments=inputs["moments"],
                    master_weights=inputs["weights"], seed=5, grad_sumsq=inputs.get("grad_sumsq"), **st)


def results(inputs: dict) -> dict:
    out = {f"param{k}": p.cpu() for k, p in enumerate(inputs["params"])}
    out.update({f"lowp{k}": p.cpu() for k, p in enumerate(inputs["lowps"] or ())})
    out.update({k: v.cpu() for k, v in inputs["state"].items()})
    if "grad_sumsq" in inputs:
        out["grad_sumsq"] = inputs["grad_sumsq"].cpu()
    return out


def check(got: dict, want: dict, before: dict) -> list[str]:
    bad = []
    for name, w in want.items():
        g = got[name]
        if name == "grad_sumsq":
            if not torch.allclose(g, w, rtol=1e-5, atol=0):
                bad.append(name)
        elif not torch.equal(g, w):
            bad.append(f"{name} ({(g != w).sum().item()} differ)")
    if all(torch.equal(got[k], before[k]) for k in got if k.startswith("param")):
        bad.append("no param changed")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="cuda")
    ap.add_argument("--ptx-jit", action="store_true", help="time each mode's first launch (JIT) and a second")
    ap.add_argument("--cpu", action="store_true", help="rehearse: the CPU kernel against itself")
    args = ap.parse_args(argv)
    from lisa_fused import _C

    if _C.cpu_kernel_isa() != "avx2+fma" and not args.cpu:
        print("the CPU kernel here has no FMA: it rounds lerp/addcmul twice, so it cannot be the reference",
              file=sys.stderr)
        return 1
    if args.ptx_jit:
        archs = _C.cuda_archs()
        cc = torch.cuda.get_device_capability()
        print(f"lisa_fused._C: {archs}; GPU {torch.cuda.get_device_name()} {cc[0]}.{cc[1]}; "
              f"PTX JIT only if the build's PTX ({archs and archs['ptx']}) <= {10 * cc[0] + cc[1]}")
    device = "cpu" if args.cpu else "cuda"
    failures, n = [], 0
    for backend in (["cpu"] if args.cpu else args.backends.split(",")):
        for moments in ("fp32", "bf16", "8bit", "4bit"):
            for master in MASTERS:
                for extras in (False, True):
                    what = f"{backend} {moments}/{master}" + (" +sumsq +scale" if extras else "")
                    host = host_inputs(moments, master, extras, seed=n)
                    before = results(host)
                    ref = to_device(host, "cpu")
                    launch(ref, "cpu")
                    dev = to_device(host, device)
                    t0 = time.perf_counter()
                    launch(dev, backend)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    got = results(dev)
                    if args.ptx_jit:  # the same launch again: compiled by now
                        again = to_device(host, device)
                        t2 = time.perf_counter()
                        launch(again, backend)
                        torch.cuda.synchronize()
                        print(f"  {what}: first launch {1e3 * (t1 - t0):.1f} ms (JIT), second "
                              f"{1e3 * (time.perf_counter() - t2):.2f} ms", flush=True)
                    bad = check(got, results(ref), before)
                    n += 1
                    if bad:
                        failures.append(f"{what}: {', '.join(bad)}")
    print(f"sanitize: {n - len(failures)} of {n} launches (segments {SIZES} + a misaligned slice of {MISALIGNED}) "
          "equal the CPU kernel" + ("" if not failures else "; failed:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
