"""DeepSpeed ZeRO 1, 2 and 3 under a LISA schedule: the DeepSpeed-facing half (docs/engines-findings.md,
section 4; issue 25).

A `ZeroSession` is made at the moment DeepSpeed's ZeRO optimizer writes its first flat fp32 partition into
the client optimizer's param groups, inside its own construction (`ZeroSession.attach(frame)`, called by
the client's param-group hook). It keeps that ZeRO object and the arguments of its `__init__`, and then:

* `slices(flat)`: which slice of which parameter each element range of a flat fp32 partition is (ZeRO 1/2:
  `_hp_mapping`, set by DeepSpeed's link_hp_params; ZeRO 3: `grad_position` and the per-parameter
  partitioning), for the client's `step()`, which ZeRO calls once per group / sub-group;
* `owned()`: every slice this rank owns now, over all partitions;
* `rebuild(groups, leaving)`: DeepSpeed's own constructor re-run in place for a new trainable set (the
  caller has set the `requires_grad` flags), after `destroy()`: the ZeRO object stays the one the engine,
  accelerate and schedulers hold;
* `wrap_step(after)` / `wrap_load_checkpoint(before)`: run the caller's code after each ZeRO step (the
  switch must not happen inside ZeRO's group loop) and before the engine reads a checkpoint (the
  trainable set must be the saved one before DeepSpeed loads the model states: 4.3 of the findings).

`gather_slice` re-assembles element-range pieces held by the ranks (a collective) for state whose range
moved in a re-partition. Tested with deepspeed 0.19.8 only: `check_version` refuses anything outside
`TESTED` (these are DeepSpeed internals that move between releases).
"""
from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import dataclass

import torch

TESTED = ((0, 19, 8), (0, 20, 0))  # [first, last): the [dist] pin, deepspeed>=0.19.8,<0.20
STAGE_CLASSES = {"DeepSpeedZeroOptimizer": None, "DeepSpeedZeroOptimizer_Stage3": 3}  # None: 1 or 2


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d*", piece).group() or "0"  # (leading digits: "8rc1" is 8, not 81)
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


def check_version(version: str | None = None) -> None:
    """RuntimeError naming the installed DeepSpeed and the tested range when it lies outside TESTED."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    first, last = TESTED
    if not first <= _version_tuple(version) < last:
        raise RuntimeError(
            f"FusedLISA under DeepSpeed ZeRO 1-3 relies on ZeRO internals (its constructor, _hp_mapping, "
            f"grad_position) tested with deepspeed >={'.'.join(map(str, first))},<{'.'.join(map(str, last[:2]))}; "
            f"installed: deepspeed {version}. Install the tested range (pip install 'lisa-fused[dist]'), or use "
            "ZeRO stage 0 / FSDP2 (docs/integration.md)")


@dataclass(frozen=True)
class Slice:
    """One parameter's piece of a flat fp32 partition: elements [start, start + numel) of the parameter
    flattened, at `offset` of the partition (and of its gradient)."""

    param: torch.nn.Parameter
    start: int
    numel: int
    offset: int

    @property
    def range(self) -> tuple[int, int]:
        return self.start, self.start + self.numel


def _refusals(stage: int, args: dict) -> list[str]:
    """What this module does not support yet, from ZeRO's constructor arguments (each names the key)."""
    out = []
    for key, what in (("offload_optimizer_config", "zero_optimization.offload_optimizer"),
                      ("offload_param_config", "zero_optimization.offload_param")):
        cfg = args.get(key)
        if cfg is not None and str(getattr(cfg, "device", "none")).split(".")[-1].lower() not in ("none", ""):
            out.append(f"{what} (device {getattr(cfg, 'device')}): the fp32 partitions would live on the host")
    if args.get("zenflow_config") is not None:
        out.append("zero_optimization.zenflow")
    if args.get("has_moe_layers"):
        out.append("MoE layers (expert-parallel groups)")
    for key in ("fp16_master_weights_and_gradients", "bf16_master_weights_and_gradients"):
        if args.get(key):
            out.append(f"zero_optimization.{key}")
    return out


class ZeroSession:
    """The ZeRO optimizer a client optimizer runs under, and its constructor arguments (module doc)."""

    def __init__(self, zero, args: dict, engine=None):
        self.zero, self.args = zero, args
        self.stage = 3 if type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3" else \
            (2 if args.get("partition_grads", True) else 1)
        self._engine = weakref.ref(engine) if engine is not None else (lambda: None)
        self.rebuilding = False  # True while ZeRO's constructor runs again (its group writes are ours)

    # ------------------------------------------------------------------ construction
    @classmethod
    def attach(cls, frame) -> "ZeroSession":
        """From the frame that wrote a client param group's "params" inside a ZeRO optimizer's construction:
        the session, or RuntimeError (untested DeepSpeed, unsupported options: named) or None when the frame
        is no ZeRO 1-3 construction (the caller then refuses with its own message)."""
        zero_frame, engine = None, None
        while frame is not None:
            me = frame.f_locals.get("self")
            if me is not None and zero_frame is None and type(me).__name__ in STAGE_CLASSES \
                    and type(me).__module__.startswith("deepspeed.") and frame.f_code is type(me).__init__.__code__:
                zero_frame = frame
            elif me is not None and zero_frame is not None and type(me).__name__ == "DeepSpeedEngine":
                engine = me
                break
            frame = frame.f_back
        if zero_frame is None:
            return None
        check_version()
        zero = zero_frame.f_locals["self"]
        names = list(inspect.signature(type(zero).__init__).parameters)[1:]
        args = {k: zero_frame.f_locals[k] for k in names}
        session = cls(zero, args, engine)
        refused = _refusals(session.stage, args)
        if refused:
            raise RuntimeError(f"FusedLISA under DeepSpeed ZeRO stage {session.stage} does not support "
                               f"{'; '.join(refused)}: turn it off in the DeepSpeed config")
        return session

    @property
    def engine(self):
        return self._engine()

    # ------------------------------------------------------------------ partition <-> parameters
    def flats(self) -> list[torch.Tensor]:
        z = self.zero
        return z.fp32_partitioned_groups_flat if self.stage == 3 else z.single_partition_of_fp32_groups

    def group_of(self, flat: torch.Tensor) -> int:
        """Index of the ZeRO group (stage 1/2) / sub-group (stage 3) whose fp32 partition `flat` is."""
        for i, t in enumerate(self.flats()):
            if t is flat:
                return i
        raise RuntimeError("FusedLISA.step() got a tensor that is none of ZeRO's fp32 partitions")

    def members(self, i: int) -> list[torch.nn.Parameter]:
        """Every parameter of ZeRO group / sub-group i (also those of which this rank owns nothing)."""
        return list(self.zero.fp16_groups[i] if self.stage == 3 else self.zero.bit16_groups[i])

    def slices(self, i: int) -> list[Slice]:
        """The slices of ZeRO group / sub-group i's fp32 partition, in partition order."""
        z, out = self.zero, []
        if self.stage == 3:
            import torch.distributed as dist

            rank = dist.get_rank(group=z._get_sub_group_process_group(i))
            for p in z.fp16_groups[i]:
                _, offset, pn = z.grad_position[z.get_param_id(p)]
                valid = max(0, min(pn, p.ds_numel - rank * pn))
                if valid:
                    out.append(Slice(p, rank * pn, valid, offset))
            return out
        for lp in z.bit16_groups[i]:
            m = getattr(lp, "_hp_mapping", None)
            if m is not None:
                out.append(Slice(lp, m.lp_fragment_address.start, m.lp_fragment_address.numel,
                                 m.hp_fragment_address.start))
        return sorted(out, key=lambda s: s.offset)

    def owned(self) -> dict[int, tuple[Slice, torch.Tensor]]:
        """{id(param): (its slice, the fp32 view)} over every partition this rank holds."""
        out = {}
        for i, flat in enumerate(self.flats()):
            for s in self.slices(i):
                out[id(s.param)] = (s, flat.narrow(0, s.offset, s.numel))
        return out

    @staticmethod
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    # ------------------------------------------------------------------ rebuild for a new trainable set
    @torch.no_grad()
    def rebuild(self, groups: list[list[torch.nn.Parameter]], leaving) -> None:
        """Re-run ZeRO's constructor for the params trainable now (`requires_grad`, set by the caller):
        `groups[k]` becomes client group k's "params" (trainable ones in the caller's order; ZeRO filters
        the others); `leaving` (trained until now, frozen from now on) get storage of their own first, out
        of ZeRO's flat buffers, as a param frozen at deepspeed.initialize has."""
        z = self.zero
        for p in leaving:
            if self.stage == 3:
                p.ds_tensor.data = p.ds_tensor.data.clone()
            else:
                p.data = p.data.clone()
        z.destroy()
        self.rebuilding = True
        try:
            for g, params in zip(z.optimizer.param_groups, groups):
                dict.__setitem__(g, "params", list(params))  # (not a ZeRO write: no hook)
            type(z).__init__(z, **self.args)
        finally:
            self.rebuilding = False
        if self.stage == 3:
            coordinator = z._get_param_coordinator()
            if not coordinator.is_invalid_trace():  # (the fetch order recorded for the old set)
                coordinator._invalidate_trace()
        engine = self.engine
        if engine is not None and hasattr(engine, "_configure_autoep_folding_optimizer_gradient_reduction"):
            engine._configure_autoep_folding_optimizer_gradient_reduction()  # (what the engine does after init)

    @torch.no_grad()
    def write_low_precision(self) -> None:
        """ZeRO's own fp32 -> low-precision copy (and stage 1/2's all-gather) for every partition: after
        fp32 masters were written into the partitions outside a step."""
        z = self.zero
        if self.stage == 3:
            for i in range(len(z.fp16_groups)):
                z._reassign_or_swap_out_partitioned_parameters(i)
        else:
            z.update_lp_params()

    # ------------------------------------------------------------------ hooks into the engine's calls
    def wrap_step(self, after) -> None:
        """zero.step() then after(): an instance attribute, which the engine's `self.optimizer.step()` finds."""
        z = self.zero
        original = type(z).step.__get__(z)

        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            after()
            return out

        z.step = step

    def wrap_load_checkpoint(self, before) -> None:
        """engine.load_checkpoint(load_dir, tag=None, ...): before(load_dir, tag) first (tag resolved from
        the `latest` file as DeepSpeed does), then DeepSpeed's own load."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("FusedLISA found no DeepSpeedEngine above the ZeRO optimizer's construction")
        original = type(engine).load_checkpoint.__get__(engine)

        def load_checkpoint(load_dir, tag=None, *args, **kwargs):
            resolved = tag
            if resolved is None:
                import os

                latest = os.path.join(load_dir, "latest")
                if os.path.isfile(latest):
                    with open(latest) as f:
                        resolved = f.read().strip()
            if resolved is not None:
                before(load_dir, str(resolved))
            return original(load_dir, tag, *args, **kwargs)

        engine.load_checkpoint = load_checkpoint

    def zero_file(self, load_dir: str, tag: str) -> str:
        """This rank's ZeRO optimizer-state file of a checkpoint (the name the engine saves it under)."""
        return self.engine._get_zero_ckpt_name(load_dir, tag)

    def client_state_in(self, sd: dict) -> dict:
        """The client optimizer's state_dict inside a ZeRO state_dict (stage 1/2: base_optimizer_state;
        stage 3: optimizer_state_dict)."""
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

        return sd[OPTIMIZER_STATE_DICT if self.stage == 3 else BASE_OPTIMIZER_STATE]


def gather_slice(numel: int, pieces: dict[tuple[int, int], torch.Tensor], want: tuple[int, int] | None,
                 like: torch.Tensor | None = None):
    """Re-assemble element-range pieces of one flat tensor of `numel` elements that the ranks hold
    (`pieces`: this rank's {(start, end): tensor}; ranges of different ranks must not overlap) and return
    this rank's slice `want` (None: nothing). Collective: every rank calls it, in the same order. One
    all_reduce over `numel` elements (dtype and device of the pieces, or of `like`)."""
    import torch.distributed as dist

    ref = next(iter(pieces.values()), like)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    full = torch.zeros(numel, dtype=torch.float32 if dtype == torch.bfloat16 else dtype, device=device)
    for (a, b), t in pieces.items():
        full[a:b] = t.reshape(-1)
    dist.all_reduce(full)  # (gloo has no bf16 sum: bf16 pieces travel as fp32, exactly)
    return None if want is None else full[want[0]:want[1]].to(dtype).clone()
