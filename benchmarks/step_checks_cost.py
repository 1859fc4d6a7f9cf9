"""What step()'s host-side checks cost at the 7B shape: the .grad checks (is each grad still the packed
view? copy it in if not), the requires_grad flag checks and the param-group checks, against the update
itself.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_checks_cost.py [--repeat 200]

The checks depend on the number of parameters, not their size, so they are timed on a Llama with the
Llama-2-7B *structure* (32 blocks, 291 trained tensors) and small widths, with gamma=2 (21 bound params)
and with every block active (291 bound). The step they are compared with is the CPU kernel's time for the
7B active set: active elements from memory_stats() of a real-shape meta model, times the C++ kernel's
measured ns per element (fp32 state, one thread) over a 16.8M-element packed buffer timed here.
Prints microseconds per step and the ratio; nothing is asserted (a benchmark, not a test).
"""
from __future__ import annotations

import argparse
import time

import torch


def check_cost(gamma: int, repeat: int, swapped: bool = False) -> float:
    """Microseconds per step of FusedLISA.step()'s checks (everything before the kernel) at gamma."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lisa_fused import FusedLISA, groups

    cfg = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    opt = FusedLISA(model, n_active_layers=gamma, backend="cpu")
    x = torch.randint(0, 256, (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    parts = opt._slots.segments()
    idx = [i for _, sp in parts for i in sp]
    assert len(opt._params) == 291, len(opt._params)
    grads = {i: opt._params[i].grad.detach().clone() for i in idx}

    def checks():
        if swapped:  # the slow path: every .grad a tensor of its own, copied in
            for i in idx:
                opt._params[i].grad = grads[i].clone()
        groups.check_unchanged(opt.param_groups, opt._layout_keys)
        opt._slots.check_flags()
        opt._binding.check_grad_shapes(idx)
        for _, sp in parts:
            [opt._binding.collect(i) for i in sp]

    checks()
    t = time.perf_counter()
    for _ in range(repeat):
        checks()
    per = (time.perf_counter() - t) / repeat * 1e6
    if swapped:  # subtract the test's own clones
        t = time.perf_counter()
        for _ in range(repeat):
            for i in idx:
                grads[i].clone()
        per -= (time.perf_counter() - t) / repeat * 1e6
    return per, len(idx)


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
            what = "every .grad replaced (copied in)" if swapped else ".grad = the packed views"
            print(f"gamma={gamma:2d} ({bound} bound params), {what}: checks {us:8.1f} us per step; "
                  f"7B CPU step {kernel_us / 1e3:8.1f} ms -> {100 * us / kernel_us:.4f}% of the step")


if __name__ == "__main__":
    main()
