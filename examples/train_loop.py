"""Fine-tune a tiny Llama with FusedLISA in a plain PyTorch loop: offline, on the CPU, in seconds.

    python examples/train_loop.py                      # 4 blocks, 1 trained at a time, switch every 10 steps
    python examples/train_loop.py --dtype bf16         # bf16 params, fp32 masters inside the optimizer
    python examples/train_loop.py --help

The model is built from a config (no download); the data is the Zen of Python (from the standard
library's `this` module), byte by byte. Swap in your own model and data loader: the loop stays the same.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import logging
import time

import torch

from lisa_fused import FusedLISA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def text_windows(seq_len: int, seed: int) -> torch.Tensor:
    """[n, seq_len] byte windows of the Zen of Python at random offsets."""
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the poem
        import this
    data = torch.tensor(list(codecs.decode(this.s, "rot13").encode()) * 4)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (len(data) // seq_len,), generator=g)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()])


def tiny_llama(layers: int, hidden: int, seq_len: int, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len, use_cache=False)
    return LlamaForCausalLM(cfg).to(dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="transformer blocks in the model")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--n-active", type=int, default=1, help="blocks trained at a time (LISA's gamma)")
    p.add_argument("--switch-every", type=int, default=10, help="optimizer steps between draws (LISA's K)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto", help="auto | cpu | torch | cuda | triton")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # FusedLISA logs each switch
    data = text_windows(args.seq, args.seed)
    model = tiny_llama(args.layers, args.hidden, args.seq, DTYPES[args.dtype], args.seed)
    opt = FusedLISA(model, lr=args.lr, weight_decay=0.01, n_active_layers=args.n_active,
                    switch_every=args.switch_every, seed=args.seed, backend=args.backend)
    print(opt)
    g = torch.Generator().manual_seed(args.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ever_active = set()
    start, first = time.time(), None
    for step in range(1, args.steps + 1):
        ever_active.update(opt.active_layers)
        batch = data[torch.randint(0, len(data), (args.batch,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()  # switches to the next active set every switch_every steps, after the update
        opt.zero_grad()
        first = loss.item() if first is None else first
        if step % args.switch_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  training blocks {opt.active_layers} next")
    stats = opt.memory_stats()
    print(f"loss {first:.3f} -> {loss.item():.3f} in {time.time() - start:.1f}s; optimizer holds "
          f"{stats['device_bytes'] / 2**10:.0f} KiB on {opt.device}, {stats['host_bytes'] / 2**10:.0f} KiB paged out")
    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}
    print(f"{sum(changed.values())} of {len(changed)} params changed; blocks trained: {sorted(ever_active)}")
    return {"first_loss": first, "last_loss": loss.item(), "active_layers": opt.active_layers,
            "changed": changed, "ever_active": ever_active}


if __name__ == "__main__":
    main()
