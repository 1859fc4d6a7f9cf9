"""FusedLISA state_dict / load_state_dict: torch's format plus a "lisa" section.

    {"state": {param index: {"step", "exp_avg", "exp_avg_sq"[, "master_param"]}},   CPU tensors, param shape
     "param_groups": [...],                                                         as torch.optim
     "lisa": {"version", "global_step", "active_layers", "generator", "inactive_moments",
              "n_active_layers", "switch_every", "sampler", "grad_meter", "params": [(name, shape)],
              "param_dtype"}}

"sampler" is the sampler's state_dict (its name and what it learned; a name string in files written
before the adaptive samplers, which is accepted and restores nothing); "grad_meter" the grad_norm
sampler's per-segment sums of squares of the interval in progress (None for the other samplers), so a
resume in the middle of an interval draws what the uninterrupted run draws.

The per-param rows are whatever PackedBuffers.paged() holds (ROWS maps buffer -> state key), so a new
state row (a Kahan compensation, quantized moments) only needs an entry in ROWS.

Lean state (kernels/contract.py): the "lisa" section records "moments" and "master_weights" (and the
stochastic-rounding "sr_seed"); per param, 8bit/4bit moments are saved as they are, uint8 codes
exp_avg / exp_avg_sq [n or ceil(n/2)] plus fp32 exp_avg_scale / exp_avg_sq_scale [ceil(n/BLOCK)] (1-D),
bf16 moments in the param's shape, and the Kahan "compensation" in the param's shape and dtype.
* another `moments` setting: converted, per param, by dequantizing and requantizing through quant.py
  (bf16 targets round to nearest once); a warning names both settings. Not bitwise, by nature.
* another `master_weights` setting: refused (ValueError naming both): the fp32 value of a master-free
  param is the model's own weight (+ compensation), which the state_dict does not hold.

Cross-dtype resume (the saved run's param dtype differs from this model's):
* saved from a bf16/fp16 model (fp32 masters saved) -> fp32 model: the masters become the params, so the
  run continues from the exact fp32 values (a warning names both dtypes).
* saved from an fp32 model (no masters) -> bf16/fp16 model: the masters start from this model's params,
  as for a fresh optimizer (a warning names both dtypes: the fp32 precision of the saved run is lost).
* bf16 <-> fp16: the saved masters are used as they are.
"""
from __future__ import annotations

import logging
import math

import torch

from . import sampling
from .binding import local
from .groups import LAYOUT_KEYS
from .kernels import quant

logger = logging.getLogger("lisa_fused")

STATE_VERSION = 1
# PackedBuffers attribute -> state_dict key, in the order PackedBuffers.paged() returns them
ROWS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "exp_avg_scale": "exp_avg_scale",
        "exp_avg_sq_scale": "exp_avg_sq_scale", "compensation": "compensation", "master": "master_param"}
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")


def row_keys(bufs) -> list[str]:
    """The state_dict key of each row of bufs.paged()."""
    return [ROWS[name] for name in bufs.paged_names()]


def _expected(bufs, key, shape, numel):
    """(shape, dtype or None) a saved row `key` of a param of `shape` must have in these buffers' format."""
    name = {v: k for k, v in ROWS.items()}[key]
    if key in MOMENT_KEYS and bufs.moments in quant.BLOCK:
        t = getattr(bufs, name)
        return (-(-numel // bufs.divisor(name)),), t.dtype
    return shape, (getattr(bufs, name).dtype if key in MOMENT_KEYS else None)


def _formats(opt) -> list[tuple[str, str]]:
    state = opt._packed_state
    return [(state.formats[k].moments, state.formats[k].master_weights) for k in state.part_of]


def convert_moments(entry: dict, src: str, dst: str, shape) -> dict:
    """entry's exp_avg/exp_avg_sq (+ scales) in format `src` -> format `dst` (quant.py), other keys kept.
    Dequantize to fp32, then requantize (block-wise) or round to nearest (bf16)."""
    n = 1
    for d in shape:
        n *= d
    out = {k: v for k, v in entry.items() if k not in MOMENT_KEYS}
    for which in ("exp_avg", "exp_avg_sq"):
        if src in quant.BLOCK:
            x = quant.dequantize(entry[which].reshape(-1), entry[which + "_scale"].reshape(-1), src, which, n)
        else:
            x = entry[which].reshape(-1).float()
        if dst in quant.BLOCK:
            blk = quant.BLOCK[dst]
            codes, scales = quant.quantize(torch.cat([x, x.new_zeros(-n % blk)]), dst, which)
            codes = codes[:quant.codes_numel(n, dst)].clone()
            if dst == "4bit" and n % 2:  # the kernels write the unused high nibble as 0
                codes[-1] &= 0xF
            out[which], out[which + "_scale"] = codes, scales[:quant.n_blocks(n, dst)].clone()
        else:
            out[which] = x.to(torch.float32 if dst == "fp32" else torch.bfloat16).view(shape)
    return out


@torch.no_grad()
def state_dict(opt) -> dict:
    opt._store.synchronize()
    packed = opt._packed_state
    state = {}
    packed_at = {i: off for i, off, _ in packed.placements(opt._slot_of)}
    saved_blocks = {}  # param -> (its partition's rows of its parked block, offset in the block's region)
    for b in range(len(opt._block_params)):
        if b not in opt._slot_of and opt._store.has(b):
            per_part = packed.split_rows(opt._store.get(b))
            for k, lay in enumerate(packed.layouts):
                saved_blocks.update({i: (per_part[k], off) for i, off, _ in lay.blocks[b].entries})
    for i, p in enumerate(opt._params):
        p = local(p)  # the rank-local shard under FSDP2: optimizer state is per rank
        if opt._steps[i] == 0 and i not in packed_at:
            continue
        bufs = packed.buffers_of(i)
        if i in packed_at:
            rows = bufs.rows(packed_at[i], p.numel())
        elif i in saved_blocks:
            block_rows, off = saved_blocks[i]
            rows = bufs.rows(off, p.numel(), buffers=block_rows)
        else:  # "drop": an inactive block keeps no state
            continue
        entry = {"step": torch.tensor(float(opt._steps[i]))}
        # codes and scales stay 1-D; element-wise rows take the param's shape, as torch.optim saves them
        flat = bufs.moments in quant.BLOCK
        entry.update({k: r.to("cpu", copy=True).view(-1 if flat and k in MOMENT_KEYS else p.shape)
                      for k, r in zip(row_keys(bufs), rows)})
        state[i] = entry
    groups, start = [], 0
    for g in opt.param_groups:
        n = len(g["params"])
        groups.append({k: v for k, v in g.items() if k != "params"} | {"params": list(range(start, start + n))})
        start += n
    return {"state": state, "param_groups": groups, "lisa": {
        "version": STATE_VERSION,
        "global_step": opt._global_step,
        "active_layers": list(opt.active_layers),
        "generator": opt._generator.get_state(),
        "inactive_moments": opt.inactive_moments,
        "n_active_layers": opt.n_active_layers,
        "switch_every": opt.switch_every,
        "sampler": opt._sampler.state_dict(),  # {"name", "n_blocks", what it learned}: plain values
        "grad_meter": None if opt._meter is None else opt._meter.state_dict(),  # grad_norm: this interval so far
        "params": [(n, tuple(p.shape)) for n, p in zip(opt._names, opt._params)],
        "param_dtype": str(opt.param_dtype).removeprefix("torch."),
        "moments": opt.moments,
        "master_weights": opt.master_weights,
        "formats": [list(f) for f in _formats(opt)],  # per param (moments, master_weights): small-tensor rule, groups
        "sr_seed": opt._sr_seed,
    }}


def _saved_dtype(lisa, saved_state) -> str:
    if "param_dtype" in lisa:
        return lisa["param_dtype"]
    # written before param_dtype was recorded: masters are saved exactly for low-precision models
    has_master = any("master_param" in e for e in saved_state.values())
    return "bfloat16/float16" if has_master else "float32"


def _validate(opt, state_dict, quiet: bool = False):
    """Every check before anything changes; returns (lisa, saved_state, target active set, masters_to_params)."""
    lisa = state_dict.get("lisa") if isinstance(state_dict, dict) else None
    if lisa is None:
        raise ValueError("not a FusedLISA state_dict: it has no 'lisa' section "
                         "(a torch.optim.AdamW state_dict cannot restore the LISA schedule)")
    if lisa.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported FusedLISA state_dict version {lisa.get('version')!r}, expected {STATE_VERSION}")
    mine = [(n, tuple(p.shape)) for n, p in zip(opt._names, opt._params)]
    theirs = [(n, tuple(s)) for n, s in lisa["params"]]
    if theirs != mine:
        diff = next(((a, b) for a, b in zip(theirs, mine) if a != b), None)
        hint = ("; the saved run trained more params: if it called add_param_group, call it the same way before "
                "load_state_dict" if len(theirs) > len(mine) and theirs[:len(mine)] == mine else
                "; build the FusedLISA with the saved run's model, frozen params and param_groups")
        raise ValueError(
            f"state_dict is from a different model or param_groups: it has {len(theirs)} trainable params, this "
            f"optimizer {len(mine)}" + (f"; first mismatch: saved {diff[0]} vs here {diff[1]}" if diff else "") + hint)
    for key in ("n_active_layers", "inactive_moments"):
        if lisa[key] != getattr(opt, key):
            raise ValueError(f"state_dict has {key}={lisa[key]!r}, this optimizer {getattr(opt, key)!r}")
    saved_sampler = lisa.get("sampler")
    if isinstance(saved_sampler, dict) and saved_sampler.get("name") != opt._sampler.name:
        raise ValueError(f"state_dict was saved with sampler={saved_sampler.get('name')!r}, this optimizer uses "
                         f"{opt._sampler.name!r}: build the FusedLISA with the saved sampler to resume")
    saved_groups = [len(g["params"]) for g in state_dict["param_groups"]]
    if saved_groups != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError(f"state_dict has param groups of {saved_groups} params, this optimizer "
                         f"{[len(g['params']) for g in opt.param_groups]}: build it with the same param_groups")

    saved_state = {int(k): v for k, v in state_dict["state"].items()}
    for i in saved_state:
        if not 0 <= i < len(opt._params):
            raise ValueError(f"state_dict has state for param index {i}; this model has {len(opt._params)} params")
    here = _formats(opt)
    saved_formats = [tuple(f) for f in lisa.get("formats", [])] or \
        [(lisa.get("moments", "fp32"), lisa.get("master_weights", "fp32"))] * len(here)
    for i, ((saved_fmt, saved_mw), (fmt, mw)) in enumerate(zip(saved_formats, here)):
        if saved_mw != mw:
            raise ValueError(
                f"state_dict was saved with master_weights={saved_mw!r} for {opt._names[i]!r}, this optimizer has "
                f"master_weights={mw!r}: a master-free param's fp32 value is the model weight itself, which the "
                f"state_dict does not hold; build the FusedLISA with master_weights={saved_mw!r} to resume")
        if saved_fmt not in quant.FORMATS:
            raise ValueError(f"state_dict has moments={saved_fmt!r} for {opt._names[i]!r}, not one of {quant.FORMATS}")
    converted = sorted({(saved_formats[i][0], here[i][0]) for i in saved_state if saved_formats[i][0] != here[i][0]})
    if converted:
        logger.warning("FusedLISA.load_state_dict: the state_dict was saved with %s, this optimizer has %s: the "
                       "moments are converted (dequantized and requantized)",
                       ", ".join(f"moments={a!r}" for a in dict.fromkeys(a for a, _ in converted)),
                       ", ".join(f"moments={b!r}" for b in dict.fromkeys(b for _, b in converted)))
        for i, e in saved_state.items():
            src = saved_formats[i][0]
            need_saved = ("exp_avg", "exp_avg_sq") + (("exp_avg_scale", "exp_avg_sq_scale") if src in quant.BLOCK else ())
            miss = [k for k in need_saved if k not in e]
            if src != here[i][0] and miss:
                raise ValueError(f"state_dict state for param {opt._names[i]!r} cannot be converted from moments="
                                 f"{src!r}: missing {miss}")
        saved_state = {i: convert_moments(e, saved_formats[i][0], here[i][0], opt._shapes[i])
                       if saved_formats[i][0] != here[i][0] else e for i, e in saved_state.items()}
    packed = opt._packed_state
    here_dtype = str(opt.param_dtype).removeprefix("torch.")
    saved_dtype = _saved_dtype(lisa, saved_state)
    lowp_here = opt.param_dtype != torch.float32
    masters_to_params = not lowp_here and any("master_param" in e for e in saved_state.values())
    missing_master = any("master_param" in row_keys(packed.buffers_of(i)) and "master_param" not in e
                         for i, e in saved_state.items())
    if masters_to_params and not quiet:
        logger.warning("FusedLISA.load_state_dict: the state_dict was saved from a %s model with fp32 masters; this "
                       "model is %s: its trained params are set to the saved masters", saved_dtype, here_dtype)
    if missing_master:
        if saved_dtype == here_dtype:
            raise ValueError(f"state_dict of a {here_dtype} model has no 'master_param' for some params: it is damaged")
        if not quiet:
            logger.warning("FusedLISA.load_state_dict: the state_dict was saved from a %s model (no fp32 masters); this "
                       "model is %s: its fp32 masters start from its current params", saved_dtype, here_dtype)
    for i, entry in saved_state.items():
        bufs = packed.buffers_of(i)
        keys = row_keys(bufs)
        need = ["step"] + [k for k in keys if k in MOMENT_KEYS] + (["master_param"] if masters_to_params else [])
        for key in need:
            if key not in entry:
                raise ValueError(f"state_dict state for param {opt._names[i]!r} has no {key!r}")
        for key in dict.fromkeys(need[1:] + [k for k in keys if k in entry]):
            shape, dtype = _expected(bufs, key, opt._shapes[i], math.prod(opt._shapes[i]))
            if tuple(entry[key].shape) != tuple(shape) or (dtype is not None and entry[key].dtype != dtype):
                raise ValueError(f"state_dict {key} of {opt._names[i]!r} is {entry[key].dtype} "
                                 f"{tuple(entry[key].shape)}, expected {dtype or ''} {tuple(shape)} "
                                 f"(moments={bufs.moments!r})")
    target = tuple(sorted(int(b) for b in lisa["active_layers"]))
    sampling.check_saved_active(opt._sampler, opt.n_active_layers, target)  # (blocks with nothing to train)
    return lisa, saved_state, target, masters_to_params, lowp_here, saved_dtype, here_dtype


@torch.no_grad()
def load_state_dict(opt, state_dict, quiet: bool = False) -> None:
    """Load `state_dict` (this module's layout) into `opt`; `quiet`: no warnings for cross-dtype rules (a
    rebuild after the model moved says so itself)."""
    lisa, saved_state, target, masters_to_params, lowp_here, saved_dtype, here_dtype = _validate(opt, state_dict, quiet)
    # Everything is checked: from here on the load cannot fail half-way.
    for g, saved in zip(opt.param_groups, state_dict["param_groups"]):  # (the state formats stay this optimizer's)
        g.update({k: v for k, v in saved.items() if k != "params" and k not in LAYOUT_KEYS})
    # Re-arrange the slots as saved (params move with their current values), then fill in state.
    opt._store.clear()
    opt._move(target, page=False)
    opt._steps = [int(saved_state[i]["step"]) if i in saved_state else 0 for i in range(len(opt._params))]
    opt._global_step = int(lisa["global_step"])
    opt.switch_every = int(lisa["switch_every"])
    # .cpu(): accelerate's AcceleratedOptimizer moves every tensor of a state_dict to the device before
    # loading it (a CUDA ByteTensor here); Generator.set_state takes a CPU ByteTensor only.
    opt._generator.set_state(lisa["generator"].cpu())
    opt._sr_seed = int(lisa.get("sr_seed", opt._sr_seed))  # the saved run's stochastic-rounding bits
    opt._sync_generator_from_rank0()
    if isinstance(lisa.get("sampler"), dict):  # (draw() takes rank 0's state under torch.distributed)
        opt._sampler.load_state_dict(lisa["sampler"])
    if opt._meter is not None:  # the restored slots give a new segment order
        opt._meter.reset(opt._slots.meter_blocks())
        if lisa.get("grad_meter") is not None:
            opt._meter.load_state_dict(lisa["grad_meter"])

    packed = opt._packed_state

    def fill(rows, i, own_value):
        """rows: per-key flat views of param i's state; own_value: its current value (flat)."""
        e = saved_state.get(i)
        for key, view in zip(row_keys(packed.buffers_of(i)), rows):
            if e is not None and key in e:
                view.copy_(e[key].reshape(-1))
            elif key == "master_param":
                view.copy_(own_value)
            else:
                view.zero_()

    placed = packed.placements(opt._slot_of)
    for i, off, n in placed:
        fill(packed.buffers_of(i).rows(off, n), i, local(opt._params[i]).detach().reshape(-1))
    for b, idx in enumerate(opt._block_params):
        if b in opt._slot_of or not any(i in saved_state for i in idx):
            continue
        block_state = [torch.zeros(n, dtype=d) for d, n in packed.block_spec(b)]
        per_part = packed.split_rows(block_state)
        for k, lay in enumerate(packed.layouts):
            for i, off, n in lay.blocks[b].entries:
                fill(packed.bufs[k].rows(off, n, buffers=per_part[k]), i,
                     local(opt._params[i]).detach().reshape(-1).float().cpu())
        opt._store.put(b, block_state)
    # an fp32 model continues from the saved fp32 masters; a bf16 <-> fp16 one from them rounded to its dtype
    # (its params were rounded to the other dtype: they would otherwise be read as written, over the masters)
    other_lowp = lowp_here and saved_dtype not in (here_dtype, "float32") and "/" not in saved_dtype
    if masters_to_params or other_lowp:
        for i, e in saved_state.items():
            if "master_param" in e:
                local(opt._params[i]).detach().copy_(e["master_param"].reshape(opt._shapes[i]))
    opt._binding.dirty.clear()  # the masters now hold what was saved (or the params' values)
    opt._binding.seen()
