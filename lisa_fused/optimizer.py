"""FusedLISA: LISA fine-tuning as one torch.optim.Optimizer.

The class validates and runs the step/switch cycle. The AdamW launches live in update.py (one call per
state-format partition, any backend via kernels/), param groups and state formats in groups.py, the slot
layout in packing.py, the parameter <-> buffer binding (and its checks, and following a moved model) in
binding.py, which block sits in which slot in slots.py, paged state in paging.py, state_dict in
checkpoint.py, memory_stats/repr in introspect.py, the block stack in layers.py and the draw in sampling/.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from . import checkpoint, dcp, engines, groups, hparams, introspect, kernels, rebuild, sampling, update, validation
from .binding import DTensor, ParamBinding, claim_check, local
from .layers import find_layout
from .packing import PackedState
from .paging import MomentStore
from .slots import Slots

logger = logging.getLogger("lisa_fused")

STATE_VERSION = checkpoint.STATE_VERSION


class FusedLISA(torch.optim.Optimizer):
    """AdamW over the embedding, the head and `n_active_layers` sampled blocks, re-drawn every
    `switch_every` steps, with a fused update over packed buffers of the active layers only
    (LISA: Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning").

    With inactive_moments="host" or "device" a run equals torch.optim.AdamW over all parameters where
    frozen blocks simply have no gradient; with "drop" a re-activated block restarts from step 1. Params and
    grads keep their own storage (the optimizer holds only its state: moments, fp32 masters of bf16/fp16
    params, scales, compensation; binding.py). A param steps iff its `.grad` is not None at step(), as in
    torch; a step where no param has a gradient changes nothing and does not count towards `switch_every`.
    A moved, converted or resized model is followed at the next step() (rebuild.follow); `release()` gives
    the user's requires_grad flags back; copies and pickles are refused (save `state_dict()`). lr, betas, eps,
    weight_decay: torch.optim.AdamW's defaults and every value it accepts (hparams.py); on backend="torch" a
    run is bitwise torch's AdamW, on the native kernels within the tolerance README.md states. Blocks with no
    trainable parameter are never drawn (sampling/trainable.py). Samplers: lisa_fused/sampling; state formats
    and the small-tensor rule
    (`min_quantized_size`): kernels/contract.py, groups.py; `param_groups`: groups.py. Every keyword with
    its default and choices: docs/usage.md.
    """

    # GradScaler hands us grad_scale / found_inf instead of unscaling and checking itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = hparams.LR,  # torch.optim.AdamW's defaults: 1e-3, (0.9, 0.999), 1e-8, 1e-2 (hparams.py)
        betas: tuple[float, float] = hparams.BETAS,
        eps: float = hparams.EPS,
        weight_decay: float = hparams.WEIGHT_DECAY,
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
        min_quantized_size: int = groups.MIN_QUANTIZED_SIZE,
        param_groups: list[dict] | None = None,
    ):
        given, adamw = hparams.given(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(adamw, moments=moments,
                        master_weights="fp32" if master_weights is None else master_weights,
                        min_quantized_size=min_quantized_size)
        validation.check_options(model, switch_every, inactive_moments, sampler)
        groups.validate_group_options(defaults, "FusedLISA", validation.trainable_dtypes(model))
        claim_check(model.named_parameters())  # another live FusedLISA, or flags a dropped one left frozen
        layout = find_layout(model, layers)
        validation.check_n_active(n_active_layers, layout)
        if n_active_layers < layout.num_blocks:
            validation.check_ddp(model)
        self._model, self._backend_request = model, backend
        self._hparams_given = given  # the AdamW keys given, not left at their defaults (trainer_hparams.py)
        self._sampler_spec = (sampler, sampler_options)
        self.n_active_layers, self.switch_every, self.inactive_moments = n_active_layers, switch_every, inactive_moments
        self.seed, self.moments, self.master_weights = seed, moments, defaults["master_weights"]
        self._sr_seed = int(seed) % (1 << 32)  # stochastic-rounding key (contract.py: [0, 2**32))
        self._binding = None
        self._zero = None  # under DeepSpeed ZeRO 1-3: the zero_client.ZeroClient that steps ZeRO's partitions
        self._generator = torch.Generator().manual_seed(seed)
        self._sync_generator_from_rank0()
        named, members = self._plan(layout, param_groups)
        sampling.announce(layout, n_active_layers, self._sampler)  # blocks without a trainable parameter
        super().__init__(groups.group_dicts(defaults, param_groups, members, [p for _, p in named]), defaults)
        self._build(layout, named, members)

    def _plan(self, layout, param_groups):
        """Everything that can refuse the groups, before anything changes: (named params, group members)."""
        named = list(layout.always) + [np for blk in layout.blocks for np in blk]
        members = groups.resolve(self._model, named, param_groups, validation.trainable_dtypes(self._model))
        params = [named[j][1] for m in members for j in m]
        self.device, self.param_dtype = validation.device_and_dtype(params)
        self.backend = kernels.resolve_backend(self._backend_request, self.device)
        self._sampler = sampling.build_sampler(*self._sampler_spec[:1], layout, self._sampler_spec[1])
        return named, members

    def _build(self, layout, named, members, active=None, user_flags=None, user_frozen=()):
        """Bind the params of `self.param_groups` (members: their indices in `named`) into fresh packed
        buffers and activate `active` (None: the next draw). Param index i = position in the concatenated
        groups. user_flags: the requires_grad flags release() restores (rebuild.rebind: new Parameter objects
        that copied flags FusedLISA had set); user_frozen: params the user froze in active blocks (kept frozen).
        Every group becomes an engines.WatchedGroup: a wrapper that swaps
        a group's params (accelerate's FSDP2 prepare, DeepSpeed's optimizer wrappers) is followed or refused
        at that moment (engines.py)."""
        engines.watch_groups(self)  # (first: _group_of holds these group objects)
        order, always, self._block_params = groups.index_params(layout, members)
        self._always = list(always)
        self._group_sizes = [len(m) for m in members]
        self.model_layout = layout
        self._names, self._params = [named[j][0] for j in order], [named[j][1] for j in order]
        self._group_of = [g for g in self.param_groups for _ in g["params"]]
        self._layout_keys = groups.layout_keys(self.param_groups)
        local_params = [local(p) for p in self._params]
        self._shapes = [tuple(t.shape) for t in local_params]
        formats = [groups.state_format(g, p.numel()) for g, p in zip(self._group_of, self._params)]
        self._packed_state = PackedState(formats, always, self._block_params, local_params, self.n_active_layers,
                                         self.device, self.param_dtype)
        self._binding = ParamBinding(self._names, self._params, self._shapes, self._packed_state, user_flags)
        self._sharded = any(isinstance(p, DTensor) for p in self._params)  # FSDP2: the state is per rank
        self._store = MomentStore.reserved(self.inactive_moments, self.device, self._packed_state)
        self._steps = [0] * len(self._params)  # per-param AdamW step count (bias correction), host ints
        self._global_step = 0  # optimizer steps taken (skipped overflow steps excluded)
        # The always-trained params' state is packed once; they stay bound until release().
        for lay in self._packed_state.layouts:
            for i, off, n in lay.always.entries:
                self._binding.bind(i, off)
            self._binding.write_masters(lay.always.entries)
        ours = {id(p) for p in self._params}
        untrained = [(n, p) for n, p in self._model.named_parameters() if not p.requires_grad and id(p) not in ours]
        self._slots = Slots(self._packed_state, self._block_params, self._params, self._names, untrained)
        self._slots.user_frozen |= set(user_frozen)
        first = self._draw() if active is None else tuple(active)
        for b in range(layout.num_blocks):
            if b not in first:
                self._slots.set_trainable(b, False)
        self._reset_fresh(self._slots.activate(self._binding, self._store, [], list(first),
                                               list(range(len(first))), page=True))
        # grad_norm: the kernel adds each segment's ||g||^2 into this meter's device buffer (no second pass).
        self._meter = sampling.GradNormMeter(self._slots.meter_blocks(), self.device) \
            if isinstance(self._sampler, sampling.GradNormSampler) else None

    # ------------------------------------------------------------------------------------ public API
    @property
    def active_layers(self) -> tuple[int, ...]:
        """Block indices trained in the current interval, ascending."""
        return self._slots.active

    def memory_stats(self) -> dict[str, int]:
        """Bytes the optimizer holds, as ints (only what it adds to the model: params and grads stay the
        model's): device_bytes, host_bytes and the packed state by kind (master/moment/scale/
        compensation_bytes); introspect.memory_stats says what each key counts. Under DeepSpeed ZeRO: this
        rank's moments of its partition slices (live and paged; the fp32 masters are ZeRO's)."""
        if self._zero is not None:
            return self._zero.memory_stats()
        return introspect.memory_stats(self)

    @property
    def state(self) -> "engines.StateView":
        """As torch's `opt.state`: trained param -> its state as in `state_dict()["state"]` (CPU copies,
        built on access), for each param that has state (stepped at least once; under "drop" an inactive
        block keeps none); empty before the first step. Read-only: load state with load_state_dict().
        Under DeepSpeed ZeRO: an empty defaultdict, as ZeRO expects of its client (the state is per
        partition slice: state_dict())."""
        if self._zero is not None:
            return self._zero.state
        return engines.StateView(self)

    @state.setter
    def state(self, value) -> None:
        if value:  # (torch.optim.Optimizer.__init__ assigns an empty defaultdict: nothing to keep)
            raise TypeError("FusedLISA.state is a read-only view of its packed state; restore state with "
                            "opt.load_state_dict(sd)")

    def state_formats(self) -> dict[str, str]:
        """{parameter name: "moments/master_weights"}: each trained parameter's state format."""
        return introspect.state_formats(self)

    def release(self) -> None:
        """Hand the model back: every trained param gets the requires_grad flag the user had (params and
        grads always kept their own storage and values), and the optimizer drops its state. It is unusable
        afterwards (step/state_dict raise); a new FusedLISA or any torch optimizer then starts clean. Take
        `state_dict()` before, to resume with a new FusedLISA. Calling it twice is harmless."""
        if self._binding is None:
            return
        self._store.synchronize()
        self._binding.release()
        self._binding = None
        self._store.release()  # drop paged state (and unregister pinned memory)

    def __repr__(self) -> str:
        return introspect.describe(self)

    def add_param_group(self, param_group):
        """Train more parameters of the model from now on (progressive unfreezing): `param_group` as in
        torch ({"params": Parameters or name patterns, options...}; missing options take the constructor's)
        for parameters FusedLISA does not train yet (frozen when it was built: set requires_grad=True
        first). A parameter inside the block stack joins its block. The packed state is rebuilt around the
        new set; every other parameter's state, the schedule and the sampler carry over exactly (through
        state_dict). ValueError naming the parameter for one already trained, still frozen, or not in the
        model; nothing changes before a raise."""
        if not hasattr(self, "_params"):
            return super().add_param_group(param_group)  # torch.optim.Optimizer.__init__ adding our groups
        if self._zero is not None:
            raise RuntimeError("FusedLISA.add_param_group under DeepSpeed ZeRO 1-3: ZeRO's groups follow the client's "
                               "groups of deepspeed.initialize; build FusedLISA with every group (param_groups=[...]) "
                               "before deepspeed.initialize")
        self._check_binding()
        rebuild.add_param_group(self, param_group)

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a FusedLISA cannot be copied or pickled (copy.deepcopy, pickle, torch.save(opt)): it drives the "
            "model's parameters through its packed buffers, which a copy would not. Save opt.state_dict() "
            "instead and load it with load_state_dict() into a FusedLISA built on the model")

    __deepcopy__ = __copy__ = lambda self, *memo: self.__reduce_ex__(2)

    def zero_grad(self, set_to_none: bool = True):
        """torch.optim.Optimizer.zero_grad over every trained param: `.grad` becomes None, or with
        set_to_none=False existing grads are zeroed in place (the grads are autograd's own tensors)."""
        self._live()
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over the active params that have a `.grad`, then a re-draw every switch_every
        steps. Raises RuntimeError during CUDA graph capture, after release(), if the model was moved to
        where it cannot be followed (a dtype the kernels lack, mixed devices, FSDP2 shards), for a `.grad`
        of the wrong shape, or if a param group's layout keys were edited; nothing changes before a raise."""
        validation.refuse_graph_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._zero is not None:  # DeepSpeed ZeRO 1-3: one of ZeRO's partitions (zero_client.py)
            self._live()
            self._zero.step()
            return loss
        self._check_binding()
        hp = groups.check_unchanged(self.param_groups, self._layout_keys)  # (the hyperparameters, read once)
        self._slots.check_flags()
        if loss is not None:
            self.observe_loss(loss)
        counted = not engines.dcp_init_step()  # DCP's state-materializing zero step does not move the schedule
        switches = counted and (self._global_step + 1) % self.switch_every == 0
        if switches:  # this step switches: the arriving blocks' params must match the state too
            rebuild.check_parked(self)
        overflow, grad_scale = update.amp_scaling(self)
        if overflow:  # GradScaler: the step never happened
            return loss

        parts = self._slots.segments()
        lists = self._binding.collect(parts)  # (raises for a bad .grad before anything changes)
        if not any(any(on) for *_, on in lists):
            return loss  # no gradient anywhere: as torch's AdamW, nothing changes (nor does the schedule)
        for (_, seg_params), (*_, on) in zip(parts, lists):
            for i, e in zip(seg_params, on):
                self._steps[i] += e
        self._store.wait_ready()  # (the page-in of the last switch, before masters are read or written)
        self._binding.mark_written()
        if self._binding.dirty:  # masters of params written since (step 0: every one), arriving blocks
            self._binding.adopt_written()
        update.adamw_step(self._packed_state, parts, lists, self._steps, self._group_of, backend=self.backend,
                          grad_scale=grad_scale, seed=self._sr_seed,
                          grad_sumsq=None if self._meter is None else self._meter.kernel_buffer(), hp=hp)
        self._binding.seen()
        if counted:
            self._global_step += 1
        if switches:
            self._switch()
        return loss

    def observe_loss(self, loss) -> None:
        """Hand this step's training loss (a float or a 1-element tensor, kept on its device: no host
        sync) to the sampler; "loss_feedback" learns from it, the others ignore it. Call it once per
        step before step() (the loss belongs to the blocks active now), or pass step(closure), which
        calls it; LISACallback does it from the Trainer's logs. ValueError/TypeError for a non-scalar."""
        self._live()
        validation.check_loss(loss)
        self._sampler.observe_loss(loss, self.active_layers)

    def sampler_probabilities(self) -> list[float] | None:
        """Each block's probability of being the first pick at the next switch (sums to 1; None for a
        callable sampler). The n_active_layers blocks are drawn without replacement."""
        return self._sampler.probabilities()

    def state_dict(self):
        """torch's optimizer format plus a "lisa" section (checkpoint.py); under torch.distributed, or when
        torch.distributed.checkpoint's helpers ask, the layout that DCP keeps whole (dcp.py). Under DeepSpeed
        ZeRO: this rank's pieces per (param, element range) and the schedule (zero_client.py), saved in
        ZeRO's files."""
        if self._zero is not None:
            return self._zero.state_dict()
        self._check_binding()
        sd = checkpoint.state_dict(self)
        return dcp.to_dcp_layout(self, sd)  # (the plain layout unless under torch.distributed / DCP)

    def load_state_dict(self, state_dict):
        """Exact resume, also across param dtypes (checkpoint.py), from either layout (dcp.py). Raises
        ValueError naming the mismatch (model, policy, shapes) before anything changes."""
        if self._zero is not None:
            return self._zero.load_state_dict(state_dict)
        self._check_binding()
        checkpoint.load_state_dict(self, dcp.from_dcp_layout(self, state_dict) if dcp.is_dcp_layout(state_dict)
                                   else state_dict)

    # ------------------------------------------------------------------------------ internals
    def _live(self) -> ParamBinding:
        if self._binding is None:
            raise RuntimeError("this FusedLISA was released (opt.release()): build a new optimizer on the model")
        return self._binding

    def _check_binding(self):
        """A wrapper replaced the params in place in param_groups (engines.check_group), or the model was
        moved, converted or resized (a bound param has a new address): follow, or raise naming it."""
        self._live()
        engines.check_group(self)  # (may rebuild: self._binding is then new)
        replaced = self._binding.replaced(self._model, self._always)  # (the few always-trained: cheap)
        if replaced or self._binding.changed():
            rebuild.follow(self, replaced)

    def _draw(self) -> tuple[int, ...]:
        # only blocks with a trainable parameter; all of them when no more than n_active (sampling/trainable.py)
        return sampling.draw_active(self._sampler, self.n_active_layers, self._generator)  # every rank: it may broadcast

    def _switch(self):
        meter = self._meter
        if meter is not None:  # the interval's grad norms, read once (one host transfer)
            if self._sharded and torch.distributed.is_initialized():
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
        sampling.sync_generator_from_rank0(self._generator)
