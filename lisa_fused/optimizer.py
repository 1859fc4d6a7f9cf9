"""FusedLISA: LISA fine-tuning as one torch.optim.Optimizer.

The class validates, owns the packed buffers and runs the step/switch cycle; the AdamW math lives in
kernels/ (one call, any backend), the slot layout in packing.py, paged state in paging.py, the block
stack in layers.py and the draw in sampling.py.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from . import kernels, sampling
from .kernels.contract import N_COLS
from .layers import block_weight_norms, find_layout
from .packing import PackedBuffers, PackedLayout, Region
from .paging import POLICIES, MomentStore

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: no DTensor params to meet
    DTensor = ()

logger = logging.getLogger("lisa_fused")

STATE_VERSION = 1


class FusedLISA(torch.optim.Optimizer):
    """AdamW over the embedding, the head and `n_active_layers` sampled blocks, re-drawn every
    `switch_every` steps, with a fused update over a packed buffer of the active layers only.

    With inactive_moments="host" or "device" a run equals torch.optim.AdamW over all parameters where
    frozen blocks simply have no gradient; with "drop" a re-activated block restarts from step 1.
    """

    # GradScaler hands us grad_scale / found_inf instead of unscaling and checking itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        n_active_layers: int = 2,
        switch_every: int = 20,
        seed: int = 0,
        layers: str | nn.Module | None = None,
        sampler: str | Callable = "uniform",
        inactive_moments: str = "host",
        backend: str = "auto",
    ):
        _validate_hparams(lr, betas, eps, weight_decay)
        if not isinstance(model, nn.Module):
            raise TypeError(f"FusedLISA takes the model (an nn.Module), got {type(model).__name__}")
        if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
            raise ValueError(f"Invalid switch_every: {switch_every!r} (must be an integer >= 1)")
        if inactive_moments not in POLICIES:
            raise ValueError(f"Invalid inactive_moments: {inactive_moments!r}; choose one of {POLICIES}")
        if not callable(sampler) and sampler not in sampling.SAMPLERS:
            raise ValueError(f"Invalid sampler: {sampler!r}; choose one of {sampling.SAMPLERS} or pass a callable")

        layout = find_layout(model, layers)
        n_blocks = layout.num_blocks
        if isinstance(n_active_layers, bool) or not isinstance(n_active_layers, int) or not 1 <= n_active_layers <= n_blocks:
            raise ValueError(f"Invalid n_active_layers: {n_active_layers!r} (must be an integer in 1..{n_blocks}, "
                             f"the number of blocks in {layout.stack_path or 'the stack'})")
        if n_active_layers < n_blocks:
            _check_ddp(model)

        named = list(layout.always) + [np for blk in layout.blocks for np in blk]
        params = [p for _, p in named]
        if not params:
            raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
        devices = {p.device for p in params}
        dtypes = {p.dtype for p in params}
        if len(devices) > 1:
            raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"all trainable parameters must share one floating dtype, found {sorted(map(str, dtypes))}")
        self.device = next(iter(devices))
        self.param_dtype = next(iter(dtypes))
        if self.param_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported parameter dtype {self.param_dtype}; use float32, bfloat16 or float16")
        self.backend = kernels.resolve_backend(backend, self.device)
        self._backend_request = backend

        super().__init__([{"params": params}], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

        self.model_layout = layout
        self.n_active_layers = n_active_layers
        self.switch_every = switch_every
        self.inactive_moments = inactive_moments
        self.seed = seed
        self._names = [n for n, _ in named]
        self._params = params
        # FSDP2 (fully_shard) params are DTensors whose local shards live in FSDP's own padded storage,
        # which it all-gathers from: re-pointing .data would be ignored, so they are bound by copy instead
        # (packed buffers hold the rank-local shards; grads are copied in, updated shards copied back).
        self._copy_mode = any(isinstance(p, DTensor) for p in params)
        local = [_local(p) for p in params]
        self._shapes = [tuple(t.shape) for t in local]
        n_always = len(layout.always)
        block_idx, start = [], n_always
        for blk in layout.blocks:
            block_idx.append(range(start, start + len(blk)))
            start += len(blk)
        self._block_params = block_idx
        self._packed = PackedLayout(
            always=Region.of(range(n_always), local),
            blocks=tuple(Region.of(ix, local) for ix in block_idx),
            n_slots=n_active_layers,
        )
        self._bufs = PackedBuffers(self._packed.total, self.device, self.param_dtype)
        self._store = MomentStore(inactive_moments, self.device)
        # pin the host store now, not inside step() on a block's first visit
        self._store.reserve({b: [(buf.dtype, r.length) for buf in self._bufs.paged()]
                             for b, r in enumerate(self._packed.blocks)})
        self._offset: dict[int, int] = {}  # packed param -> offset in the buffers
        self._bound_grad_ptr: dict[int, int] = {}  # packed param -> data_ptr of its grad view
        self._steps = [0] * len(params)  # per-param AdamW step count (bias correction), host ints
        self._has_grad = [False] * len(params)  # set by the post-accumulate hook since the last zero_grad
        self._global_step = 0  # optimizer steps taken (skipped overflow steps excluded)
        self._generator = torch.Generator().manual_seed(seed)
        if callable(sampler):
            self._sampler_name, self._sampler_fn = getattr(sampler, "__name__", "callable"), sampler
        elif sampler == "uniform":
            self._sampler_name, self._sampler_fn = "uniform", sampling.uniform
        else:
            self._sampler_name = "weight_norm"
            self._sampler_fn = sampling.weight_norm_sampler(lambda: block_weight_norms(self.model_layout))
        self._sync_generator_from_rank0()

        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(self._make_grad_hook(i))

        # Pack the always-trained params once; they never move again.
        for i, off, n in self._packed.always.entries:
            self._bind(i, off, write_master=True)
        self._slot_of: dict[int, int] = {}  # active block -> slot
        first = self._draw()
        for b in range(n_blocks):
            if b not in first:
                self._set_trainable(b, False)
        self._activate(leaving=[], arriving=first)

    # ------------------------------------------------------------------------------------ public API
    @property
    def active_layers(self) -> tuple[int, ...]:
        """Block indices trained in the current interval, ascending."""
        return tuple(sorted(self._slot_of))

    def memory_stats(self) -> dict[str, int]:
        """Bytes the optimizer holds: device_bytes (packed params/masters, grads, moments, plus resident
        block state under "device"), host_bytes (paged-out block state)."""
        packed = self._bufs.nbytes()
        store = self._store.nbytes()
        on_device = self._store.policy == "device"
        return {
            "device_bytes": packed + (store if on_device else 0),
            "host_bytes": 0 if on_device else store,
            "packed_bytes": packed,
            "store_bytes": store,
            "active_numel": sum(n for _, _, n in self._packed.placements(self._slot_of)),
            "slot_numel": self._packed.slot_len,
            "pinned_bytes": self._store.pinned_bytes(),  # page-locked host memory, reserved at construction
        }

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (f"FusedLISA(backend={self.backend!r} (asked {self._backend_request!r}), lr={g['lr']}, "
                f"betas={g['betas']}, eps={g['eps']}, weight_decay={g['weight_decay']}, "
                f"n_active_layers={self.n_active_layers}/{len(self._block_params)}, "
                f"switch_every={self.switch_every}, sampler={self._sampler_name!r}, "
                f"inactive_moments={self.inactive_moments!r}, stack={self.model_layout.stack_path!r}, "
                f"active_layers={self.active_layers})")

    def add_param_group(self, param_group):
        if getattr(self, "_params", None) is not None:
            raise NotImplementedError("FusedLISA owns its parameters (the whole model); add_param_group is not supported")
        super().add_param_group(param_group)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True):
        """Zero the packed gradient buffer in one fill. Active params keep their `.grad` views (so the
        next backward accumulates straight into the buffer) whatever `set_to_none` says; whether a
        param got a gradient is tracked separately, so a param that gets none is skipped exactly like
        torch's AdamW skips a `.grad` of None."""
        self._bufs.grad.zero_()
        self._has_grad = [False] * len(self._params)
        for i, p in enumerate(self._params):
            if p.grad is not None and not self._is_bound_grad(i, p.grad):
                p.grad = None if set_to_none else p.grad.zero_()
        for i, off, _ in self._packed.placements(self._slot_of):
            if self._params[i].grad is None and not self._copy_mode:
                self._params[i].grad = self._grad_view(i, off)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            # GradScaler overflow: the step never happened (one host sync, only in this AMP mode).
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=self.device, dtype=torch.float32).reshape(1)

        segments, seg_params = self._segments()
        enabled = [self._collect_grad(i) for i in seg_params]
        for i, on in zip(seg_params, enabled):
            self._steps[i] += on
        hparams = self._hparams(seg_params, enabled)
        self._store.wait_ready()
        g = self.param_groups[0]
        kernels.adamw_packed_(
            self._bufs.master, self._bufs.grad, self._bufs.exp_avg, self._bufs.exp_avg_sq, segments, hparams,
            beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"], param_lowp=self._bufs.lowp,
            grad_scale=grad_scale, backend=self.backend, check=False,
        )
        if self._copy_mode:
            for i, (off, n), on in zip(seg_params, segments.bounds, enabled):
                if on:
                    _local(self._params[i]).copy_(self._bufs.param[off:off + n].view(self._shapes[i]))
        self._global_step += 1
        if self._global_step % self.switch_every == 0:
            self._switch()
        return loss

    # ------------------------------------------------------------------------------ state_dict
    @torch.no_grad()
    def state_dict(self):
        self._store.synchronize()
        state = {}
        packed_at = {i: off for i, off, _ in self._packed.placements(self._slot_of)}
        saved_blocks = {}
        for b, idx in enumerate(self._block_params):
            if b not in self._slot_of and self._store.has(b):
                saved_blocks.update({i: (b, off) for i, off, _ in self._packed.blocks[b].entries})
        for i, p in enumerate(self._params):
            p = _local(p)  # the rank-local shard under FSDP2: optimizer state is per rank
            if self._steps[i] == 0 and i not in packed_at:
                continue
            if i in packed_at:
                off = packed_at[i]
                rows = [r[off:off + p.numel()] for r in self._bufs.paged()]
            elif i in saved_blocks:
                b, off = saved_blocks[i]
                rows = [r[off:off + p.numel()] for r in self._store.get(b)]
            else:  # "drop": an inactive block keeps no state
                continue
            entry = {"step": torch.tensor(float(self._steps[i])),
                     "exp_avg": rows[0].to("cpu", copy=True).view(p.shape),
                     "exp_avg_sq": rows[1].to("cpu", copy=True).view(p.shape)}
            if len(rows) > 2:
                entry["master_param"] = rows[2].to("cpu", copy=True).view(p.shape)
            state[i] = entry
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(range(len(self._params)))}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups, "lisa": {
            "version": STATE_VERSION,
            "global_step": self._global_step,
            "active_layers": list(self.active_layers),
            "generator": self._generator.get_state(),
            "inactive_moments": self.inactive_moments,
            "n_active_layers": self.n_active_layers,
            "switch_every": self.switch_every,
            "sampler": self._sampler_name,
            "params": [(n, tuple(p.shape)) for n, p in zip(self._names, self._params)],
        }}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        lisa = state_dict.get("lisa") if isinstance(state_dict, dict) else None
        if lisa is None:
            raise ValueError("not a FusedLISA state_dict: it has no 'lisa' section "
                             "(a torch.optim.AdamW state_dict cannot restore the LISA schedule)")
        if lisa.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported FusedLISA state_dict version {lisa.get('version')!r}, expected {STATE_VERSION}")
        mine = [(n, tuple(p.shape)) for n, p in zip(self._names, self._params)]
        theirs = [(n, tuple(s)) for n, s in lisa["params"]]
        if theirs != mine:
            diff = next(((a, b) for a, b in zip(theirs, mine) if a != b), None)
            raise ValueError(
                f"state_dict is from a different model: it has {len(theirs)} trainable params, this optimizer "
                f"{len(mine)}" + (f"; first mismatch: saved {diff[0]} vs here {diff[1]}" if diff else ""))
        for key in ("n_active_layers", "inactive_moments"):
            if lisa[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={lisa[key]!r}, this optimizer {getattr(self, key)!r}")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(state_dict['param_groups'])} param groups, expected {len(self.param_groups)}")

        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        lowp = self._bufs.lowp is not None
        for i, entry in saved_state.items():
            need = ("step", "exp_avg", "exp_avg_sq") + (("master_param",) if lowp else ())
            for key in need:
                if key not in entry:
                    raise ValueError(f"state_dict state for param {self._names[i]!r} has no {key!r}")
            for key in need[1:]:
                if tuple(entry[key].shape) != self._shapes[i]:
                    raise ValueError(f"state_dict {key} of {self._names[i]!r} has shape {tuple(entry[key].shape)}, "
                                     f"expected {self._shapes[i]}")

        target = tuple(sorted(int(b) for b in lisa["active_layers"]))
        n_blocks = len(self._block_params)
        if len(set(target)) != self.n_active_layers or any(not 0 <= b < n_blocks for b in target):
            raise ValueError(f"state_dict active_layers {list(target)} are not {self.n_active_layers} distinct "
                             f"blocks in 0..{n_blocks - 1}")
        # Everything is checked: from here on the load cannot fail half-way.
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        # Re-arrange the slots as saved (params move with their current values), then fill in state.
        self._store.clear()
        self._move(target, page=False)
        self._steps = [int(saved_state[i]["step"]) if i in saved_state else 0 for i in range(len(self._params))]
        self._global_step = int(lisa["global_step"])
        self.switch_every = int(lisa["switch_every"])
        # .cpu(): accelerate's AcceleratedOptimizer moves every tensor of a state_dict to the device before
        # loading it (a CUDA ByteTensor here); Generator.set_state takes a CPU ByteTensor only.
        self._generator.set_state(lisa["generator"].cpu())
        self._sync_generator_from_rank0()

        def rows(i):
            e = saved_state[i]
            return [e["exp_avg"], e["exp_avg_sq"]] + ([e["master_param"]] if lowp else [])

        for i, off, n in self._packed.placements(self._slot_of):
            targets = self._bufs.paged()  # exp_avg, exp_avg_sq (+ master for low-precision models)
            src = rows(i) if i in saved_state else None
            for k, buf in enumerate(targets):
                view = buf[off:off + n]
                if src is not None:
                    view.copy_(src[k].reshape(-1))
                elif k < 2:
                    view.zero_()
                else:
                    view.copy_(self._bufs.lowp[off:off + n])
        for b, idx in enumerate(self._block_params):
            if b in self._slot_of or not any(i in saved_state for i in idx):
                continue
            region = self._packed.blocks[b]
            block_state = torch.zeros(len(self._bufs.paged()), region.length)
            for i, off, n in region.entries:
                if i in saved_state:
                    for k, t in enumerate(rows(i)):
                        block_state[k, off:off + n] = t.reshape(-1).float()
                elif lowp:
                    block_state[2, off:off + n] = _local(self._params[i]).detach().reshape(-1).float().cpu()
            self._store.put(b, block_state)

    # ------------------------------------------------------------------------------ internals
    def _make_grad_hook(self, i):
        def hook(_param):
            self._has_grad[i] = True
        return hook

    def _grad_view(self, i, off):
        shape = self._shapes[i]
        return self._bufs.grad[off:off + math.prod(shape)].view(shape)

    def _is_bound_grad(self, i, g):
        ptr = self._bound_grad_ptr.get(i)  # None in copy mode, where a DTensor grad has no data_ptr
        return ptr is not None and ptr == g.data_ptr()

    def _bind(self, i, off, write_master):
        """Point param i's data and grad at offset `off` of the packed buffers, copying its value in.
        A low-precision model's fp32 master is written only when asked: on a switch the slot's master
        still holds the leaving block's, which the store pages out first."""
        p = self._params[i]
        n = math.prod(self._shapes[i])
        view = self._bufs.param[off:off + n].view(self._shapes[i])
        view.copy_(_local(p).detach())
        if write_master and self._bufs.lowp is not None:
            self._bufs.master[off:off + n].copy_(view.reshape(-1))
        if self._copy_mode:  # p keeps its own storage; step() copies grads in and values back
            self._offset[i] = off
            return
        p.data = view
        gv = self._grad_view(i, off)
        if p.grad is not None:
            gv.copy_(p.grad)
        else:
            gv.zero_()
        p.grad = gv
        self._offset[i] = off
        self._bound_grad_ptr[i] = gv.data_ptr()

    def _unbind(self, i):
        """Give param i storage of its own again (its packed slot is about to be reused)."""
        p = self._params[i]
        if not self._copy_mode:  # (in copy mode p's own storage already holds its latest value)
            p.data = p.detach().clone()
        p.grad = None
        del self._offset[i]
        self._bound_grad_ptr.pop(i, None)
        self._has_grad[i] = False

    def _collect_grad(self, i) -> bool:
        """True if param i has a gradient for this step, now in the packed grad buffer."""
        p = self._params[i]
        g = p.grad
        if g is None:
            return False
        if self._is_bound_grad(i, g):
            return self._has_grad[i]
        # Someone replaced .grad (model.zero_grad() then backward, DDP bucket views, a manual assignment):
        # copy it into the buffer and re-point the view.
        gv = self._grad_view(i, self._offset[i])
        gv.copy_(_local(g))
        if not self._copy_mode:
            p.grad = gv
        return True

    def _segments(self):
        key = tuple(sorted(self._slot_of.items()))
        if getattr(self, "_seg_key", None) != key:
            self._seg_cache = self._packed.segments(self._slot_of)
            self._seg_key = key
        return self._seg_cache

    def _hparams(self, seg_params, enabled):
        """[S, 4] float64 host table; bias corrections computed once per distinct step count in Python
        floats, exactly as torch's AdamW computes them."""
        g = self.param_groups[0]
        lr, wd = g["lr"], g["weight_decay"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        beta1, beta2 = g["betas"]
        rows, memo = [], {}  # columns in contract order: step_size, decay, bc2_sqrt, enabled
        for i, on in zip(seg_params, enabled):
            s = self._steps[i]
            if not on:
                rows.append((0.0, 1.0, 1.0, 0.0))
                continue
            if s not in memo:
                bc1 = 1 - beta1 ** s
                bc2 = 1 - beta2 ** s
                memo[s] = (lr / bc1, 1 - lr * wd, math.sqrt(bc2), 1.0)
            rows.append(memo[s])
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, N_COLS)

    def _draw(self) -> tuple[int, ...]:
        n = len(self._block_params)
        if self.n_active_layers == n:
            return tuple(range(n))
        return sampling.checked_draw(self._sampler_fn, n, self.n_active_layers, self._generator)

    def _switch(self):
        new = self._draw()
        self._move(new, page=True)
        logger.info("FusedLISA step %d: active layers %s", self._global_step, self.active_layers)

    def _set_trainable(self, b, flag):
        for i in self._block_params[b]:
            self._params[i].requires_grad_(flag)

    def _move(self, new_active, page: bool):
        """Make `new_active` the active set: blocks that stay keep their slot."""
        new_active = tuple(sorted(new_active))
        leaving = [(b, s) for b, s in self._slot_of.items() if b not in new_active]
        free = sorted(s for _, s in leaving) + sorted(set(range(self.n_active_layers)) - set(self._slot_of.values()))
        arriving = [(b, free.pop(0)) for b in new_active if b not in self._slot_of]
        self._activate(leaving, [b for b, _ in arriving], slots=[s for _, s in arriving], page=page)

    def _activate(self, leaving, arriving, slots=None, page=True):
        if slots is None:
            used = set(self._slot_of.values())
            slots = [s for s in range(self.n_active_layers) if s not in used][:len(arriving)]
        # 1) params: leaving blocks get their own storage back, arriving ones move into their slots.
        for b, _ in leaving:
            for i in self._block_params[b]:
                self._unbind(i)
            del self._slot_of[b]
            self._set_trainable(b, False)
        for b, s in zip(arriving, slots):
            base = self._packed.slot_offset(s)
            for i, off, _ in self._packed.blocks[b].entries:
                self._bind(i, base + off, write_master=not page)
            self._slot_of[b] = s
            self._set_trainable(b, True)
        # 2) optimizer state: paged on the copy stream (or reset).
        pairs_in = list(zip(arriving, slots))
        if not page:
            return
        fresh = self._store.switch(
            leaving=leaving, arriving=pairs_in,
            length_of=lambda b: self._packed.blocks[b].length,
            slot_views=self._slot_views,
            init_master=self._init_master,
        )
        if self.inactive_moments == "drop":
            for b in fresh:
                for i in self._block_params[b]:
                    self._steps[i] = 0

    def _slot_views(self, slot, length):
        off = self._packed.slot_offset(slot)
        return [buf[off:off + length] for buf in self._bufs.paged()]

    def _init_master(self, slot, block, master_view):
        off = self._packed.slot_offset(slot)
        master_view.copy_(self._bufs.lowp[off:off + master_view.numel()])

    def _sync_generator_from_rank0(self):
        """Every rank must draw the same blocks: take rank 0's generator state when distributed."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        state = [self._generator.get_state()]
        torch.distributed.broadcast_object_list(state, src=0)
        self._generator.set_state(state[0])


def _check_ddp(model):
    """Inactive blocks get no gradient: a DDP wrapper must be built to expect that (before FusedLISA, with
    find_unused_parameters=True and no static_graph), or its second backward fails with a cryptic error."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, ddp) and (not model.find_unused_parameters or getattr(model, "static_graph", False)):
        raise ValueError(
            "FusedLISA trains a different set of blocks every switch_every steps, so DistributedDataParallel must "
            "expect parameters without a gradient: wrap the model with DistributedDataParallel(model, "
            "find_unused_parameters=True) (and without static_graph) before constructing FusedLISA; got "
            f"find_unused_parameters={model.find_unused_parameters}, "
            f"static_graph={getattr(model, 'static_graph', False)}")


def _local(t):
    """The rank-local tensor of a DTensor (an FSDP2 shard; its own storage under no_grad), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def _validate_hparams(lr, betas, eps, weight_decay):
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid learning rate: tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr_value = lr.item()
    else:
        lr_value = lr
    if not isinstance(lr_value, (int, float)) or not math.isfinite(lr_value) or lr_value < 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for k, b in enumerate(betas):
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {k}: {b}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
