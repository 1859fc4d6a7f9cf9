"""What a CPU process holds beyond live tensors while one method trains the bench's tiny model.

    python benchmarks/cpu_memory_breakdown.py full|lora|lisa [--steps 3]

At the end of each forward (the step's largest live set on this model) it prints, in MiB above the
state before the method's setup: live tensor bytes (the planner's AllocationTracker on the real
tensors), glibc's in-use bytes (mallinfo2: uordblks + hblkhd, what malloc handed out and was not
freed), glibc's free-list bytes (fordblks), anonymous and file-backed resident pages (/proc/self/status
RssAnon, RssFile), and Python's object arenas (sys._debugmallocstats) with the allocated-block count.
glibc's mmap threshold is fixed at 64 KiB first, as in the bench's memory pass. Linux + glibc only.
Set MKL_DISABLE_FAST_MM=1 to see MKL's buffer cache leave the in-use bytes.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys

import torch

from lisa_fused.bench import methods
from lisa_fused.bench.memory import TensorMeter, set_mmap_threshold
from lisa_fused.bench.models import build_model, model_config

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def snapshot(libc) -> dict[str, float]:
    mi = libc.mallinfo2()
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile"):
                status[key] = int(line.split()[1]) * 1024
    read, write = os.pipe()  # _debugmallocstats writes to the C stderr
    saved = os.dup(2)
    os.dup2(write, 2)
    sys._debugmallocstats()
    os.dup2(saved, 2)
    os.close(write)
    stats = os.read(read, 1 << 20).decode()
    os.close(read)
    arenas = int(re.search(r"# arenas allocated current\s*=\s*([\d,]+)", stats).group(1).replace(",", ""))
    return {"malloc in-use": (mi.uordblks + mi.hblkhd) / MIB, "malloc free": mi.fordblks / MIB,
            "RssAnon": status["RssAnon"] / MIB, "RssFile": status["RssFile"] / MIB,
            "python arenas": float(arenas), "python blocks": float(sys.getallocatedblocks())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=("full", "lora", "lisa", "lisa-device"))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    set_mmap_threshold(64 * 1024)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    model = build_model(model_config("tiny", None), model_path=None, dtype=torch.float32,
                        device=torch.device("cpu"), seed=0)
    spec = dict(lr=3e-4, lora_lr=1e-3, lora_rank=16, gamma=2, switch_every=8, seed=0, weight_decay=0.0,
                method=args.method)
    methods.import_libraries(args.method)
    x = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    before = snapshot(libc)
    meter = TensorMeter()
    meter.start(model)
    try:
        setup = methods.build(args.method, model, spec)
        for step in range(args.steps):
            loss = setup.model(input_ids=x, labels=x).loss
            now = snapshot(libc)
            diff = {k: now[k] - before[k] for k in now}
            print(f"{args.method} step {step} after forward: live tensors {meter.current() / MIB:.1f} MiB, "
                  + ", ".join(f"{k} {v:+.1f}" + ("" if k.startswith("python") else " MiB") for k, v in diff.items()))
            loss.backward()
            setup.optimizer.step()
            setup.optimizer.zero_grad()
        print(f"{args.method}: live tensor peak {meter.peak() / MIB:.1f} MiB above the start")
    finally:
        meter.stop()


if __name__ == "__main__":
    main()
