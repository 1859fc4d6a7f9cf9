"""FusedLISA state_dict / load_state_dict: torch's format plus a "lisa" section.

    {"state": {param index: {"step", "exp_avg", "exp_avg_sq"[, "master_param"]}},   CPU tensors, param shape
     "param_groups": [...],                                                         as torch.optim
     "lisa": {"version", "global_step", "active_layers", "generator", "inactive_moments",
              "n_active_layers", "switch_every", "sampler", "params": [(name, shape)], "param_dtype"}}

The per-param rows are whatever PackedBuffers.paged() holds (ROWS maps buffer -> state key), so a new
state row (a Kahan compensation, quantized moments) only needs an entry in ROWS.

Cross-dtype resume (the saved run's param dtype differs from this model's):
* saved from a bf16/fp16 model (fp32 masters saved) -> fp32 model: the masters become the params, so the
  run continues from the exact fp32 values (a warning names both dtypes).
* saved from an fp32 model (no masters) -> bf16/fp16 model: the masters start from this model's params,
  as for a fresh optimizer (a warning names both dtypes: the fp32 precision of the saved run is lost).
* bf16 <-> fp16: the saved masters are used as they are.
"""
from __future__ import annotations

import logging

import torch

from .binding import local

logger = logging.getLogger("lisa_fused")

STATE_VERSION = 1
# PackedBuffers attribute -> state_dict key, in the order PackedBuffers.paged() returns them
ROWS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "master": "master_param"}


def row_keys(bufs) -> list[str]:
    """The state_dict key of each row of bufs.paged()."""
    by_id = {id(getattr(bufs, attr)): key for attr, key in ROWS.items()}
    return [by_id[id(t)] for t in bufs.paged()]


@torch.no_grad()
def state_dict(opt) -> dict:
    opt._store.synchronize()
    keys = row_keys(opt._bufs)
    state = {}
    packed_at = {i: off for i, off, _ in opt._packed.placements(opt._slot_of)}
    saved_blocks = {}
    for b in range(len(opt._block_params)):
        if b not in opt._slot_of and opt._store.has(b):
            saved_blocks.update({i: (b, off) for i, off, _ in opt._packed.blocks[b].entries})
    for i, p in enumerate(opt._params):
        p = local(p)  # the rank-local shard under FSDP2: optimizer state is per rank
        if opt._steps[i] == 0 and i not in packed_at:
            continue
        if i in packed_at:
            off = packed_at[i]
            rows = [r[off:off + p.numel()] for r in opt._bufs.paged()]
        elif i in saved_blocks:
            b, off = saved_blocks[i]
            rows = [r[off:off + p.numel()] for r in opt._store.get(b)]
        else:  # "drop": an inactive block keeps no state
            continue
        entry = {"step": torch.tensor(float(opt._steps[i]))}
        entry.update({k: r.to("cpu", copy=True).view(p.shape) for k, r in zip(keys, rows)})
        state[i] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(range(len(opt._params)))}
              for g in opt.param_groups]
    return {"state": state, "param_groups": groups, "lisa": {
        "version": STATE_VERSION,
        "global_step": opt._global_step,
        "active_layers": list(opt.active_layers),
        "generator": opt._generator.get_state(),
        "inactive_moments": opt.inactive_moments,
        "n_active_layers": opt.n_active_layers,
        "switch_every": opt.switch_every,
        "sampler": opt._sampler_name,
        "params": [(n, tuple(p.shape)) for n, p in zip(opt._names, opt._params)],
        "param_dtype": str(opt.param_dtype).removeprefix("torch."),
    }}


def _saved_dtype(lisa, saved_state) -> str:
    if "param_dtype" in lisa:
        return lisa["param_dtype"]
    # written before param_dtype was recorded: masters are saved exactly for low-precision models
    has_master = any("master_param" in e for e in saved_state.values())
    return "bfloat16/float16" if has_master else "float32"


def _validate(opt, state_dict):
    """Every check before anything changes; returns (lisa, saved_state, keys to load, masters_to_params)."""
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
        raise ValueError(
            f"state_dict is from a different model: it has {len(theirs)} trainable params, this optimizer "
            f"{len(mine)}" + (f"; first mismatch: saved {diff[0]} vs here {diff[1]}" if diff else ""))
    for key in ("n_active_layers", "inactive_moments"):
        if lisa[key] != getattr(opt, key):
            raise ValueError(f"state_dict has {key}={lisa[key]!r}, this optimizer {getattr(opt, key)!r}")
    if len(state_dict["param_groups"]) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(state_dict['param_groups'])} param groups, expected {len(opt.param_groups)}")

    saved_state = {int(k): v for k, v in state_dict["state"].items()}
    keys = row_keys(opt._bufs)
    here = str(opt.param_dtype).removeprefix("torch.")
    saved_dtype = _saved_dtype(lisa, saved_state)
    masters_to_params = opt._bufs.lowp is None and any("master_param" in e for e in saved_state.values())
    missing_master = "master_param" in keys and any("master_param" not in e for e in saved_state.values())
    if masters_to_params:
        logger.warning("FusedLISA.load_state_dict: the state_dict was saved from a %s model with fp32 masters; this "
                       "model is %s: its trained params are set to the saved masters", saved_dtype, here)
    if missing_master:
        if saved_dtype == here:
            raise ValueError(f"state_dict of a {here} model has no 'master_param' for some params: it is damaged")
        logger.warning("FusedLISA.load_state_dict: the state_dict was saved from a %s model (no fp32 masters); this "
                       "model is %s: its fp32 masters start from its current params", saved_dtype, here)
    need = ["step", "exp_avg", "exp_avg_sq"] + (["master_param"] if masters_to_params else [])
    for i, entry in saved_state.items():
        if not 0 <= i < len(opt._params):
            raise ValueError(f"state_dict has state for param index {i}; this model has {len(opt._params)} params")
        for key in need:
            if key not in entry:
                raise ValueError(f"state_dict state for param {opt._names[i]!r} has no {key!r}")
        for key in need[1:] + [k for k in keys if k in entry]:
            if tuple(entry[key].shape) != opt._shapes[i]:
                raise ValueError(f"state_dict {key} of {opt._names[i]!r} has shape {tuple(entry[key].shape)}, "
                                 f"expected {opt._shapes[i]}")
    target = tuple(sorted(int(b) for b in lisa["active_layers"]))
    n_blocks = len(opt._block_params)
    if len(set(target)) != opt.n_active_layers or any(not 0 <= b < n_blocks for b in target):
        raise ValueError(f"state_dict active_layers {list(target)} are not {opt.n_active_layers} distinct "
                         f"blocks in 0..{n_blocks - 1}")
    return lisa, saved_state, keys, target, masters_to_params


@torch.no_grad()
def load_state_dict(opt, state_dict) -> None:
    lisa, saved_state, keys, target, masters_to_params = _validate(opt, state_dict)
    # Everything is checked: from here on the load cannot fail half-way.
    for g, saved in zip(opt.param_groups, state_dict["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "params"})
    # Re-arrange the slots as saved (params move with their current values), then fill in state.
    opt._store.clear()
    opt._move(target, page=False)
    opt._steps = [int(saved_state[i]["step"]) if i in saved_state else 0 for i in range(len(opt._params))]
    opt._global_step = int(lisa["global_step"])
    opt.switch_every = int(lisa["switch_every"])
    # .cpu(): accelerate's AcceleratedOptimizer moves every tensor of a state_dict to the device before
    # loading it (a CUDA ByteTensor here); Generator.set_state takes a CPU ByteTensor only.
    opt._generator.set_state(lisa["generator"].cpu())
    opt._sync_generator_from_rank0()

    def fill(rows, i, own_value):
        """rows: per-key flat views of param i's state; own_value: its current value (flat)."""
        e = saved_state.get(i)
        for key, view in zip(keys, rows):
            if e is not None and key in e:
                view.copy_(e[key].reshape(-1))
            elif key == "master_param":
                view.copy_(own_value)
            else:
                view.zero_()

    packed = opt._packed.placements(opt._slot_of)
    for i, off, n in packed:
        fill([buf[off:off + n] for buf in opt._bufs.paged()], i, opt._bufs.param[off:off + n])
    for b, idx in enumerate(opt._block_params):
        if b in opt._slot_of or not any(i in saved_state for i in idx):
            continue
        region = opt._packed.blocks[b]
        block_state = torch.zeros(len(keys), region.length)
        for i, off, n in region.entries:
            fill(list(block_state[:, off:off + n]), i, local(opt._params[i]).detach().reshape(-1).float().cpu())
        opt._store.put(b, block_state)
    if masters_to_params:  # an fp32 model continues from the saved fp32 masters
        packed_at = {i: (off, n) for i, off, n in packed}
        for i, e in saved_state.items():
            if "master_param" in e:
                local(opt._params[i]).detach().copy_(e["master_param"].reshape(opt._shapes[i]))
                if i in packed_at:  # (the same memory unless FSDP2's copy mode)
                    off, n = packed_at[i]
                    opt._bufs.param[off:off + n].copy_(e["master_param"].reshape(-1))
