"""FusedLISA vs BAdam 1.4 vs torch AdamW under DeepSpeed ZeRO-3 (issue 25): per-rank optimizer bytes, step
time and eval loss after N steps, same model, data and steps. A benchmark, not a test.

    torchrun --standalone --nproc_per_node=2 benchmarks/zero_compare.py --out results.json
        [--methods adamw,badam,fused_lisa] [--layers 8] [--hidden 128] [--steps 40] [--switch-every 10]

Model: a tiny Llama built from a config (no download), bf16 params with DeepSpeed's bf16 (BAdam expects a
bf16 model). Data: fixed random token windows; the eval loss is the mean over held-out windows. Each
method trains from the same initial weights. Per-rank optimizer bytes = ZeRO's fp32 partitions (the
masters every ZeRO client has) + the client's own state (AdamW's / BAdam's moments; FusedLISA's moments
and paged state, split into device and host). Methods:
  adamw       torch.optim.AdamW over the whole model (ZeRO-3's usual setup)
  badam       badam.BlockOptimizer(AdamW, one block at a time, "ascending", embedding/head not trained,
              its defaults) with opt.ds_optimizer = engine.optimizer (BAdam's README recipe)
  fused_lisa  FusedLISA(model, n_active_layers=1, switch_every=K): embedding, head, norms always trained
Rank 0 prints a table and writes --out (JSON) with the load average and versions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="adamw,badam,fused_lisa")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--switch-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 43 // 16,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.seq, use_cache=False)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def windows(args, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab, (n, args.batch, args.seq), generator=g)


def ds_config(args):
    return {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": True}, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def zero_fp32_bytes(engine) -> int:
    z = engine.optimizer
    flats = getattr(z, "fp32_partitioned_groups_flat", None) or getattr(z, "single_partition_of_fp32_groups", [])
    return sum(tensor_bytes(t) for t in flats)


def make(method, model, args):
    """(client optimizer, after-initialize hook, {name: client-state bytes} function)."""
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        return opt, lambda engine: None, lambda: {"client_device_bytes": tensor_bytes(dict(opt.state)),
                                                  "backend": "torch AdamW"}
    if method == "badam":
        from badam import BlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        prefixes = [[f"model.layers.{i}."] for i in range(args.layers)]
        opt = BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=prefixes,
                             switch_block_every=args.switch_every, switch_mode="ascending", verbose=0)

        def after(engine):
            opt.ds_optimizer = engine.optimizer  # (BAdam's recipe: set by hand after initialize)

        return opt, after, lambda: {"client_device_bytes": tensor_bytes(dict(base.state)),
                                    "backend": "torch AdamW (in BAdam)"}
    if method == "fused_lisa":
        from lisa_fused import FusedLISA
        from lisa_fused.bench.methods import lisa_backend

        opt = FusedLISA(model, lr=args.lr, weight_decay=0.0, n_active_layers=1, switch_every=args.switch_every,
                        seed=0)

        def stats():
            s = opt.memory_stats()
            return {"client_device_bytes": s["device_bytes"], "client_host_bytes": s["host_bytes"],
                    "backend": f"FusedLISA {lisa_backend(opt)}"}  # ('X FALLBACK (why)' off the first choice)

        return opt, lambda engine: None, stats
    raise SystemExit(f"unknown method {method!r}")


def run(method, args, rank, world):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = ds_config(args)
    keep = HfDeepSpeedConfig(config)  # noqa: F841  (BAdam reads is_deepspeed_zero3_enabled() from it)
    model = build_model(args)
    opt, after, client_bytes = make(method, model, args)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    after(engine)
    train, held_out = windows(args, args.steps, seed=1 + rank), windows(args, 4, seed=999)
    times, losses = [], []
    for x in train:
        t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = sum(engine(input_ids=x, labels=x).loss.item() for x in held_out) / len(held_out)
    def median(xs):
        return sorted(xs)[len(xs) // 2] if xs else None

    k = args.switch_every  # (steps k, 2k, ...: the switching steps of badam and fused_lisa, after step 1)
    switching = [t for i, t in enumerate(times) if i and (i + 1) % k == 0]
    plain = [t for i, t in enumerate(times) if i and (i + 1) % k]
    stats = {"method": method, "rank": rank, "zero_fp32_bytes": zero_fp32_bytes(engine), **client_bytes(),
             "step_s_median": median(times[1:]), "step_s_mean": sum(times[1:]) / len(times[1:]),
             "switch_step_s_median": median(switching), "plain_step_s_median": median(plain),
             "first_loss": losses[0], "last_loss": losses[-1], "eval_loss": eval_loss}
    engine.destroy()
    return stats


def main(argv=None):
    import deepspeed

    args = parse(argv)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None,
                               timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for method in args.methods.split(","):
        row = run(method, args, rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        rows.append(gathered)
        dist.barrier()
    if rank == 0:
        print(f"ZeRO-{args.stage}, {world} ranks, tiny Llama {args.layers}x{args.hidden} bf16, {args.steps} steps; "
              f"per-rank bytes (rank 0 / rank 1)")
        print(f"{'method':<11} {'zero fp32':>12} {'client dev':>12} {'client host':>12} {'step ms':>8} "
              f"{'switch ms':>9} {'plain ms':>8} {'eval loss':>9}  backend")
        for ranks in rows:
            r0 = ranks[0]
            cells = [" / ".join(str(r.get(k, 0)) for r in ranks) for k in ("zero_fp32_bytes", "client_device_bytes",
                                                                             "client_host_bytes")]
            print(f"{r0['method']:<11} {cells[0]:>12} {cells[1]:>12} {cells[2]:>12} "
                  f"{1e3 * r0['step_s_median']:>8.1f} {1e3 * r0['switch_step_s_median']:>9.1f} "
                  f"{1e3 * r0['plain_step_s_median']:>8.1f} {r0['eval_loss']:>9.4f}  {r0['backend']}")
        if args.out:
            import deepspeed as ds
            import transformers

            meta = {"load": os.getloadavg(), "platform": platform.platform(), "torch": torch.__version__,
                    "deepspeed": ds.__version__, "transformers": transformers.__version__, "args": vars(args)}
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
