"""FusedLISA as DeepSpeed ZeRO 1/2/3's client optimizer (issue 25; docs/engines-findings.md 4.4).

`enter(opt, session)` runs when ZeRO writes its first flat fp32 partition into a FusedLISA param group,
inside its construction (engines.follow_params; lisa_fused/zero.py finds the ZeRO object). From then on
FusedLISA's step, state_dict, load_state_dict and `state` are a `ZeroClient`'s:

* ZeRO calls `step()` once per ZeRO group (stage 1/2) or sub-group (stage 3) with one flat fp32 partition
  and its flat gradient; every parameter slice of it (ZeroSession.slices) is one segment of a single
  kernels.adamw_segments_ launch: param = the slice of the partition (a contiguous view), grad = the same
  slice of its gradient, moments = fp32 buffers of the partition's size, at the slice's offset. Each
  trained param's AdamW step count advances once per ZeRO step on every rank.
* after ZeRO's step (ZeroSession.wrap_step), every `switch_every` steps: FusedLISA's draw (rank 0's
  generator), the flags, ZeRO's own constructor re-run for the new trainable set (ZeroSession.rebuild, the
  parameter order: always-trained, then active blocks by slot), and the state carried over. State is kept
  per (param, element range [a, b) of the flattened param); where ZeRO gave any rank another range of a
  param (ZeRO 1/2 re-partitions), its pieces are re-assembled across ranks (zero.gather_slice). Leaving
  blocks' moments (and, for a DeepSpeed-bf16 model, fp32 masters) go to host ("host"), stay ("device") or
  are dropped ("drop", the block restarts from step 1), as `inactive_moments` says.
* checkpoints: ZeRO saves `state_dict()` in every rank's file (this rank's pieces); before the engine
  loads one, the saved active set and slot order are restored (ZeroSession.wrap_load_checkpoint), so
  DeepSpeed's own load finds its layout; same world size only (DeepSpeed's rule).

Refused at `enter`, each naming the option: state formats other than fp32 moments / fp32 masters, the
grad_norm sampler, a ZeRO 1/2 param group without an always-trained param, a bf16/fp16 model without
DeepSpeed's `bf16: {enabled: true}`, DeepSpeed fp16, state from steps taken before deepspeed.initialize,
ranks that drew different blocks (plus zero.py's refusals: offload, MoE, ...).
"""
from __future__ import annotations

import collections

import torch

from . import hparams, kernels, update
from .zero import ZeroSession, gather_slice

VERSION = 1


def _refusals(opt, session) -> list[str]:
    out = []
    for k, g in enumerate(opt.param_groups):
        if g.get("moments", "fp32") != "fp32" or g.get("master_weights", "fp32") != "fp32":
            out.append(f"param_groups[{k}] moments={g.get('moments')!r} master_weights={g.get('master_weights')!r} "
                       "(under ZeRO the masters are ZeRO's fp32 partitions: use moments='fp32', master_weights='fp32')")
    name = getattr(opt._sampler, "name", None)
    if name == "grad_norm":  # (its per-block sums come from FusedLISA's own launch, not ZeRO's slices)
        out.append("sampler='grad_norm' (use 'uniform', 'loss_feedback' or a callable)")
    if name in ("weight_norm", "outlier") and session.stage == 3:  # (they read the params: ZeRO-3 partitions them)
        out.append(f"sampler={name!r} at stage 3, where each rank holds a partition of every param (use 'uniform', "
                   "'loss_feedback' or a callable, or ZeRO 1/2)")
    if opt._global_step or any(opt._steps):
        out.append(f"a FusedLISA that already took {opt._global_step} steps (build it fresh before "
                   "deepspeed.initialize)")
    engine = session.engine
    if engine is not None and engine.fp16_enabled():
        out.append("DeepSpeed fp16 (use bf16: {enabled: true} with a bf16 model, or fp32)")
    if opt.param_dtype != torch.float32 and not (engine is not None and engine.bfloat16_enabled()):
        out.append(f"a {opt.param_dtype} model with DeepSpeed's bf16 off (set bf16: {{enabled: true}} in the config)")
    if session.stage in (1, 2):
        for k, g in enumerate(opt.param_groups):  # (g["params"] is ZeRO's already: membership from _group_of)
            if not any(opt._group_of[i] is g for i in opt._always):
                out.append(f"param_groups[{k}] holds no always-trained param (ZeRO {session.stage} needs every group "
                           "non-empty in every interval: put the block params in a group with the embedding or head)")
    return out


def enter(opt, session: ZeroSession) -> None:
    """Make `opt` ZeRO's client (module doc); RuntimeError naming what is not supported."""
    refused = _refusals(opt, session)
    if refused:
        raise RuntimeError(f"FusedLISA under DeepSpeed ZeRO stage {session.stage} does not support "
                           f"{'; '.join(refused)}")
    opt._sync_generator_from_rank0()
    ZeroClient._agreed(opt.active_layers, "build FusedLISA after torch.distributed is initialized "
                       "(deepspeed.init_distributed()), or with the same seed on every rank")
    opt._store.release()  # (FusedLISA's own paged state: unused under ZeRO)
    opt._packed_state.bufs = []  # (its packed moments too: ZeroClient keeps the state, per ZeRO partition)
    opt._zero = ZeroClient(opt, session)


class ZeroClient:
    """FusedLISA's state and step under ZeRO (module doc). `live[i]`: (exp_avg, exp_avg_sq), fp32 of ZeRO
    partition i's size; `paged[j]`: {range: pieces} of inactive param j (pieces: (m, v) or (m, v, master))."""

    def __init__(self, opt, session: ZeroSession):
        self.opt, self.session = opt, session
        self.index = {id(p): j for j, p in enumerate(opt._params)}
        self.slot_of = dict(opt._slots.slot_of)
        self.masters = opt.param_dtype != torch.float32  # (fp32 models: the partition is the param itself)
        self.live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.paged: dict[int, dict] = {}
        self.counted = False
        self.moved: list[int] = []  # per _place: how many params' state was re-assembled across ranks
        self.state = collections.defaultdict(dict)  # what ZeRO's _hp_mapping links read as optimizer.state
        session.wrap_step(self.after_zero_step)
        session.wrap_load_checkpoint(self.before_load)

    # ------------------------------------------------------------------ the step ZeRO calls per group
    @torch.no_grad()
    def step(self) -> None:
        opt, z = self.opt, self.session
        for g in opt.param_groups:
            for flat in g["params"]:
                if flat.grad is None:
                    continue
                i = z.group_of(flat)
                if not self.counted:  # once per ZeRO step, every trained param, on every rank
                    for j, p in enumerate(opt._params):
                        opt._steps[j] += bool(p.requires_grad)
                    self.counted = True
                slices = z.slices(i)
                if not slices:
                    continue
                m, v = self._buffers(i)
                hp = hparams.read_all([g])[id(g)]
                table = update.hparam_table([g] * len(slices), [opt._steps[self.index[id(s.param)]] for s in slices],
                                            [True] * len(slices), hp={id(g): hp})
                kernels.adamw_segments_(
                    [flat.narrow(0, s.offset, s.numel) for s in slices],
                    [flat.grad.narrow(0, s.offset, s.numel) for s in slices], m, v,
                    kernels.Segments([(s.offset, s.numel) for s in slices]), table,
                    beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, backend=opt.backend, check=False)

    def _buffers(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of ZeRO partition i (zeros on first use: ZeRO's partitions are still being
        built when FusedLISA enters)."""
        if i not in self.live:
            flat = self.session.flats()[i]
            self.live[i] = (torch.zeros_like(flat), torch.zeros_like(flat))
        return self.live[i]

    def after_zero_step(self) -> None:
        if not self.counted:
            return  # (ZeRO called no client step: an overflow step)
        self.counted = False
        opt = self.opt
        opt._global_step += 1
        if opt._global_step % opt.switch_every == 0:
            self.switch(self._agreed(opt._draw()))

    @staticmethod
    def _agreed(new, fix: str = "a callable sampler must not depend on the rank") -> tuple[int, ...]:
        """`new` if every rank drew it (two all_reduces of the sorted indices: min and max), else RuntimeError
        on every rank: ranks training different blocks would deadlock or corrupt ZeRO's collectives."""
        dist = torch.distributed
        mine = torch.tensor(sorted(new), dtype=torch.int64)
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not (torch.equal(low, mine) and torch.equal(high, mine)):
            raise RuntimeError(f"FusedLISA under ZeRO: rank {dist.get_rank()} drew blocks {mine.tolist()}, other ranks "
                               f"drew others; every rank must train the same blocks: {fix}")
        return tuple(new)

    # ------------------------------------------------------------------ the switch
    def order(self) -> list[list[torch.nn.Parameter]]:
        """Each client group's params for ZeRO: always-trained first, then the active blocks by slot
        (a block that stays keeps its place, so under ZeRO 1/2 its range rarely moves)."""
        opt = self.opt
        blocks = [b for b, _ in sorted(self.slot_of.items(), key=lambda t: t[1])]
        seq = list(opt._always) + [j for b in blocks for j in opt._block_params[b]]
        out = []
        for g in opt.param_groups:
            mine = {id(p) for p in opt._params if opt._group_of[self.index[id(p)]] is g}
            out.append([opt._params[j] for j in seq if id(opt._params[j]) in mine])
        return out

    @torch.no_grad()
    def switch(self, new_active, slot_of=None, carry: bool = True) -> None:
        """Train `new_active` from now on (slot_of: the slots to use, e.g. a checkpoint's); carry=False
        leaves the state to the caller (a checkpoint load)."""
        opt = self.opt
        new = tuple(sorted(new_active))
        old = dict(self.slot_of)
        if slot_of is None:
            leaving = [b for b in old if b not in new]
            free = sorted(old[b] for b in leaving) + sorted(set(range(opt.n_active_layers)) - set(old.values()))
            slot_of = {b: s for b, s in old.items() if b in new}
            slot_of.update({b: free.pop(0) for b in new if b not in old})
        if slot_of == old:
            return
        held = self._held() if carry else {}
        leaving_params = []
        for b in (b for b in old if b not in slot_of):
            for j in opt._block_params[b]:
                p = opt._params[j]
                (opt._slots.user_frozen.discard if p.requires_grad else opt._slots.user_frozen.add)(j)
                if p.requires_grad:
                    leaving_params.append(p)
                p.grad = None
                pieces = held.pop(j, {})
                if pieces and opt.inactive_moments != "drop":
                    to = "cpu" if opt.inactive_moments == "host" else None
                    self.paged[j] = {r: tuple(t.to(to, copy=True) if to else t.clone() for t in ts)
                                     for r, ts in pieces.items()}
            opt._slots.set_trainable(b, False)
        for b in (b for b in slot_of if b not in old):
            opt._slots.set_trainable(b, True)
            for j in opt._block_params[b]:
                pieces = self.paged.pop(j, None)
                if pieces and carry:
                    held[j] = {r: tuple(t.to(opt.device) for t in ts) for r, ts in pieces.items()}
                if opt.inactive_moments == "drop":
                    opt._steps[j] = 0  # (no saved state: the block restarts its bias correction from step 1)
        self.slot_of = dict(slot_of)
        opt._slots.slot_of = dict(slot_of)
        self.session.rebuild(self.order(), leaving_params)
        self._place(held)
        if carry and self.masters:
            self.session.write_low_precision()

    def _held(self) -> dict[int, dict]:
        """{param index: {range: (m, v[, master])}} of every slice this rank steps now (views)."""
        out = {}
        for i, flat in enumerate(self.session.flats()):
            m, v = self._buffers(i)
            for s in self.session.slices(i):
                a, n = s.offset, s.numel
                pieces = (m.narrow(0, a, n), v.narrow(0, a, n)) + ((flat.narrow(0, a, n),) if self.masters else ())
                out.setdefault(self.index[id(s.param)], {})[s.range] = pieces
        return out

    @torch.no_grad()
    def _place(self, held: dict[int, dict]) -> None:
        """New moment buffers for ZeRO's current partitions, filled from `held` ({param: {range: pieces}},
        any ranks' ranges): locally where no rank's range moved, else re-assembled (a collective, every
        rank in the same order); masters (pieces[2]) written into ZeRO's fp32 partitions."""
        z, opt = self.session, self.opt
        self.live = {i: (torch.zeros_like(f), torch.zeros_like(f)) for i, f in enumerate(z.flats())}
        where = {}
        for i, flat in enumerate(z.flats()):
            for s in z.slices(i):
                where[self.index[id(s.param)]] = (i, s)
        trained = [j for j, p in enumerate(opt._params) if p.requires_grad]
        dist = torch.distributed
        same = torch.tensor([int(all(r == (where[j][1].range if j in where else None) for r in held.get(j, {})))
                             for j in trained], dtype=torch.int64)
        width = torch.tensor([max((len(ts) for ts in held.get(j, {}).values()), default=0) for j in trained],
                             dtype=torch.int64)
        if trained:
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
        self.moved.append(sum(1 for ok, w in zip(same.tolist(), width.tolist()) if w and not ok))
        for j, ok, w in zip(trained, same.tolist(), width.tolist()):
            if w == 0:
                continue
            i, s = where.get(j, (None, None))
            mine = held.get(j, {})
            if ok:
                pieces = mine.get(s.range) if s is not None else None
            else:
                numel = ZeroSession.numel(opt._params[j])
                pieces = [gather_slice(numel, {r: ts[k] for r, ts in mine.items()}, None if s is None else s.range,
                                       like=z.flats()[0]) for k in range(w)]
                pieces = None if s is None else pieces
            if pieces is None:
                continue
            m, v = self.live[i]
            m.narrow(0, s.offset, s.numel).copy_(pieces[0])
            v.narrow(0, s.offset, s.numel).copy_(pieces[1])
            if len(pieces) > 2:
                z.flats()[i].narrow(0, s.offset, s.numel).copy_(pieces[2])

    # ------------------------------------------------------------------ checkpoints (ZeRO's files)
    def state_dict(self) -> dict:
        opt = self.opt
        # (live slices: moments only, their fp32 masters are ZeRO's partitions, which ZeRO saves; paged: all)
        state = {j: {r: tuple(t.clone() for t in ts[:2]) for r, ts in pieces.items()}
                 for j, pieces in self._held().items()}
        state.update({j: {r: tuple(t.clone() for t in ts) for r, ts in pieces.items()}
                      for j, pieces in self.paged.items()})
        return {"lisa_zero": VERSION, "stage": self.session.stage, "names": list(opt._names),
                "global_step": opt._global_step, "slot_of": dict(self.slot_of), "steps": list(opt._steps),
                "user_frozen": sorted(opt._slots.user_frozen), "generator": opt._generator.get_state(),
                "sampler": opt._sampler.state_dict(), "inactive_moments": opt.inactive_moments,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                "state": state}

    def load_state_dict(self, sd: dict) -> None:
        opt = self.opt
        if not isinstance(sd, dict) or sd.get("lisa_zero") != VERSION:
            raise ValueError("FusedLISA under ZeRO loads only checkpoints saved under ZeRO (DeepSpeed save_checkpoint "
                             f"with FusedLISA as the client), version {VERSION}")
        if list(sd["names"]) != list(opt._names) or sd["stage"] != self.session.stage:
            raise ValueError(f"checkpoint of ZeRO stage {sd['stage']} over other parameters: resume the same model "
                             f"at the same stage (this is stage {self.session.stage})")
        if dict(sd["slot_of"]) != self.slot_of:  # (engine.load_checkpoint aligns it first: before_load)
            raise ValueError(f"checkpoint trained blocks {sorted(sd['slot_of'])}, this optimizer "
                             f"{sorted(self.slot_of)}: "
                             "load it with engine.load_checkpoint")
        opt._global_step, opt._steps = int(sd["global_step"]), list(sd["steps"])
        opt._slots.user_frozen = set(sd["user_frozen"])
        opt._generator.set_state(sd["generator"].cpu())
        opt._sampler.load_state_dict(sd["sampler"])
        for g, saved in zip(opt.param_groups, sd["param_groups"]):
            for k in ("lr", "betas", "eps", "weight_decay"):
                g[k] = saved[k]
        trained = {j for j, p in enumerate(opt._params) if p.requires_grad}
        state = {int(j): {tuple(r): ts for r, ts in pieces.items()} for j, pieces in sd["state"].items()}
        to = "cpu" if opt.inactive_moments == "host" else opt.device
        self.paged = {j: {r: tuple(t.to(to, copy=True) for t in ts) for r, ts in pieces.items()}
                      for j, pieces in state.items() if j not in trained}
        self._place({j: pieces for j, pieces in state.items() if j in trained})

    def before_load(self, load_dir: str, tag: str) -> None:
        """The engine is about to load a checkpoint: train its saved blocks, in its slots, first."""
        sd = torch.load(self.session.zero_file(load_dir, tag), map_location="cpu", weights_only=False, mmap=True)
        saved = self.session.client_state_in(sd["optimizer_state_dict"])
        if isinstance(saved, dict) and "slot_of" in saved and dict(saved["slot_of"]) != self.slot_of:
            self.switch(saved["slot_of"], slot_of=dict(saved["slot_of"]), carry=False)

    def memory_stats(self) -> dict[str, int]:
        """Bytes this rank's client holds (ints): the live moments of its ZeRO partitions and the paged
        pieces of inactive blocks (moments; fp32 masters of a DeepSpeed-bf16 model). ZeRO's own fp32
        partitions and gradients are not counted (they are ZeRO's, as with any client optimizer)."""
        def nbytes(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        live = sum(nbytes(ts) for ts in self.live.values())
        paged = [ts for pieces in self.paged.values() for ts in pieces.values()]
        moments, masters = sum(nbytes(ts[:2]) for ts in paged), sum(nbytes(ts[2:]) for ts in paged)
        host = moments + masters if self.opt.inactive_moments == "host" else 0
        return {"device_bytes": live + moments + masters - host, "host_bytes": host, "moment_bytes": live + moments,
                "master_bytes": masters, "scale_bytes": 0, "compensation_bytes": 0}
