"""Exact device memory of FusedLISA at real model shapes (meta device: nothing is allocated), per state
setting, for docs/lean-state.md's table.

    python benchmarks/memory_at_shapes.py [--json out.json]

Per model shape (bf16, and fp32 for the fp32-master settings), gamma 2: the optimizer's own device bytes
(`memory_stats()["device_bytes"]`: masters, moments, scales, compensation), the grads of the params
trained in one interval (always-trained + gamma blocks, in the param dtype: autograd's, counted here so
the total is comparable with what a LoRA run holds), and the total on the device: model weights + those
grads + the optimizer's bytes. GiB = 2**30 bytes.
"""
from __future__ import annotations

import argparse
import json

import torch

SHAPES = ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "llama-3.2-1b"]
SETTINGS = [("fp32", "fp32"), ("8bit", "fp32"), ("8bit", "kahan"), ("4bit", "kahan"), ("4bit", "stochastic")]


def measure(name: str, dtype: torch.dtype, moments: str, master: str, gamma: int = 2) -> dict:
    from lisa_fused import FusedLISA
    from lisa_fused.plan.models import load_config, meta_model

    model = meta_model(load_config(name), dtype)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    opt = FusedLISA(model, n_active_layers=gamma, moments=moments, master_weights=master)
    st = opt.memory_stats()
    grads = sum(p.numel() * p.element_size() for p in opt._params if p.requires_grad)
    trained = sum(p.numel() for p in opt._params if p.requires_grad)
    opt.release()
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "moments": moments, "master_weights": master,
            "trained_params": trained, "weights_bytes": weights, "optimizer_device_bytes": st["device_bytes"],
            "grad_bytes": grads, "total_device_bytes": weights + grads + st["device_bytes"],
            "host_bytes": st["host_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args()
    rows = []
    for name in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for moments, master in SETTINGS:
                if dtype == torch.float32 and master != "fp32":
                    continue  # (kahan / stochastic are for bf16/fp16 params)
                rows.append(measure(name, dtype, moments, master))
    g = 2 ** 30
    print(f"{'model':14} {'dtype':9} {'setting':18} {'trained':>8} {'optimizer':>10} {'+grads':>8} {'total':>8}  GiB")
    for r in rows:
        print(f"{r['model']:14} {r['dtype']:9} {r['moments'] + '/' + r['master_weights']:18} "
              f"{r['trained_params'] / 1e9:7.2f}B {r['optimizer_device_bytes'] / g:10.2f} "
              f"{(r['optimizer_device_bytes'] + r['grad_bytes']) / g:8.2f} {r['total_device_bytes'] / g:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
