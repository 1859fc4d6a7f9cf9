"""How far FusedLISA's parameters are from torch.optim.AdamW's, per backend: the numbers behind README's
numerical contract.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/adamw_tolerance.py [--steps 20] [--seeds 3] [--backends torch cpu]
    TRITON_INTERPRET=1 python benchmarks/adamw_tolerance.py --backends triton     # Triton's CPU interpreter

A tiny Llama (fp32, 4 blocks of width 64, vocab 97: 204k params) takes `--steps` steps with torch
AdamW's default hyperparameters (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01), twice per
seed: with every block active (n_active_layers=4: plain AdamW) and LISA-style (n_active_layers=2,
switch_every=5), each against torch.optim.AdamW (its default single-tensor path) from the same initial
model with the same blocks frozen at each step. Two kinds of gradients: "fixed" (both optimizers get the
same random gradients: the optimizer's own arithmetic) and "training" (each model's loss on the same
random tokens: a difference in the params changes the next gradients, and Adam's normalised update
amplifies it for gradients near 0). Per parameter tensor the relative difference is
max|p - p_torch| / max|p_torch|; printed is its maximum over tensors, seeds and both runs, with the
largest absolute difference and the share of elements not bitwise equal. Nothing is asserted (a
benchmark, not a test: tests/test_kernels.py and tests/test_optimizer.py hold the tolerances).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform

import torch


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def run(backend: str, seed: int, steps: int, n_active: int, train: bool) -> dict:
    """One run against torch AdamW. train=False: every step feeds both the same random gradients (N(0, 1)
    times 1e-2, drawn per parameter and step), so only the optimizer's arithmetic differs; train=True:
    gradients from forward/backward on each model's own params, so a difference feeds back."""
    from lisa_fused import FusedLISA

    model = tiny_llama(seed)
    ref = copy.deepcopy(model)
    opt = FusedLISA(model, n_active_layers=n_active, switch_every=5, seed=seed, backend=backend)
    ropt = torch.optim.AdamW(ref.parameters())
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        for b, blk in enumerate(ref.model.layers):
            blk.requires_grad_(b in opt.active_layers)
        if train:
            x = torch.randint(0, 97, (4, 16), generator=g)
            for m in (model, ref):
                m(input_ids=x, labels=x).loss.backward()
        else:
            for p, q in zip(model.parameters(), ref.parameters()):
                if q.requires_grad:
                    q.grad = torch.randn(q.shape, generator=g) * 1e-2
                    p.grad = q.grad.clone()
        for o in (opt, ropt):
            o.step()
            o.zero_grad()
    rel, abs_, differ, total = 0.0, 0.0, 0, 0
    for p, q in zip(model.parameters(), ref.parameters()):
        d = (p.detach().double() - q.detach().double()).abs()
        rel = max(rel, d.max().item() / max(q.detach().double().abs().max().item(), 1e-30))
        abs_ = max(abs_, d.max().item())
        differ += int((d > 0).sum())
        total += d.numel()
    opt.release()
    return {"rel": rel, "abs": abs_, "differ": differ, "total": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    args = ap.parse_args()
    torch.set_num_threads(1)  # the CPU kernel's and torch's float order do not depend on the thread count
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, {args.steps} steps x {args.seeds} seeds")
    print("| backend | gradients | max relative difference | max absolute difference | elements not bitwise equal |")
    print("|---|---|---|---|---|")
    for backend in args.backends:
        for train in (False, True):
            runs = [run(backend, s, args.steps, n, train) for s in range(args.seeds) for n in (4, 2)]
            rel, abs_ = max(r["rel"] for r in runs), max(r["abs"] for r in runs)
            differ, total = sum(r["differ"] for r in runs), sum(r["total"] for r in runs)
            print(f"| `{backend}` | {'training' if train else 'fixed'} | {rel:.2e} | {abs_:.2e} | "
                  f"{differ} of {total} ({100 * differ / total:.2f}%) |")

if __name__ == "__main__":
    main()
