"""Parameter groups and each trained parameter's optimizer-state format.

FusedLISA takes the model, so its groups are given by name or by Parameter, on top of one default group:

    FusedLISA(model, lr=1e-5, moments="4bit", master_weights="stochastic",
              param_groups=[{"params": ["model.embed_tokens", "lm_head"], "moments": "fp32",
                             "master_weights": "kahan"},
                            {"params": ["*norm*", "*.bias"], "weight_decay": 0.0}])

- `opt.param_groups[0]` is the default group: the constructor's keywords and every trained parameter no
  other group claims. `opt.param_groups[1:]` are the given groups, in order, each a torch.optim-style dict
  ("params" holds the Parameters; missing keys take the constructor's values). LR schedulers and the
  Hugging Face Trainer see ordinary param groups.
- "params": Parameters of the model, or name patterns (fnmatch, matched against every name of a
  parameter, tied names included; a pattern also matches everything under a module of that name, so
  "lm_head" matches "lm_head.weight"), or a list mixing both. Within a group, parameters keep the model's
  order. A parameter may belong to one group only.
- Keys a group may set (GROUP_KEYS): lr, betas, eps, weight_decay (read at every step: edit them in place
  as with torch; every value torch.optim.AdamW accepts: hparams.py), moments, master_weights,
  min_quantized_size (fixed at construction: they decide the packed layout; step() raises if they were
  edited).

State format of a parameter (`StateFormat`): its group's `moments` and `master_weights`, except that under
moments="8bit"/"4bit" a parameter with fewer than `min_quantized_size` elements keeps fp32 moments (the
small-tensor rule of bitsandbytes' `min_8bit_size` and torchao's 4096-element threshold: norm weights and
biases cost little and are where quantization error hurts most). Parameters of one format share one set of
packed buffers (a *partition*, packing.py); each partition is one kernel launch per step.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from . import hparams
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "moments", "master_weights", "min_quantized_size")
LAYOUT_KEYS = ("moments", "master_weights", "min_quantized_size")  # fixed at construction
MIN_QUANTIZED_SIZE = 4096  # bitsandbytes min_8bit_size, torchao's threshold


@dataclass(frozen=True)
class StateFormat:
    """How one parameter's optimizer state is stored (kernels/contract.py defines each format)."""

    moments: str  # "fp32" | "bf16" | "8bit" | "4bit"
    master_weights: str  # "fp32" | "kahan" | "stochastic"

    def __str__(self) -> str:
        return f"{self.moments}/{self.master_weights}"

    @property
    def lean(self) -> bool:
        return self.moments != "fp32" or self.master_weights != "fp32"


def state_format(group: dict, numel: int) -> StateFormat:
    """The format of a parameter of `numel` elements in `group` (the small-tensor rule applied)."""
    from .kernels import quant

    moments = group["moments"]
    if moments in quant.BLOCK and numel < group["min_quantized_size"]:
        moments = "fp32"
    return StateFormat(moments, group["master_weights"])


def validate_group_options(options: dict, where: str, param_dtypes=()) -> None:
    """Check one group's options (the defaults or a param_groups entry); `param_dtypes`: the dtypes of the
    trainable params (master-free updates need bf16/fp16). ValueError naming `where`, the key, the bad
    value and the choices."""
    from .kernels import quant

    for key in options:
        if key != "params" and key not in GROUP_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; a FusedLISA param group may set {GROUP_KEYS}")
    hparams.check(options, where)  # lr, betas, eps, weight_decay: what torch.optim.AdamW accepts
    if "moments" in options and options["moments"] not in quant.FORMATS:
        raise ValueError(f"{where}: Invalid moments: {options['moments']!r}; choose one of {quant.FORMATS}")
    if "master_weights" in options:
        mw = options["master_weights"]
        if mw not in quant.MASTER_WEIGHTS:
            raise ValueError(f"{where}: Invalid master_weights: {mw!r}; choose one of (None,) + {quant.MASTER_WEIGHTS}")
        allowed = {"fp32": None, "kahan": (torch.bfloat16, torch.float16), "stochastic": (torch.bfloat16,)}[mw]
        bad = sorted(str(d) for d in param_dtypes if allowed is not None and d not in allowed)
        if bad:
            raise ValueError(
                f"{where}: master_weights={mw!r} updates the params in place without an fp32 master, which needs "
                f"{' or '.join(map(str, allowed))} params; this model's trainable params are {', '.join(bad)}: "
                "convert the model (e.g. model.to(torch.bfloat16)) or use master_weights='fp32'")
    if "min_quantized_size" in options:
        m = options["min_quantized_size"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{where}: Invalid min_quantized_size: {m!r} (an integer >= 0: parameters with fewer "
                             "elements keep fp32 moments under moments='8bit'/'4bit'; 0 quantizes every parameter)")


def _names_by_param(model) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _matches(names: list[str], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*") for n in names)


def resolve(model, named: list, param_groups, param_dtypes=()) -> list[list[int]]:
    """Members of every group: [default group's indices, group 1's, ...], indices into `named` (the trained
    (name, Parameter) pairs in layout order), each list ascending. Raises ValueError naming the group and the
    fix for a malformed group, a pattern or Parameter that names no trained parameter, or a parameter claimed
    by two groups; TypeError for a group that is not a dict."""
    if param_groups is None:
        return [list(range(len(named)))]
    if isinstance(param_groups, dict) or not isinstance(param_groups, (list, tuple)):
        raise TypeError(f"param_groups must be a list of dicts, got {type(param_groups).__name__}; "
                        'e.g. param_groups=[{"params": ["lm_head"], "moments": "fp32"}]')
    index = {id(p): j for j, (_, p) in enumerate(named)}
    all_names = _names_by_param(model)
    owner: dict[int, int] = {}
    members: list[list[int]] = []
    for g, group in enumerate(param_groups, start=1):
        where = f"param_groups[{g - 1}] (opt.param_groups[{g}])"
        if not isinstance(group, dict):
            raise TypeError(f"{where} must be a dict with 'params' and options, got {type(group).__name__}")
        validate_group_options(group, where, param_dtypes)
        if "params" not in group:
            raise ValueError(f"{where} has no 'params': give Parameters of the model or name patterns, "
                             'e.g. {"params": ["lm_head"], "moments": "fp32"}')
        items = group["params"]
        items = [items] if isinstance(items, (str, torch.Tensor)) else list(items)
        if not items:
            raise ValueError(f"{where}: 'params' is empty; give Parameters of the model or name patterns")
        chosen: set[int] = set()
        for item in items:
            if isinstance(item, str):
                hit = {j for j, (_, p) in enumerate(named) if _matches(all_names.get(id(p), []), item)}
                if not hit:
                    frozen = [n for n, p in model.named_parameters() if not p.requires_grad
                              and _matches(all_names.get(id(p), [n]), item)]
                    why = (f"it matches only parameters frozen before FusedLISA was built ({frozen[:3]})" if frozen
                           else "it matches no parameter name of the model")
                    raise ValueError(f"{where}: pattern {item!r} names no trained parameter: {why}; names look like "
                                     f"{[n for n, _ in named[:3]]} (fnmatch patterns; 'lm_head' also matches "
                                     "'lm_head.weight')")
                chosen |= hit
            elif isinstance(item, torch.Tensor):
                if id(item) not in index:
                    name = all_names.get(id(item))
                    why = (f"{name[0]!r} is frozen (requires_grad=False before FusedLISA was built)" if name
                           else "it is not a parameter of this model")
                    raise ValueError(f"{where}: a Parameter of shape {tuple(item.shape)} is not trained by this "
                                     f"FusedLISA: {why}")
                chosen.add(index[id(item)])
            else:
                raise TypeError(f"{where}: 'params' items must be Parameters or name patterns (str), got "
                                f"{type(item).__name__}")
        for j in chosen:
            if j in owner:
                raise ValueError(f"{where}: parameter {named[j][0]!r} is already in param_groups[{owner[j] - 1}]; "
                                 "a parameter may belong to one group only")
            owner[j] = g
        members.append(sorted(chosen))
    return [[j for j in range(len(named)) if j not in owner]] + members


def group_dicts(defaults: dict, param_groups, members: list[list[int]], params: list) -> list[dict]:
    """torch-style group dicts: the default group, then each given group with its options; 'params' lists
    the Parameters of each (in the given member order)."""
    given = [{}] + [{k: v for k, v in g.items() if k != "params"} for g in (param_groups or [])]
    return [dict(defaults, **opts, params=[params[j] for j in idx]) for opts, idx in zip(given, members)]


def layout_keys(param_groups) -> list[tuple]:
    """What step() checks is unchanged: each group's state-format keys."""
    return [tuple(g.get(k) for k in LAYOUT_KEYS) for g in param_groups]


def check_unchanged(param_groups, keys: list[tuple]) -> dict:
    """param_groups edited in place: hyperparameters are read every step (ValueError / TypeError naming the
    group for an invalid one, as at construction), but the state-format keys decide the packed layout and the
    group list the param set (RuntimeError naming the group, the key and the fix). Returns the step's
    hyperparameters, {id(group): hparams.HParams}, read once here (one host read per tensor value), for
    update.adamw_step."""
    if len(param_groups) != len(keys):
        raise RuntimeError(f"FusedLISA has {len(keys)} param groups, param_groups now holds {len(param_groups)}: "
                           "add groups with opt.add_param_group(...) (or FusedLISA(param_groups=...)), not by "
                           "editing the list")
    read = {}
    for k, (g, was) in enumerate(zip(param_groups, keys)):
        # the hyperparameters, checked as at construction (an edit or a scheduler may have set them to anything)
        read[id(g)] = hparams.read(g, f"opt.param_groups[{k}] (edited in place)")
        now = tuple(g.get(key) for key in LAYOUT_KEYS)
        if now != was:
            key, a, b = next((n, x, y) for n, x, y in zip(LAYOUT_KEYS, was, now) if x != y)
            raise RuntimeError(
                f"param_groups[{k}][{key!r}] was changed from {a!r} to {b!r}: the state format is fixed at "
                f"construction (it decides the packed layout); set it back, or take state_dict(), release() and "
                f"build a new FusedLISA with {key}={b!r} (load_state_dict converts the moments)")
    return read


def index_params(layout, members: list[list[int]]):
    """Where each trained param sits: (order, always, block_params). `members` are the groups' indices into
    the layout's named params (always-trained first, then block by block); param index i = position in the
    concatenated groups, order[i] its index in the layout; always / block_params[b]: the param indices of
    the always-trained params and of block b, ascending."""
    order = [j for m in members for j in m]
    pos = {j: i for i, j in enumerate(order)}
    n_always = len(layout.always)
    always, blocks, j = sorted(pos[j] for j in range(n_always)), [], n_always
    for blk in layout.blocks:
        blocks.append(sorted(pos[k] for k in range(j, j + len(blk))))
        j += len(blk)
    return order, always, blocks
