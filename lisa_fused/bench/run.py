"""Fine-tune with one method and measure it. bench.py runs `main(SPEC.json, RESULT.json)` for one method
in a fresh process (importing the parent's lisa_fused, which the child checks), so that its peak memory
is its own (see memory.py).

On CUDA one pass measures everything. On CPU there are two passes over the same steps, each from a
fresh copy of the base weights: the first measures peak memory with glibc set to give freed tensors
back to the OS from the process start, both as anonymous RSS and as live tensor bytes (an allocation
tracker on the real tensors, see memory.py); the second, with glibc's reuse back on and no tracker,
times the steps and gives the losses, which must equal the first pass's (memory.py says why).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

import contextlib

import torch

import lisa_fused

from . import FUSED_LISA_METHODS, methods, peers, progress
from .data import batch_starts, eval_starts, windows
from .memory import EXACT_MMAP_THRESHOLD, TIMED_MMAP_THRESHOLD, TensorMeter, meter_for, set_mmap_threshold
from .models import DTYPES, build_model, model_config


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent, summed over the machine's CPUs, since boot (Linux /proc/stat:
    user + nice + system + irq + softirq + steal; steal is the hypervisor running other guests); None where
    /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


TAIL = 5  # the final train loss is the mean over this many last steps


class _Clock:
    """Step timestamps without synchronizing inside the loop. CUDA: events on the compute stream, read
    after the loop, so the paging copies on FusedLISA's side stream overlap the next forward as they
    would in training and show up only where the compute stream waits for them. CPU: perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def train(model, optimizer, tokens, starts, seq_len, device, *, desc, scheduler=None, on_step_begin=None,
          before_step=None, on_step=None) -> dict:
    """Plain loop: [on_step_begin(i)], forward, backward, [before_step()], optimizer.step(), [on_step()],
    zero_grad(). Per step: the whole step's time (from one forward's start to the next's, on_step_begin
    included: the published LISA switch runs there) and optimizer.step()'s, with no device sync inside the
    loop except the loss's .item() (which waits for the compute stream only)."""
    step_clock, opt_clock = _Clock(device), _Clock(device)
    model.train()
    losses = []
    for i, batch_starts_i in enumerate(progress.steps(starts, desc)):
        x = windows(tokens, batch_starts_i, seq_len).to(device)
        step_clock.mark()
        if on_step_begin is not None:
            on_step_begin(i)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if hasattr(optimizer, "observe_loss"):
            optimizer.observe_loss(loss.detach())  # FusedLISA's loss_feedback sampler (a no-op for the others)
        if before_step is not None:
            before_step()       # reads the grads before step() (BAdam frees them inside it; host-side only)
        opt_clock.mark()
        optimizer.step()
        opt_clock.mark()
        if on_step is not None:
            on_step()           # reads the optimizer's state after its update (host-side only)
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    step_clock.mark()
    opt_ms = opt_clock.elapsed_ms()[::2]
    return {"loss": losses, "opt_ms": opt_ms, "step_ms": step_clock.elapsed_ms()}


def split_switch_steps(step_ms: list[float], switch_every: int | None) -> dict:
    """Normal steps vs switch steps. Step i (0-based) switches inside its step() when (i+1) % K == 0;
    its copies can land in step i+1 (where the compute stream waits for the page-in), so a switch's
    step time is the slower of steps i and i+1. Step 0 (lazy state, first-call overheads) is excluded."""
    n = len(step_ms)
    if not switch_every:
        normal = step_ms[1:] if n > 1 else step_ms
        return {"normal_step_ms": statistics.median(normal), "switch_step_ms": None, "switches": 0}
    switch_at = [i for i in range(n) if (i + 1) % switch_every == 0]
    near = {j for i in switch_at for j in (i, i + 1)} | {0}
    normal = [t for i, t in enumerate(step_ms) if i not in near] or step_ms[1:] or step_ms
    timed = [max(step_ms[i], step_ms[i + 1]) for i in switch_at if i + 1 < n and i > 0]
    return {"normal_step_ms": statistics.median(normal),
            "switch_step_ms": statistics.median(timed) if timed else None, "switches": len(timed)}


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

    def fine_tune(self, model, meter, desc, tensors: TensorMeter | None = None) -> tuple[methods.Setup, dict]:
        """Set the method up on `model` and train; the meter's baseline is taken before the setup (and
        after the method's libraries are imported: importing peft alone adds tens of MB of RSS).
        `tensors`: also count live tensor bytes over the setup and the steps (CPU memory pass)."""
        methods.import_libraries(self.spec["method"])
        meter.start()
        if tensors is not None:
            tensors.start(model, *self.tokens.values())
        grads, state_dev, opt_host, mem_now, tensor_now = [], [], [], [], []
        try:
            setup = methods.build(self.spec["method"], model, self.spec)

            def before_step():
                grads.append(setup.grad_bytes())

            def on_step():
                d, h = setup.state_bytes()
                state_dev.append(d)
                opt_host.append(h)
                mem_now.append(meter.current())
                if tensors is not None:
                    tensor_now.append(tensors.current())

            cpu0, wall0, machine0 = time.process_time(), time.perf_counter(), machine_busy_seconds()
            trace = train(setup.model, setup.optimizer, self.tokens["ft_train"], self.starts,
                          self.spec["seq_len"], self.device, desc=desc, on_step_begin=setup.on_step_begin,
                          before_step=before_step, on_step=on_step)
        finally:
            if tensors is not None:
                tensors.stop()
        own, wall, machine1 = time.process_time() - cpu0, time.perf_counter() - wall0, machine_busy_seconds()
        # Share of its threads' CPU time this process used (low also when the model is too small to keep
        # every thread busy), and the share of the machine's CPUs others used meanwhile (what BUSY reads).
        trace["cpu_share"] = own / (wall * torch.get_num_threads())
        trace["others_share"] = (None if machine0 is None or machine1 is None
                                 else max(0.0, machine1 - machine0 - own) / (wall * (os.cpu_count() or 1)))
        cuda = self.device.type == "cuda"
        trace.update(opt_dev=[s + g for s, g in zip(state_dev, grads)], state_dev=state_dev, grads=grads,
                     opt_host=opt_host, mem=mem_now, peak=meter.peak(),
                     peak_total=meter.peak_total(), baseline=meter.baseline, memory_how=meter.how,
                     peak_rss=None if cuda else meter.peak_rss(), file_added=None if cuda else meter.file_added(),
                     tensor_mem=tensor_now if tensors is not None else None,
                     peak_tensor=meter.peak() if cuda else (tensors.peak() if tensors is not None else None),
                     tensor_how=("the same as peak_mem_bytes: torch.cuda.max_memory_allocated counts live "
                                 "tensor blocks" if cuda else tensors.how if tensors is not None else None))
        return setup, trace


def run_method(spec: dict) -> dict:
    run = Run(spec)
    cpu = run.device.type == "cpu"
    memory_pass = spec.get("memory_pass", True)  # a repeat (other seed/sampler) skips it: same memory
    exact = cpu and set_mmap_threshold(EXACT_MMAP_THRESHOLD if memory_pass else TIMED_MMAP_THRESHOLD)
    model = run.fresh_model()
    eval_start = run.evaluate(model)  # equal for all methods: they start from the same weights
    meter = meter_for(run.device)
    load_start = os.getloadavg()[0]
    if cpu and memory_pass:
        untraceable = peers.UNTRACEABLE.get(spec["method"])
        mem = run.fine_tune(model, meter, desc=f"{spec.get('label', spec['method'])}: memory pass 1/2",
                            tensors=None if untraceable else TensorMeter())[1]
        if untraceable:
            mem["tensor_how"] = f"not measured: {untraceable}"
        mem["memory_how"] += ("; glibc M_MMAP_THRESHOLD fixed at 64 KiB in this pass, so freed tensors leave "
                              "the RSS" if exact else "; default allocator (RSS includes freed memory it keeps)")
        model = None
        gc.collect()
        set_mmap_threshold(TIMED_MMAP_THRESHOLD)
        model = run.fresh_model()
    t0 = time.perf_counter()
    label = spec.get("label", spec["method"])
    setup, trace = run.fine_tune(model, meter, desc=label + (": timed pass 2/2" if cpu and memory_pass
                                                             else ": train"))
    wall = time.perf_counter() - t0
    print(f"{spec['method']}: eval", file=sys.stderr, flush=True)
    eval_loss = run.evaluate(setup.model)
    load_end = os.getloadavg()[0]
    if not cpu:
        mem = trace
    elif not memory_pass:
        mem = {"peak": None, "peak_total": None, "baseline": None, "mem": [None] * len(trace["loss"]),
               "peak_rss": None, "peak_tensor": None, "file_added": None, "tensor_mem": None, "tensor_how": None,
               "memory_how": "not measured: a repeat of a row above (another seed or sampler, same memory)"}
    elif mem["loss"] != trace["loss"]:
        mem["memory_how"] += "; WARNING: the memory pass's losses differ from the timed pass's"
    describe, lr, trainable = setup.describe, setup.lr, setup.trainable_params()
    own_stats = setup.optimizer.memory_stats() if hasattr(setup.optimizer, "memory_stats") else None

    timed = slice(1, None) if spec["steps"] > 1 else slice(None)  # step 1 allocates state lazily
    tokens_per_step = spec["batch_size"] * spec["seq_len"]
    steps = split_switch_steps(trace["step_ms"], setup.switch_every)
    step_ms = statistics.median(trace["step_ms"][timed])
    probs = getattr(setup.optimizer, "sampler_probabilities", lambda: None)()
    return {
        "method": label,
        "base_method": spec["method"],
        "sampler": spec.get("sampler") if spec["method"] in FUSED_LISA_METHODS else None,
        "run_seed": spec.get("run_seed", spec["seed"]),
        "sampler_probabilities": probs,
        "optimizer_memory_stats": own_stats,
        "describe": describe,
        "backend": setup.backend,
        "lisa_fused_file": lisa_fused.__file__,
        "load_avg": [load_start, load_end],
        "cpu_share": trace["cpu_share"] if cpu else None,
        "others_share": trace["others_share"],
        "threads": torch.get_num_threads() if cpu else None,
        "lr": lr,
        "trainable_params": trainable,
        "peak_mem_bytes": mem["peak"],
        "peak_tensor_bytes": mem["peak_tensor"],
        "peak_rss_bytes": mem["peak_rss"],
        "file_pages_added_bytes": mem["file_added"],
        "peak_total_bytes": mem["peak_total"],
        "baseline_bytes": mem["baseline"],
        "memory_how": mem["memory_how"],
        "tensor_how": mem["tensor_how"],
        "opt_device_bytes": max(trace["opt_dev"]),
        "opt_device_end_bytes": trace["opt_dev"][-1],
        "opt_state_device_bytes": max(trace["state_dev"]),
        "grad_bytes": max(trace["grads"]),
        "opt_host_bytes": max(trace["opt_host"]),
        "opt_host_end_bytes": trace["opt_host"][-1],
        "opt_step_ms": statistics.median(trace["opt_ms"][timed]),
        "step_ms": step_ms,
        "tokens_per_s": tokens_per_step / (step_ms / 1e3),
        **steps,
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
        "opt_state_device_bytes_trace": trace["state_dev"],
        "grad_bytes_trace": trace["grads"],
        "mem_trace": mem["mem"],
        "tensor_mem_trace": mem["tensor_mem"],
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    if os.path.realpath(lisa_fused.__file__) != os.path.realpath(spec["lisa_fused_file"]):
        print(f"lisa-fused bench: this child imported {lisa_fused.__file__}, the parent "
              f"{spec['lisa_fused_file']}", file=sys.stderr)
        return 3
    try:
        # stdout is the parent's report; what the optimizers print (BAdam announces every block) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            row = run_method(spec)
    except peers.Unavailable as exc:
        row = {"skipped": {"method": spec.get("label", spec["method"]), "reason": exc.reason, "install": exc.install}}
    except KeyboardInterrupt:
        return 130  # the parent says it once
    with open(result_path, "w") as f:
        json.dump(row, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
