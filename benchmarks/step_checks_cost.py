"""What step()'s host side costs at the 7B structure: following the model (one data_ptr per active
param), the param-group and requires_grad checks, reading every active .grad into the segment lists,
the version-counter check of bf16 masters, the hyperparameter table and the kernel's pointer table
(rebuilt only when an address changes), against the update itself.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_checks_cost.py [--repeat 200]

The host side depends on the number of parameters, not their size, so a whole step() is timed on a Llama
with the Llama-2-7B *structure* (32 blocks, 291 trained tensors) and tiny widths (the kernel's own share
of that step is a few microseconds), with gamma=2 (21 active params) and with every block active (291),
with the same grads every step (the pointer table is reused) and with new grad tensors every step (as
after zero_grad(set_to_none=True): rebuilt). The step it is compared with is the CPU kernel's time for the
7B active set: active elements from memory_stats() of a real-shape meta model, times the C++ kernel's
measured ns per element (fp32 state, one thread) over a 16.8M-element buffer timed here. Prints
microseconds per step and the ratio; nothing is asserted (a benchmark, not a test).
"""
from __future__ import annotations

import argparse
import time

import torch


def check_cost(gamma: int, repeat: int, swapped: bool = False) -> tuple[float, int]:
    """(microseconds per FusedLISA.step() at gamma on tiny widths, active params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lisa_fused import FusedLISA

    cfg = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    opt = FusedLISA(model, lr=1e-6, n_active_layers=gamma, switch_every=10**9, backend="cpu")
    x = torch.randint(0, 256, (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    assert len(opt._params) == 291, len(opt._params)
    active = [p for p in opt._params if p.requires_grad]
    grads = [p.grad.detach().clone() for p in active]

    def one():
        if swapped:  # new grad tensors every step: the pointer table is rebuilt
            for p, g in zip(active, grads):
                p.grad = g.clone()
        opt.step()

    one()
    t = time.perf_counter()
    for _ in range(repeat):
        one()
    per = (time.perf_counter() - t) / repeat * 1e6
    if swapped:  # subtract the benchmark's own clones
        t = time.perf_counter()
        for _ in range(repeat):
            for g in grads:
                g.clone()
        per -= (time.perf_counter() - t) / repeat * 1e6
    return per, len(active)


def kernel_ns_per_element(n: int = 16 << 20, repeat: int = 5) -> float:
    from lisa_fused.kernels import Segments, adamw_packed_

    torch.set_num_threads(1)
    p, g, m, v = (torch.randn(n) for _ in range(4))
    v.abs_()
    seg = Segments([(0, n)])
    hp = torch.tensor([[1e-4, 1.0, 0.5, 1.0]], dtype=torch.float64)
    adamw_packed_(p, g, m, v, seg, hp, beta1=0.9, beta2=0.999, eps=1e-8, backend="cpu")
    t = time.perf_counter()
    for _ in range(repeat):
        adamw_packed_(p, g, m, v, seg, hp, beta1=0.9, beta2=0.999, eps=1e-8, backend="cpu")
    return (time.perf_counter() - t) / repeat / n * 1e9


def active_numel_7b(gamma: int) -> int:
    from lisa_fused import FusedLISA
    from lisa_fused.plan.models import load_config, meta_model

    opt = FusedLISA(meta_model(load_config("llama-2-7b"), torch.float32), n_active_layers=gamma)
    n = opt.memory_stats()["active_numel"]
    opt.release()
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    ns = kernel_ns_per_element()
    print(f"C++ kernel (backend 'cpu', fp32 state, 1 thread): {ns:.3f} ns per element")
    for gamma in (2, 32):
        kernel_us = active_numel_7b(gamma) * ns / 1e3
        for swapped in (False, True):
            us, bound = check_cost(gamma, args.repeat, swapped)
            what = "new .grad tensors every step" if swapped else "the same .grad tensors"
            print(f"gamma={gamma:2d} ({bound} active params), {what}: host side {us:8.1f} us per step; "
                  f"7B CPU step {kernel_us / 1e3:8.1f} ms -> {100 * us / kernel_us:.4f}% of the step")


if __name__ == "__main__":
    main()
