"""Prototype (issue 25, phase 1): rebuild DeepSpeed ZeRO-1/2/3's partitions for a new trainable set at a
LISA switch, with a plain stand-in optimizer that steps ZeRO's fp32 partition slices per parameter range.

    torchrun --standalone --nproc_per_node=2 tests/_zero_prototype.py OUT_DIR

For each stage: a MLPStack (5 blocks of odd size 37x37+37), 2 active blocks re-drawn every 2 steps by a
fixed schedule, 8 steps. Writes OUT_DIR/rank{r}.pt: {"zero{stage}": {...}}. tests/test_zero_prototype.py
checks it against torch.optim.AdamW in one process over the whole batches with the same freezing.

What it shows (the DeepSpeed side of docs/engines-findings.md section 4; FusedLISA is not used here):
* the ZeRO optimizer object is re-initialised in place by its own `__init__` with the arguments the engine
  gave it at deepspeed.initialize (read from that call's frame), after `destroy()`, for the new trainable
  set: every reference to it (engine.optimizer, accelerate's wrapper, schedulers) stays valid;
* the client optimizer (here `SliceAdamW`) keeps its state per (parameter, element range it owns): the
  range moves between ranks when ZeRO-1/2 re-partitions, so state whose range moved is re-assembled
  (one all_reduce per such parameter) and each rank takes its new slice;
* the fp32 masters of the params that stay trained are carried into ZeRO's new fp32 partitions (ZeRO
  would re-create them from the low-precision params).
"""
from __future__ import annotations

import inspect
import math
import sys
import traceback

import torch
import torch.distributed as dist

from helpers import MLPStack

WIDTH, N_LAYERS, STEPS, LR, WD, BATCH = 37, 5, 8, 1e-2, 0.01, 8
BETAS, EPS = (0.9, 0.999), 1e-8
# The active blocks of each interval (a switch every 2 steps): blocks 0 and 4 are never active, 3 leaves and
# comes back, 1 arrives late.
SCHEDULE = [(2, 3), (1, 2), (1, 3), (2, 3)]
SWITCH_EVERY = 2


def batches(steps=STEPS, batch=BATCH, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(steps)]


def always_and_blocks(model):
    always = [(n, p) for n, p in model.named_parameters() if not n.startswith("blocks.")]
    blocks = [list(blk.named_parameters(prefix=f"blocks.{b}")) for b, blk in enumerate(model.blocks)]
    return always, blocks


def set_flags(blocks, active):
    for b, named in enumerate(blocks):
        for _, p in named:
            p.requires_grad_(b in active)


def adamw_(p, g, m, v, step, lr=LR, wd=WD):
    """torch.optim.AdamW's single-tensor update (torch/optim/adamw.py, foreach=False), on one slice."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - BETAS[0])
    v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    bc1, bc2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
    denom = (v.sqrt() / math.sqrt(bc2)).add_(EPS)
    p.addcdiv_(m, denom, value=-lr / bc1)


class WatchedGroup(dict):
    """A client param group that records the DeepSpeed frame which assigns its "params" (ZeRO's __init__,
    or for stage 3 a method it calls): the ZeRO optimizer and its constructor arguments."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key == "params" and self.owner is not None and self.owner.zero is None:
            self.owner.capture(sys._getframe(1))

    owner = None


class SliceAdamW(torch.optim.Optimizer):
    """Stand-in client optimizer: torch AdamW on the slices of ZeRO's flat fp32 partitions, state keyed by
    (param name, (start, end) of the param's flattened elements this rank owns); per-param step counts
    count every step of a trained param on every rank (a rank that owns no slice of it still counts: a
    later re-partition may hand it one)."""

    def __init__(self, named, order):
        self.names = {id(p): n for n, p in named}
        self.zero, self.zero_args = None, None
        self.state_of: dict[str, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.master_of: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self.steps = {n: 0 for n, _ in named}
        super().__init__([p for p in order], dict(lr=LR, weight_decay=WD))
        self.param_groups = [WatchedGroup(g) for g in self.param_groups]
        for g in self.param_groups:
            g.owner = self

    # -- who wraps us: ZeRO's own construction call ------------------------------------------------
    def capture(self, frame):
        """Walk up from the assigning frame to the ZeRO optimizer's __init__ and keep its arguments."""
        while frame is not None:
            me = frame.f_locals.get("self")
            if me is not None and type(me).__name__.startswith("DeepSpeedZeroOptimizer") \
                    and frame.f_code is type(me).__init__.__code__:
                sig = inspect.signature(type(me).__init__)
                self.zero = me
                self.zero_args = {k: frame.f_locals[k] for k in list(sig.parameters)[1:]}
                return
            frame = frame.f_back
        raise RuntimeError("params assigned outside a ZeRO optimizer's construction")

    # -- which slice of which param each flat partition holds (DeepSpeed's own bookkeeping) ----------
    def segments(self, flat):
        """[(name, (start, end), fp32 slice, grad slice)] of the flat fp32 partition `flat`."""
        z, out = self.zero, []
        if hasattr(z, "single_partition_of_fp32_groups"):  # ZeRO 1/2: link_hp_params' _hp_mapping
            i = next(k for k, t in enumerate(z.single_partition_of_fp32_groups) if t is flat)
            for lp in z.bit16_groups[i]:
                m = lp._hp_mapping
                if m is None:
                    continue
                a, h = m.lp_fragment_address, m.hp_fragment_address
                out.append((self.names[id(lp)], (a.start, a.start + a.numel), flat.narrow(0, h.start, h.numel),
                            flat.grad.narrow(0, h.start, h.numel)))
            return out, z.bit16_groups[i]
        i = next(k for k, t in enumerate(z.fp32_partitioned_groups_flat) if t is flat)  # ZeRO 3: grad_position
        rank = dist.get_rank()
        for p in z.fp16_groups[i]:
            _, off, n = z.grad_position[z.get_param_id(p)]
            valid = max(0, min(n, p.ds_numel - rank * n))
            if valid:
                out.append((self.names[id(p)], (rank * n, rank * n + valid), flat.narrow(0, off, valid),
                            flat.grad.narrow(0, off, valid)))
        return out, z.fp16_groups[i]

    def owned(self):
        """{name: (range, fp32 slice)} of every slice this rank owns now, over all partitions."""
        out = {}
        z = self.zero
        flats = z.single_partition_of_fp32_groups if hasattr(z, "single_partition_of_fp32_groups") \
            else z.fp32_partitioned_groups_flat
        for flat in flats:
            saved, flat.grad = flat.grad, torch.zeros_like(flat)
            segs, _ = self.segments(flat)
            flat.grad = saved
            for name, rng, hp, _ in segs:
                out[name] = (rng, hp)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for flat in g["params"]:
                if flat.grad is None:
                    continue
                segs, members = self.segments(flat)
                for p in members:  # every trained param of this partition counts the step on every rank
                    self.steps[self.names[id(p)]] += 1
                for name, rng, hp, gr in segs:
                    st = self.state_of.setdefault(name, {})
                    if rng not in st:
                        st[rng] = (torch.zeros_like(hp), torch.zeros_like(hp))
                    adamw_(hp, gr, *st[rng], self.steps[name])


def reassemble(numel, pieces, want):
    """Every rank holds {range: tensor} pieces of a param's flat state; return the slice `want` of this rank
    (None: owns nothing). One all_reduce over the param's full size: collective, so every rank calls it."""
    full = torch.zeros(numel)
    for (a, b), t in pieces.items():
        full[a:b] = t
    dist.all_reduce(full)
    return None if want is None else full[want[0]:want[1]].clone()


@torch.no_grad()
def rebuild(opt, model, always, blocks, active, order):
    """The switch: page out (here: keep) the state and fp32 masters of every range, flip the flags, re-run
    ZeRO's __init__ in place for the new trainable set (the client group holds the trainable params in
    `order`), then carry state and masters to wherever the new partitions put them."""
    z = opt.zero
    for name, (rng, hp) in opt.owned().items():  # (a leaving block's master stays here until it returns)
        opt.master_of[name] = {rng: hp.clone()}
    numel = {n: getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters()}
    staying = sorted(n for n, p in model.named_parameters()
                     if p.requires_grad and not any(b not in active and n.startswith(f"blocks.{b}.") for b in range(len(blocks))))
    before = {n: reassemble(numel[n], opt.master_of.get(n, {}), (0, numel[n])) for n in staying}  # (a check)
    stage3 = not hasattr(z, "single_partition_of_fp32_groups")
    for b, named in enumerate(blocks):  # leaving params still view ZeRO's flat buffers: own storage
        if b not in active:
            for _, p in named:
                if p.requires_grad:
                    if stage3:  # (their partitions live in lp_param_buffer)
                        p.ds_tensor.data = p.ds_tensor.data.clone()
                    else:  # (the whole params live in the flat bit16 group)
                        p.data = p.data.clone()
    z.destroy()
    set_flags(blocks, active)
    opt.param_groups[0]["params"] = list(order)  # (the client group ZeRO replaced by its flat partition)
    type(z).__init__(z, **opt.zero_args)
    if stage3 and not z._get_param_coordinator().is_invalid_trace():  # (a fresh coordinator has none yet)
        z._get_param_coordinator()._invalidate_trace()
    now = opt.owned()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}  # (the same on every rank)
    moved = 0
    for name in sorted(trained):  # (the same order on every rank: the loop holds collectives)
        rng_now = now[name][0] if name in now else None
        held = opt.state_of.get(name, {})
        master = opt.master_of.get(name, {})
        # every rank's range unchanged? (a collective decision: reassembly is a collective)
        same = torch.tensor([int(all(r == rng_now for r in list(held) + list(master)))])
        has_master = torch.tensor([int(bool(master))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        dist.all_reduce(has_master, op=dist.ReduceOp.MAX)
        if bool(same):
            if name in now and master:
                now[name][1].copy_(master[rng_now])
            continue
        moved += 1
        m = reassemble(numel[name], {r: t[0] for r, t in held.items()}, rng_now)
        v = reassemble(numel[name], {r: t[1] for r, t in held.items()}, rng_now)
        w = reassemble(numel[name], master, rng_now)
        opt.state_of[name] = {} if rng_now is None or not held and not bool(has_master) else {rng_now: (m, v)}
        opt.master_of[name] = {} if rng_now is None else {rng_now: w}
        if bool(has_master) and rng_now is not None:
            now[name][1].copy_(w)
    now = opt.owned()
    carried = all(torch.equal(before[n], reassemble(numel[n], {now[n][0]: now[n][1]} if n in now else {}, (0, numel[n])))
                  for n in staying)
    # the carried fp32 masters go to the model's low-precision copies: ZeRO's own fp32 -> lp path
    if not stage3:
        z.update_lp_params()
    else:
        for i in range(len(z.fp16_groups)):
            z._reassign_or_swap_out_partitioned_parameters(i)
    return moved, carried


def scenario(stage, rank, world, dtype=torch.float32):
    import deepspeed

    model = MLPStack(WIDTH, N_LAYERS, seed=rank).to(dtype)  # the engine broadcasts rank 0's weights
    always, blocks = always_and_blocks(model)
    active = SCHEDULE[0]
    set_flags(blocks, active)
    order = [p for _, p in always] + [p for b in active for _, p in blocks[b]]
    opt = SliceAdamW(list(model.named_parameters()), order)
    config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    assert opt.zero is engine.optimizer, (type(engine.optimizer), opt.zero)
    zero_id = id(engine.optimizer)

    def full(p):
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                return p.detach().float().clone()
        return p.detach().float().clone()

    before = {n: full(p) for n, p in model.named_parameters()}
    seq, losses, moved, carried, bytes_ = [], [], [], [], []
    for step, (x, y) in enumerate(batches()):
        if step and step % SWITCH_EVERY == 0:
            active = SCHEDULE[step // SWITCH_EVERY]
            order = [p for _, p in always] + [p for b in active for _, p in blocks[b]]
            m, c = rebuild(opt, model, always, blocks, active, order)
            moved.append(m)
            carried.append(c)
        seq.append(active)
        n = x.shape[0] // world
        out = engine(x[rank * n:(rank + 1) * n].to(dtype)).float()
        loss = torch.nn.functional.mse_loss(out, y[rank * n:(rank + 1) * n])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        bytes_.append(sum(4 * t.numel() for st in opt.state_of.values() for m, v in st.values() for t in (m, v)))
    after = {n: full(p) for n, p in model.named_parameters()}
    owned = {n: rng for n, (rng, _) in opt.owned().items()}
    out = {"seq": seq, "losses": losses, "moved": moved, "masters_carried": carried, "params": after, "before": before,
           "same_zero_object": id(engine.optimizer) == zero_id, "zero_class": type(engine.optimizer).__name__,
           "owned": owned, "state_bytes": bytes_, "steps": dict(opt.steps)}
    engine.destroy()
    return out


def main(out_dir):
    import deepspeed

    import datetime

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, stage, dtype in [("zero1", 1, torch.float32), ("zero2", 2, torch.float32),
                               ("zero3", 3, torch.float32), ("zero2_bf16", 2, torch.bfloat16),
                               ("zero3_bf16", 3, torch.bfloat16)]:
        try:
            results[name] = scenario(stage, rank, world, dtype)
        except Exception:  # (recorded: the test prints it; the other stages still run)
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank} {name}:\n{results[name]['error']}", flush=True)
        dist.barrier()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
