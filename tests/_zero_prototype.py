"""Prototype client of lisa_fused/zero.py (issue 25): LISA's switches under DeepSpeed ZeRO 1, 2 and 3 with a
stand-in optimizer (FusedLISA is not involved), 2 CPU processes on gloo.

    torchrun --standalone --nproc_per_node=2 tests/_zero_prototype.py OUT_DIR

Per scenario: MLPStack (5 blocks), a fixed schedule of active blocks re-drawn every 2 steps, 8 steps.
`SliceAdamW` is what FusedLISA does under ZeRO (docs/engines-findings.md 4.4): it is ZeRO's client, steps
each fp32 partition slice with torch AdamW's single-tensor update, keeps its state per (param, element
range), switches after ZeRO's step (ZeroSession.wrap_step) by re-running ZeRO's constructor
(ZeroSession.rebuild), carries state and fp32 masters whose range moved (gather_slice), and aligns the
trainable set to a checkpoint's before DeepSpeed loads it (ZeroSession.wrap_load_checkpoint). Writes
OUT_DIR/rank{r}.pt: {scenario: results}; tests/test_zero_prototype.py checks them.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

from helpers import MLPStack
from lisa_fused.zero import ZeroSession, gather_slice

WIDTH, N_LAYERS, STEPS, LR, WD, BATCH = 37, 5, 8, 1e-2, 0.01, 8
BETAS, EPS = (0.9, 0.999), 1e-8
# Active blocks per interval (a switch every 2 steps): 0 and 4 never active, 3 leaves and comes back, 1 late.
SCHEDULE = [(2, 3), (1, 2), (1, 3), (2, 3)]
SWITCH_EVERY, SAVE_AT = 2, 3  # (step 3: mid-interval)


def batches(steps=STEPS, batch=BATCH, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(steps)]


def always_and_blocks(model, stack="blocks"):
    """([(name, param)] outside the block stack, [[(name, param)] per block]); stack: the ModuleList's name."""
    always = [(n, p) for n, p in model.named_parameters() if not n.startswith(stack + ".")]
    blocks = [list(blk.named_parameters(prefix=f"{stack}.{b}")) for b, blk in enumerate(model.get_submodule(stack))]
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
    """A client param group that reports DeepSpeed's write of "params" (with the writing frame)."""

    owner = None

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key == "params" and self.owner is not None:
            self.owner.on_group_write(sys._getframe(1))


class SliceAdamW(torch.optim.Optimizer):
    """Stand-in for FusedLISA under ZeRO (module doc)."""

    def __init__(self, model, stack="blocks", schedule=SCHEDULE, lr=LR):
        self.model, self.schedule, self.lr = model, schedule, lr
        self.always, self.blocks = always_and_blocks(model, stack)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.session = None
        self.state_of: dict[str, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.master_of: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self.steps = {n: 0 for n in self.names.values()}
        self.global_step, self.counted, self.moved, self.carried = 0, False, [], []
        self.active = schedule[0]
        set_flags(self.blocks, self.active)
        super().__init__(self.order(), dict(lr=lr, weight_decay=WD))
        self.param_groups = [WatchedGroup(g) for g in self.param_groups]
        for g in self.param_groups:
            g.owner = self

    def order(self):
        """The client group's params: always-trained first, then the active blocks (then the frozen ones,
        which ZeRO leaves out)."""
        active = [p for b in self.active for _, p in self.blocks[b]]
        rest = [p for b in range(len(self.blocks)) if b not in self.active for _, p in self.blocks[b]]
        return [p for _, p in self.always] + active + rest

    # -- DeepSpeed's side --------------------------------------------------------------------------
    def on_group_write(self, frame):
        if self.session is not None:
            return  # (ZeRO's later writes: its own construction re-run, checkpoints, steps)
        self.session = ZeroSession.attach(frame)
        if self.session is None:
            raise RuntimeError("params replaced outside a ZeRO 1-3 construction")
        self.session.wrap_step(self.after_zero_step)
        self.session.wrap_load_checkpoint(self.before_load)

    @torch.no_grad()
    def step(self, closure=None):
        z = self.session
        for g in self.param_groups:
            for flat in g["params"]:
                if flat.grad is None:
                    continue
                i = z.group_of(flat)
                if not self.counted:  # once per ZeRO step, every trained param, on every rank
                    for n, p in self.model.named_parameters():
                        self.steps[n] += p.requires_grad
                    self.counted = True
                for s in z.slices(i):
                    name = self.names[id(s.param)]
                    st = self.state_of.setdefault(name, {})
                    hp, gr = flat.narrow(0, s.offset, s.numel), flat.grad.narrow(0, s.offset, s.numel)
                    if s.range not in st:
                        st[s.range] = (torch.zeros_like(hp), torch.zeros_like(hp))
                    adamw_(hp, gr, *st[s.range], self.steps[name], lr=g["lr"])

    def after_zero_step(self):
        if not self.counted:
            return  # (no client step happened: an overflow, or no gradient)
        self.counted = False
        self.global_step += 1
        if self.global_step % SWITCH_EVERY == 0 and self.global_step // SWITCH_EVERY < len(self.schedule):
            self.switch(self.schedule[self.global_step // SWITCH_EVERY], carry=True)

    # -- the switch ---------------------------------------------------------------------------------
    @torch.no_grad()
    def switch(self, active, carry: bool):
        z = self.session
        owned = z.owned()
        for key, (s, hp) in owned.items():  # a leaving block's master stays here until it returns
            self.master_of[self.names[key]] = {s.range: hp.clone()}
        leaving = [p for b in self.active if b not in active for _, p in self.blocks[b]]
        staying = sorted(self.names[id(p)] for p in self.model.parameters() if p.requires_grad
                         and not any(p is q for q in leaving))
        numel = {n: ZeroSession.numel(p) for n, p in self.model.named_parameters()}
        before = {n: gather_slice(numel[n], self.master_of.get(n, {}), (0, numel[n])) for n in staying} \
            if carry else {}  # (a check: the masters of params trained across the switch, whole)
        self.active = active
        set_flags(self.blocks, active)
        z.rebuild([self.order()], leaving)
        if carry:
            self.moved.append(self.carry(numel))
            now = z.owned()
            self.carried.append(all(torch.equal(before[n], gather_slice(
                numel[n], {now[id(p)][0].range: now[id(p)][1]} if id(p) in now else {}, (0, numel[n])))
                for n, p in self.model.named_parameters() if n in staying))
            z.write_low_precision()

    def carry(self, numel) -> int:
        """State and masters to each trained param's new ranges: local where no rank's range moved,
        re-assembled otherwise. Returns how many params moved."""
        now = {self.names[k]: v for k, v in self.session.owned().items()}
        moved = 0
        for name in sorted(n for n, p in self.model.named_parameters() if p.requires_grad):
            rng = now[name][0].range if name in now else None
            held, master = self.state_of.get(name, {}), self.master_of.get(name, {})
            flags = torch.tensor([int(all(r == rng for r in [*held, *master])), int(bool(held)), int(bool(master))])
            dist.all_reduce(flags[:1], op=dist.ReduceOp.MIN)
            dist.all_reduce(flags[1:], op=dist.ReduceOp.MAX)
            same, any_held, any_master = map(bool, flags.tolist())
            if same:
                if name in now and master:
                    now[name][1].copy_(master[rng])
                continue
            moved += 1
            m = gather_slice(numel[name], {r: t[0] for r, t in held.items()}, rng)
            v = gather_slice(numel[name], {r: t[1] for r, t in held.items()}, rng)
            w = gather_slice(numel[name], master, rng)
            self.state_of[name] = {rng: (m, v)} if rng is not None and any_held else {}
            self.master_of[name] = {rng: w} if rng is not None and any_master else {}
            if any_master and rng is not None:
                now[name][1].copy_(w)
        return moved

    # -- checkpoints (ZeRO saves/loads our state_dict in each rank's file) ---------------------------
    def state_dict(self):
        return {"global_step": self.global_step, "active": self.active, "steps": dict(self.steps),
                "state": self.state_of, "master": self.master_of}

    def load_state_dict(self, sd):
        assert tuple(sd["active"]) == tuple(self.active), (sd["active"], self.active)  # (pre-aligned)
        self.global_step, self.steps = sd["global_step"], dict(sd["steps"])
        self.state_of = {n: {tuple(r): (m.clone(), v.clone()) for r, (m, v) in st.items()} for n, st in sd["state"].items()}
        self.master_of = {n: {tuple(r): w.clone() for r, w in st.items()} for n, st in sd["master"].items()}

    def before_load(self, load_dir, tag):
        """The engine is about to load a checkpoint: train the saved active set first (its layout is what
        DeepSpeed's files hold, and the model states' frozen fragments are keyed by it)."""
        sd = torch.load(self.session.zero_file(load_dir, tag), map_location="cpu", weights_only=False, mmap=True)
        saved = tuple(self.session.client_state_in(sd["optimizer_state_dict"])["active"])
        if saved != tuple(self.active):
            self.switch(saved, carry=False)  # (the checkpoint brings state and fp32 partitions)


def build(stage, rank, world, dtype):
    import deepspeed

    model = MLPStack(WIDTH, N_LAYERS, seed=rank).to(dtype)  # the engine broadcasts rank 0's weights
    opt = SliceAdamW(model)
    config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return model, opt, engine


def full_params(model):
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")]):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def train(engine, opt, data, rank, world, dtype, save=None):
    seq, losses = [], []
    for step, (x, y) in data:
        seq.append(opt.active)
        n = x.shape[0] // world
        loss = torch.nn.functional.mse_loss(engine(x[rank * n:(rank + 1) * n].to(dtype)).float(),
                                            y[rank * n:(rank + 1) * n])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if save is not None and step + 1 == SAVE_AT:
            engine.save_checkpoint(save, tag="mid")
    return seq, losses


def scenario(stage, rank, world, dtype, out_dir, name):
    model, opt, engine = build(stage, rank, world, dtype)
    zero_id = id(engine.optimizer)
    before = full_params(model)
    data = list(enumerate(batches()))
    seq, losses = train(engine, opt, data, rank, world, dtype, save=f"{out_dir}/{name}")
    res = {"seq": seq, "losses": losses, "moved": opt.moved, "masters_carried": opt.carried,
           "params": full_params(model), "before": before, "same_zero_object": id(engine.optimizer) == zero_id,
           "zero_class": type(engine.optimizer).__name__, "stage": opt.session.stage, "steps": dict(opt.steps),
           "state_elements": sum(m.numel() for st in opt.state_of.values() if st for m, _ in st.values())}
    engine.destroy()
    # resume: a fresh model (other seed), optimizer and engine; load the mid-interval checkpoint, go on
    model, opt, engine = build(stage, rank, world, dtype)
    engine.load_checkpoint(f"{out_dir}/{name}", tag="mid")
    res["resumed_active"], res["resumed_step"] = opt.active, opt.global_step
    rseq, _ = train(engine, opt, data[SAVE_AT:], rank, world, dtype)
    res["resumed_seq"], res["resumed_params"] = rseq, full_params(model)
    engine.destroy()
    return res


LLAMA_SCHEDULE = [(1, 2), (0, 1), (0, 2), (1, 2)]  # 4 layers: 3 never active


class StandInFactory:
    """Trainer(optimizer_cls_and_kwargs=(StandInFactory, {...})): called as StandInFactory()(model, **kw)."""

    def __call__(self, model, **kwargs):
        return SliceAdamW(model, stack="model.layers", schedule=LLAMA_SCHEDULE, **kwargs)


def scenario_trainer(rank, world, out_dir, stage=3, reentrant=True):
    """TrainingArguments(deepspeed=ZeRO-3 + bf16, gradient_checkpointing=True) with the stand-in through
    optimizer_cls_and_kwargs (LlamaFactory PR #3103's combination); a DeepSpeed checkpoint at step 3,
    resumed by a fresh Trainer (resume_from_checkpoint) to step 8."""
    import transformers
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    from helpers import lm_batch, tiny_llama

    transformers.logging.set_verbosity_error()
    data = [{"input_ids": x, "labels": x} for x in torch.cat([lm_batch(s, batch=4) for s in range(8)])]

    def run(max_steps, resume=None):
        args = TrainingArguments(
            output_dir=f"{out_dir}/trainer_z{stage}", report_to=[], max_steps=max_steps,
            per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0,
            save_strategy="steps", save_steps=SAVE_AT, lr_scheduler_type="constant",
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant},
            max_grad_norm=0.0,
            deepspeed={"zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"},
                       "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                       "gradient_clipping": "auto", "steps_per_print": 10 ** 9})
        # (CPU only: TrainingArguments refuses bf16=True without use_cpu, and use_cpu turns DeepSpeed off;
        # so bf16 is switched on after the checks, in the args and in the DeepSpeed config they filled)
        args.bf16 = True
        args.hf_deepspeed_config.config["bf16"]["enabled"] = True
        args.hf_deepspeed_config._dtype = torch.bfloat16
        model = tiny_llama(4, seed=rank, dtype=torch.bfloat16)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          optimizer_cls_and_kwargs=(StandInFactory, {"lr": 1e-3}))
        trainer.train(resume_from_checkpoint=resume)
        opt = trainer.optimizer
        while not isinstance(opt, SliceAdamW):
            opt = opt.optimizer
        params = full_params(trainer.model_wrapped.module)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        out = {"params": params, "active": opt.active, "global_step": opt.global_step, "losses": losses,
               "stage": opt.session.stage}
        trainer.model_wrapped.destroy()
        AcceleratorState._reset_state(True)
        return out

    before = full_params(tiny_llama(4, seed=0, dtype=torch.bfloat16))
    full = run(8)
    resumed = run(8, resume=f"{out_dir}/trainer_z{stage}/checkpoint-{SAVE_AT}")
    return {"full": full, "resumed": resumed, "before": before}


def main(out_dir):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    only = os.environ.get("ZERO_PROTOTYPE_ONLY")  # (a scenario name, to run one by hand)
    for name, stage, dtype in [("zero1", 1, torch.float32), ("zero2", 2, torch.float32),
                               ("zero3", 3, torch.float32), ("zero2_bf16", 2, torch.bfloat16),
                               ("zero3_bf16", 3, torch.bfloat16)]:
        if only and name != only:
            continue
        try:
            results[name] = scenario(stage, rank, world, dtype, out_dir, name)
        except Exception:  # (recorded: the test shows it; the other stages still run)
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank} {name}:\n{results[name]['error']}", flush=True)
        dist.barrier()
    try:
        if not only or only == "trainer_zero3":
            results["trainer_zero3"] = scenario_trainer(rank, world, out_dir)
    except Exception:
        results["trainer_zero3"] = {"error": traceback.format_exc()}
        print(f"rank {rank} trainer_zero3:\n{results['trainer_zero3']['error']}", flush=True)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
