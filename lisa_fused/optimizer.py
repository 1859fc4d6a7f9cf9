"""FusedLISA: LISA fine-tuning as one torch.optim.Optimizer.

The class validates and runs the step/switch cycle; the AdamW math lives in kernels/ (one call, any
backend), the slot layout in packing.py, the parameter <-> buffer binding (and its checks) in binding.py,
paged state in paging.py, state_dict in checkpoint.py, the block stack in layers.py and the draw in
sampling.py.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from . import checkpoint, kernels, sampling
from .binding import ParamBinding, claim_check, local
from .kernels.contract import N_COLS
from .layers import find_layout
from .packing import PackedBuffers, PackedLayout, Region
from .paging import POLICIES, MomentStore
from .slots import Slots

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: no DTensor params to meet
    DTensor = ()

logger = logging.getLogger("lisa_fused")

STATE_VERSION = checkpoint.STATE_VERSION


class FusedLISA(torch.optim.Optimizer):
    """AdamW over the embedding, the head and `n_active_layers` sampled blocks, re-drawn every
    `switch_every` steps, with a fused update over a packed buffer of the active layers only
    (LISA: Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning").

    With inactive_moments="host" or "device" a run equals torch.optim.AdamW over all parameters where
    frozen blocks simply have no gradient; with "drop" a re-activated block restarts from step 1.
    A param steps iff its `.grad` is not None at step(), as in torch. If the model is moved or converted
    after construction (model.to(...), .half(), .cuda()), the next step()/zero_grad() follows it (see
    binding.py); `release()` hands the model back. `sampler` picks the blocks: "uniform" (the paper),
    "weight_norm", "grad_norm" (GRASS-style; grad norms come out of the update kernel's pass), "outlier"
    (OwLore-style), "loss_feedback" (IST-style, fed by `observe_loss` or `step(closure)`) or a callable;
    `sampler_options` (dict or sampling.SamplerOptions) tunes the adaptive ones (sampling.py). The optimizer cannot be copied or pickled: save
    `state_dict()` instead.
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
        sampler_options: sampling.SamplerOptions | dict | None = None,
        inactive_moments: str = "host",
        backend: str = "auto",
        moments: str = "fp32",
        master_weights: str | None = None,
    ):
        _validate_hparams(lr, betas, eps, weight_decay)
        _validate_options(model, switch_every, inactive_moments, sampler)
        master_weights = _validate_state_format(model, moments, master_weights)
        claim_check(model.named_parameters())  # another live FusedLISA, or flags a dropped one left frozen

        layout = find_layout(model, layers)
        n_blocks = layout.num_blocks
        sampler = sampling.build_sampler(sampler, layout, sampler_options)  # validates the options
        if isinstance(n_active_layers, bool) or not isinstance(n_active_layers, int) or not 1 <= n_active_layers <= n_blocks:
            raise ValueError(f"Invalid n_active_layers: {n_active_layers!r} (must be an integer in 1..{n_blocks}, "
                             f"the number of blocks in {layout.stack_path or 'the stack'})")
        if n_active_layers < n_blocks:
            _check_ddp(model)

        named = list(layout.always) + [np for blk in layout.blocks for np in blk]
        params = [p for _, p in named]
        self.device, self.param_dtype = _device_and_dtype(params)
        self.backend = kernels.resolve_backend(backend, self.device)
        self._backend_request = backend

        super().__init__([{"params": params}], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

        self.model_layout = layout
        self.n_active_layers = n_active_layers
        self.switch_every = switch_every
        self.inactive_moments = inactive_moments
        self.seed = seed
        self.moments, self.master_weights = moments, master_weights
        self._sr_seed = int(seed) % (1 << 32)  # stochastic-rounding key (contract.py: [0, 2**32))
        self._names = [n for n, _ in named]
        self._params = params
        local_params = [local(p) for p in params]
        self._shapes = [tuple(t.shape) for t in local_params]
        n_always = len(layout.always)
        block_idx, start = [], n_always
        for blk in layout.blocks:
            block_idx.append(range(start, start + len(blk)))
            start += len(blk)
        self._block_params = block_idx
        self._packed = PackedLayout(
            always=Region.of(range(n_always), local_params),
            blocks=tuple(Region.of(ix, local_params) for ix in block_idx),
            n_slots=n_active_layers,
        )
        # FSDP2 (fully_shard) params are DTensors whose local shards live in FSDP's own padded storage,
        # which it all-gathers from: re-pointing .data would be ignored, so they are bound by copy instead
        # (packed buffers hold the rank-local shards; grads are copied in, updated shards copied back).
        self._binding = ParamBinding(self._names, params, self._shapes,
                                     PackedBuffers(self._packed.total, self.device, self.param_dtype,
                                                   moments, master_weights),
                                     copy_mode=any(isinstance(p, DTensor) for p in params))
        self._store = self._make_store(self.device)
        self._steps = [0] * len(params)  # per-param AdamW step count (bias correction), host ints
        self._global_step = 0  # optimizer steps taken (skipped overflow steps excluded)
        self._generator = torch.Generator().manual_seed(seed)
        self._sampler = sampler
        self._sync_generator_from_rank0()

        # Pack the always-trained params once; they stay bound until release().
        for i, off, n in self._packed.always.entries:
            self._binding.bind(i, off, write_master=True)
        self._slots = Slots(self._packed, block_idx, params)  # active block -> slot, and the moves
        first = self._draw()
        for b in range(n_blocks):
            if b not in first:
                self._slots.set_trainable(b, False)
        self._reset_fresh(self._slots.activate(self._binding, self._store, [], list(first),
                                               list(range(len(first))), page=True))
        # grad_norm: the kernel adds each segment's ||g||^2 into this meter's device buffer (no second pass).
        self._meter = sampling.GradNormMeter(self._slots.meter_blocks(), self.device) \
            if isinstance(sampler, sampling.GradNormSampler) else None

    def _make_store(self, device) -> MomentStore:
        """The one place the paged store is built (at construction and when the model moves)."""
        store = MomentStore(self.inactive_moments, device)
        if self._binding is not None:  # pin the host store now, not inside step() on a block's first visit
            bufs = self._binding.bufs
            store.reserve({b: [(v.dtype, v.numel()) for v in bufs.rows(0, r.length)]
                           for b, r in enumerate(self._packed.blocks)})
        return store

    @property
    def _bufs(self) -> PackedBuffers:
        return self._live().bufs

    # ------------------------------------------------------------------------------------ public API
    @property
    def active_layers(self) -> tuple[int, ...]:
        """Block indices trained in the current interval, ascending."""
        return self._slots.active

    def memory_stats(self) -> dict[str, int]:
        """Bytes the optimizer holds (ints): device_bytes (packed params/masters, grads, moments, scales,
        compensation, plus resident block state under "device"), host_bytes (paged-out block state),
        and the packed buffers by kind: param_bytes (what the trained params view: bf16/fp16, or the
        fp32 masters of an fp32 model), master_bytes (fp32 masters of a low-precision model), grad_bytes,
        moment_bytes (exp_avg + exp_avg_sq, codes when quantized), scale_bytes (fp32 block scales),
        compensation_bytes (Kahan); extra_device_bytes = device_bytes - param_bytes (what the optimizer
        adds to the model's own weights)."""
        packed = self._bufs.nbytes()
        store = self._store.nbytes()
        on_device = self._store.policy == "device"
        kinds = self._bufs.nbytes_by_kind()
        device = packed + (store if on_device else 0)
        return {
            "device_bytes": device,
            "extra_device_bytes": device - kinds["param"],
            **{f"{k}_bytes": v for k, v in kinds.items()},
            "host_bytes": 0 if on_device else store,
            "packed_bytes": packed,
            "store_bytes": store,
            "active_numel": sum(n for _, _, n in self._packed.placements(self._slot_of)),
            "slot_numel": self._packed.slot_len,
            "pinned_bytes": self._store.pinned_bytes(),  # page-locked host memory, reserved at construction
        }

    def release(self) -> None:
        """Hand the model back: every trained param gets its own storage again (values and grads as they
        are now), the requires_grad flag the user had, and no hooks. The optimizer is unusable afterwards
        (step/zero_grad/state_dict raise); a new FusedLISA or any torch optimizer then starts clean.
        Take `state_dict()` before, to resume with a new FusedLISA. Calling it twice is harmless."""
        if self._binding is None:
            return
        self._store.synchronize()
        self._binding.release()
        self._binding = None
        self._store.release()  # drop paged state (and unregister pinned memory)

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (f"FusedLISA(backend={self.backend!r} (asked {self._backend_request!r}), lr={g['lr']}, "
                f"betas={g['betas']}, eps={g['eps']}, weight_decay={g['weight_decay']}, "
                f"n_active_layers={self.n_active_layers}/{len(self._block_params)}, "
                f"switch_every={self.switch_every}, sampler={self._sampler.describe()}, "
                f"inactive_moments={self.inactive_moments!r}, moments={self.moments!r}, "
                f"master_weights={self.master_weights!r}, stack={self.model_layout.stack_path!r}, "
                f"active_layers={self.active_layers}" + (", released" if self._binding is None else "") + ")")

    def add_param_group(self, param_group):
        if getattr(self, "_params", None) is not None:
            raise NotImplementedError("FusedLISA owns its parameters (the whole model); add_param_group is not supported")
        super().add_param_group(param_group)

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a FusedLISA cannot be copied or pickled (copy.deepcopy, pickle, torch.save(opt)): it drives the "
            "model's parameters through its packed buffers, which a copy would not. Save opt.state_dict() "
            "instead and load it with load_state_dict() into a FusedLISA built on the model")

    __deepcopy__ = __copy__ = lambda self, *memo: self.__reduce_ex__(2)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True):
        """As torch.optim.Optimizer.zero_grad: every trained param's `.grad` becomes None (the next
        backward re-points it into the packed buffer before accumulating, see binding.lazy_grad), or with
        set_to_none=False, existing grads are zeroed in place (one fill of the packed buffer)."""
        self._check_binding()
        self._binding.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over the active params that have a `.grad`, then a re-draw every switch_every
        steps. Raises RuntimeError during CUDA graph capture, after release(), or if the model was
        moved to where it cannot be followed (a dtype the kernels lack, mixed devices, FSDP2 shards)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Bias corrections and the switch are host-side per step; a captured graph would replay step 1's.
            raise RuntimeError("FusedLISA.step() cannot be captured in a CUDA graph (torch.cuda.graph / "
                               "mode='reduce-overhead' compile of the step): its per-step bias corrections and "
                               "layer switches are computed on the host; capture the forward/backward only")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_binding()
        if loss is not None:
            self.observe_loss(loss)
        if (self._global_step + 1) % self.switch_every == 0:  # this step switches: parked params must fit too
            self._binding.check_unbound()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            # GradScaler overflow: the step never happened (one host sync, only in this AMP mode).
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=self.device, dtype=torch.float32).reshape(1)

        segments, seg_params = self._slots.segments()
        collect = self._binding.collect
        enabled = [collect(i) for i in seg_params]
        for i, on in zip(seg_params, enabled):
            self._steps[i] += on
        lean = self.moments != "fp32" or self.master_weights != "fp32"
        hparams = _hparams(self.param_groups[0], [self._steps[i] for i in seg_params], enabled,
                           ids=seg_params if lean else None)
        self._store.wait_ready()
        g = self.param_groups[0]
        bufs = self._bufs
        lean_args = dict(moments=self.moments, master_weights=self.master_weights, exp_avg_scale=bufs.exp_avg_scale,
                         exp_avg_sq_scale=bufs.exp_avg_sq_scale, compensation=bufs.compensation,
                         seed=self._sr_seed) if lean else {}
        kernels.adamw_packed_(
            bufs.kernel_param, bufs.grad, bufs.exp_avg, bufs.exp_avg_sq, segments, hparams,
            beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"],
            param_lowp=bufs.lowp if bufs.master is not None else None,
            grad_scale=grad_scale, backend=self.backend, check=False, **lean_args,
            grad_sumsq=None if self._meter is None else self._meter.kernel_buffer(),
        )
        if self._binding.copy_mode:
            for i, (off, n), on in zip(seg_params, segments.bounds, enabled):
                if on:
                    local(self._params[i]).copy_(bufs.param[off:off + n].view(self._shapes[i]))
        self._global_step += 1
        if self._global_step % self.switch_every == 0:
            self._switch()
        return loss

    def observe_loss(self, loss) -> None:
        """Hand this step's training loss (a float or a 1-element tensor, kept on its device: no host
        sync) to the sampler; "loss_feedback" learns from it, the others ignore it. Call it once per
        step before step() (the loss belongs to the blocks active now), or pass step(closure), which
        calls it; LISACallback does it from the Trainer's logs. ValueError/TypeError for a non-scalar."""
        self._live()
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"observe_loss takes a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"observe_loss takes a float or a 1-element tensor, got {type(loss).__name__}")
        self._sampler.observe_loss(loss, self.active_layers)

    def sampler_probabilities(self) -> list[float] | None:
        """Each block's probability of being the first pick at the next switch (sums to 1; None for a
        callable sampler). The n_active_layers blocks are drawn without replacement."""
        return self._sampler.probabilities()

    def state_dict(self):
        """torch's optimizer format plus a "lisa" section; see checkpoint.py."""
        self._live()
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict):
        """Exact resume, also across param dtypes (documented in checkpoint.py). Raises ValueError naming
        the mismatch (model, policy, shapes) before anything changes."""
        self._check_binding()
        checkpoint.load_state_dict(self, state_dict)

    # ------------------------------------------------------------------------------ internals
    def _live(self) -> ParamBinding:
        if self._binding is None:
            raise RuntimeError("this FusedLISA was released (opt.release()): build a new optimizer on the model")
        return self._binding

    def _check_binding(self):
        """The model was moved or converted since the last call: follow it, or raise naming the param."""
        if self._live().moved():
            self._follow_move()

    @torch.no_grad()
    def _follow_move(self):
        binding = self._binding
        dev, dt = binding.target()  # raises where following is impossible
        if dt != self.param_dtype and self.master_weights != "fp32":
            raise RuntimeError(
                f"FusedLISA: the model was converted from {self.param_dtype} to {dt}, but master_weights="
                f"{self.master_weights!r} keeps no fp32 master to convert from: convert the model back, or "
                "take state_dict(), release(), and build a new FusedLISA for the converted model")
        backend = kernels.resolve_backend(self._backend_request, dev)
        self._store.synchronize()
        was = (self.device, self.param_dtype)
        old = binding.relocate(self._packed.total, dev, dt, self.moments, self.master_weights)
        new = binding.bufs
        old_store, self._store = self._store, self._make_store(dev)
        for b in range(len(self._block_params)):
            if b not in self._slot_of and old_store.has(b):
                self._store.put(b, binding.parked_rows(self._packed.blocks[b], old_store.get(b), old, new))
        old_store.release()  # (unregisters its pinned memory now, not at garbage collection)
        self.device, self.param_dtype, self.backend = dev, dt, backend
        if self._meter is not None:
            self._meter.to(dev)
        log = logger.warning if dt != was[1] else logger.info
        log("FusedLISA: the model's params got new storage (model.to(...): %s on %s -> %s on %s); the optimizer "
            "followed (packed buffers, paged state, masters; backend %r)", was[1], was[0], dt, dev, backend)

    def _draw(self) -> tuple[int, ...]:
        n = len(self._block_params)
        if self.n_active_layers == n:
            return tuple(range(n))
        return self._sampler.draw(n, self.n_active_layers, self._generator)  # every rank: it may broadcast

    def _switch(self):
        meter = self._meter
        if meter is not None:  # the interval's grad norms, read once (one host transfer)
            if self._binding.copy_mode and torch.distributed.is_initialized():
                meter.all_reduce_()  # FSDP2: each rank summed its shards' squares
            self._sampler.observe_grad_norms(*meter.read(self.active_layers))
        new = self._draw()
        self._move(new, page=True)
        if meter is not None:
            meter.reset(self._slots.meter_blocks())
        logger.info("FusedLISA step %d: active layers %s", self._global_step, self.active_layers)
        if self._sampler.name in sampling.ADAPTIVE_SAMPLERS:
            logger.info("FusedLISA sampler after step %d: %s", self._global_step, self._sampler.describe())

    @property
    def _slot_of(self) -> dict[int, int]:
        return self._slots.slot_of

    def _move(self, new_active, page: bool):
        """Make `new_active` the active set (slots.py); page=False leaves the state to the caller."""
        self._reset_fresh(self._slots.move(new_active, self._binding, self._store, page))

    def _reset_fresh(self, fresh):
        """"drop": a block arriving without saved state restarts its bias correction from step 1."""
        if self.inactive_moments == "drop":
            for b in fresh:
                for i in self._block_params[b]:
                    self._steps[i] = 0

    def _sync_generator_from_rank0(self):
        """Every rank must draw the same blocks: take rank 0's generator state when distributed."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        state = [self._generator.get_state()]
        torch.distributed.broadcast_object_list(state, src=0)
        self._generator.set_state(state[0])


def _validate_options(model, switch_every, inactive_moments, sampler):
    if not isinstance(model, nn.Module):
        raise TypeError(f"FusedLISA takes the model (an nn.Module), got {type(model).__name__}")
    if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
        raise ValueError(f"Invalid switch_every: {switch_every!r} (must be an integer >= 1)")
    if inactive_moments not in POLICIES:
        raise ValueError(f"Invalid inactive_moments: {inactive_moments!r}; choose one of {POLICIES}")
    if not callable(sampler) and sampler not in sampling.SAMPLER_NAMES:
        raise ValueError(f"Invalid sampler: {sampler!r}; choose one of {sampling.SAMPLER_NAMES} or pass a callable")


def _validate_state_format(model, moments, master_weights) -> str:
    """Check moments / master_weights before anything about the model changes; returns master_weights
    with None resolved to "fp32". ValueError naming the bad value and the choices, or the dtype."""
    from .kernels import quant

    if moments not in quant.FORMATS:
        raise ValueError(f"Invalid moments: {moments!r}; choose one of {quant.FORMATS}")
    if master_weights is None:
        master_weights = "fp32"
    if master_weights not in quant.MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights: {master_weights!r}; choose one of (None,) + {quant.MASTER_WEIGHTS}")
    if master_weights != "fp32":
        dtypes = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
        allowed = (torch.bfloat16,) if master_weights == "stochastic" else (torch.bfloat16, torch.float16)
        bad = sorted(str(d) for d in dtypes if d not in allowed)
        if bad:
            raise ValueError(
                f"master_weights={master_weights!r} updates the params in place without an fp32 master, which "
                f"needs {' or '.join(map(str, allowed))} params; this model's trainable params are {', '.join(bad)}: "
                "convert the model (e.g. model.to(torch.bfloat16)) or use master_weights='fp32'")
    return master_weights


def _device_and_dtype(params):
    """The one device and floating dtype of the trainable params; ValueError naming what was found."""
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
    if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"all trainable parameters must share one floating dtype, found {sorted(map(str, dtypes))}")
    dtype = next(iter(dtypes))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported parameter dtype {dtype}; use float32, bfloat16 or float16")
    return next(iter(devices)), dtype


def _hparams(group, steps, enabled, ids=None):
    """[S, 4] float64 host table (one row per segment, `steps` its AdamW step count); bias corrections
    computed once per distinct step count in Python floats, exactly as torch's AdamW computes them.
    With `ids` (param index per segment): [S, 6], adding COL_PARAM_ID and COL_STEP (lean state)."""
    lr, wd = group["lr"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    beta1, beta2 = group["betas"]
    rows, memo = [], {}  # columns in contract order: step_size, decay, bc2_sqrt, enabled
    for s, on in zip(steps, enabled):
        if not on:
            rows.append((0.0, 1.0, 1.0, 0.0))
            continue
        if s not in memo:
            bc1 = 1 - beta1 ** s
            bc2 = 1 - beta2 ** s
            memo[s] = (lr / bc1, 1 - lr * wd, math.sqrt(bc2), 1.0)
        rows.append(memo[s])
    table = torch.tensor(rows, dtype=torch.float64).reshape(-1, N_COLS)
    if ids is None:
        return table
    extra = torch.tensor([list(ids), list(steps)], dtype=torch.float64).T.reshape(-1, 2)
    return torch.cat([table, extra], dim=1)


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
