"""Fine-tune with one method and measure it. `python -m lisa_fused.bench.run SPEC.json RESULT.json`
runs one method in a fresh process, so that its peak memory is its own (see memory.py).

On CUDA one pass measures everything. On CPU there are two passes over the same steps, each from a
fresh copy of the base weights: the first measures peak memory with glibc set to give freed tensors
back to the OS from the process start; the second, with glibc's reuse back on, times the steps and
gives the losses, which must equal the first pass's (memory.py says why).
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from . import methods
from .data import batch_starts, eval_starts, windows
from .memory import EXACT_MMAP_THRESHOLD, TIMED_MMAP_THRESHOLD, meter_for, set_mmap_threshold
from .models import DTYPES, build_model, model_config

TAIL = 5  # the final train loss is the mean over this many last steps


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def train(model, optimizer, tokens, starts, seq_len, device, *, desc, scheduler=None, on_step=None) -> dict:
    """Plain loop: forward, backward, optimizer.step(), zero_grad(). Times the step and the whole."""
    sync = _sync(device)
    model.train()
    losses, opt_ms, step_ms = [], [], []
    for batch_starts_i in tqdm(starts, desc=desc, file=sys.stderr, mininterval=0.5, unit="step"):
        x = windows(tokens, batch_starts_i, seq_len).to(device)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        sync()
        t1 = time.perf_counter()
        optimizer.step()
        sync()
        t2 = time.perf_counter()
        if on_step is not None:
            on_step()           # reads optimizer memory while the grads are still there
        t_hook = time.perf_counter() - t2
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        sync()
        t3 = time.perf_counter()
        losses.append(loss.item())
        opt_ms.append((t2 - t1) * 1e3)
        step_ms.append((t3 - t0 - t_hook) * 1e3)
    return {"loss": losses, "opt_ms": opt_ms, "step_ms": step_ms}


@torch.no_grad()
def evaluate(model, tokens, seq_len, batch_size, max_windows, device) -> float:
    model.eval()
    starts = eval_starts(len(tokens), seq_len, max_windows)
    total = 0.0
    for chunk in starts.split(batch_size):
        x = windows(tokens, chunk, seq_len).to(device)
        total += model(input_ids=x, labels=x).loss.float().item() * len(chunk)
    model.train()
    return total / len(starts)


class Run:
    """Everything one method needs: the spec, its data, and a way to get fresh base weights."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.device, self.dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
        self.tokens = torch.load(spec["data_path"], weights_only=True)
        self.config = model_config(spec["preset"], spec["model"])
        self.starts = batch_starts(len(self.tokens["ft_train"]), spec["steps"], spec["batch_size"],
                                   spec["seq_len"], spec["seed"])

    def fresh_model(self):
        s = self.spec
        return build_model(self.config, model_path=s["model"], dtype=self.dtype, device=self.device,
                           seed=s["seed"], state_path=s["base_state"])

    def evaluate(self, model) -> float:
        s = self.spec
        return evaluate(model, self.tokens["ft_eval"], s["seq_len"], s["batch_size"], s["eval_windows"], self.device)

    def fine_tune(self, model, meter, desc) -> tuple[methods.Setup, dict]:
        """Set the method up on `model` and train; the meter's baseline is taken before the setup."""
        meter.start()
        setup = methods.build(self.spec["method"], model, self.spec)
        opt_dev, opt_host, mem_now = [], [], []

        def on_step():
            d, h = setup.optimizer_bytes()
            opt_dev.append(d)
            opt_host.append(h)
            mem_now.append(meter.current())

        trace = train(setup.model, setup.optimizer, self.tokens["ft_train"], self.starts, self.spec["seq_len"],
                      self.device, desc=desc, on_step=on_step)
        trace.update(opt_dev=opt_dev, opt_host=opt_host, mem=mem_now, peak=meter.peak(),
                     peak_total=meter.peak_total(), baseline=meter.baseline, memory_how=meter.how)
        return setup, trace


def run_method(spec: dict) -> dict:
    run = Run(spec)
    cpu = run.device.type == "cpu"
    exact = cpu and set_mmap_threshold(EXACT_MMAP_THRESHOLD)
    model = run.fresh_model()
    eval_start = run.evaluate(model)  # equal for all methods: they start from the same weights
    meter = meter_for(run.device)
    if cpu:
        mem = run.fine_tune(model, meter, desc=f"{spec['method']} (memory pass)")[1]
        mem["memory_how"] += ("; glibc M_MMAP_THRESHOLD fixed at 64 KiB in this pass, so freed tensors leave "
                              "the RSS" if exact else "; default allocator (RSS includes freed memory it keeps)")
        model = None
        gc.collect()
        set_mmap_threshold(TIMED_MMAP_THRESHOLD)
        model = run.fresh_model()
    t0 = time.perf_counter()
    setup, trace = run.fine_tune(model, meter, desc=spec["method"] + (" (timed pass)" if cpu else ""))
    wall = time.perf_counter() - t0
    eval_loss = run.evaluate(setup.model)
    if not cpu:
        mem = trace
    elif mem["loss"] != trace["loss"]:
        mem["memory_how"] += "; WARNING: the memory pass's losses differ from the timed pass's"
    describe, lr, trainable = setup.describe, setup.lr, setup.trainable_params()

    timed = slice(1, None) if spec["steps"] > 1 else slice(None)  # step 1 allocates state lazily
    tokens_per_step = spec["batch_size"] * spec["seq_len"]
    return {
        "method": spec["method"],
        "describe": describe,
        "lr": lr,
        "trainable_params": trainable,
        "peak_mem_bytes": mem["peak"],
        "peak_total_bytes": mem["peak_total"],
        "baseline_bytes": mem["baseline"],
        "memory_how": mem["memory_how"],
        "opt_device_bytes": max(trace["opt_dev"]),
        "opt_host_bytes": max(trace["opt_host"]),
        "opt_step_ms": statistics.median(trace["opt_ms"][timed]),
        "step_ms": statistics.median(trace["step_ms"][timed]),
        "tokens_per_s": tokens_per_step * len(trace["step_ms"][timed]) / (sum(trace["step_ms"][timed]) / 1e3),
        "train_loss": statistics.fmean(trace["loss"][-TAIL:]),
        "eval_loss": eval_loss,
        "eval_loss_start": eval_start,
        "steps": spec["steps"],
        "wall_s": wall,
        "loss_curve": trace["loss"],
        "opt_step_ms_trace": trace["opt_ms"],
        "step_ms_trace": trace["step_ms"],
        "opt_device_bytes_trace": trace["opt_dev"],
        "opt_host_bytes_trace": trace["opt_host"],
        "mem_trace": mem["mem"],
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    row = run_method(spec)
    with open(result_path, "w") as f:
        json.dump(row, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
