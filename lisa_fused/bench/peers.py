"""The peers a user would pick instead of FusedLISA, each set up the way its own project sets it up, with
the knobs that project documents as defaults for fine-tuning. Each builder takes the loaded model and the
bench's cfg (lr, weight_decay, gamma, switch_every, seed, run_seed) and returns a `methods.Setup`; a
package that is missing (or, for bitsandbytes, whose CPU path does not run) raises `Unavailable` with
the line that installs it, and the bench reports the row as skipped.

    lisa-published  LISA as the published callbacks run it (LMFlow's DynamicLayerActivationCallback, which
                    axolotl's utils/callbacks/lisa.py and ms-swift's callback adapt): torch.optim.AdamW
                    built over every parameter, requires_grad flipped every K steps (`PublishedLISASwitch`)
    badam           pip badam 1.4 `BlockOptimizer` around torch.optim.AdamW, as LlamaFactory builds it
                    (train/trainer_utils.py `_create_badam_optimizer`) with its `badam_*` defaults
    galore          galore-torch 1.0 `GaLoreAdamW`, as transformers builds it for optim="galore_adamw"
                    (trainer_optimizer.py): rank/update_proj_gap/scale defaults, the docs' target modules
    adamw-8bit      torchao 0.18 `torchao.optim.AdamW8bit` over every parameter (transformers'
                    optim="adamw_torch_8bit")
    adamw-8bit-bnb  bitsandbytes 0.50.2 `bnb.optim.AdamW8bit` over every parameter (transformers'
                    optim="adamw_bnb_8bit"), where its CPU path runs

Every peer takes the bench's --lr and weight decay 0 (transformers' TrainingArguments default, which the
Trainer-based recipes above pass on); LMFlow's own LISA defaults (2 layers, 20 steps) are replaced by the
bench's --gamma and --switch-every so that lisa and lisa-published differ only in their implementation.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import warnings

import numpy as np
import torch

from ..plan import kept as kept_bytes
from . import PEER_PACKAGES, install_line
from .setups import Setup

# LlamaFactory's BAdam defaults (hparams/finetuning_args.py, BAdamArgument): layer mode, no start block,
# ascending switch, a switch every 50 steps, verbose 0. With the bench's 40 steps it never switches.
BADAM = dict(switch_block_every=50, start_block=None, switch_mode="ascending", verbose=0)
# transformers' defaults for optim="galore_adamw" without optim_args (trainer_optimizer.py,
# _get_galore_optimizer; the GaLore README's values) and the target modules of its docs' example.
GALORE = dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="std")
GALORE_TARGETS = (r".*.attn.*", r".*.mlp.*")
NO_DECAY = ("bias", "norm")  # name parts transformers' Trainer leaves out of weight decay (it is 0 here anyway)


class Unavailable(Exception):
    """A peer that cannot run here: `reason` and the `install` line that fixes it."""

    def __init__(self, method: str, reason: str, install: str):
        super().__init__(f"{method}: {reason}; {install}")
        self.method, self.reason, self.install = method, reason, install


def import_package(method: str):
    """Import the package peer `method` needs (PEER_PACKAGES); `Unavailable` when it is not installed."""
    module, _ = PEER_PACKAGES[method]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(method, f"{module} is not installed ({exc})", install_line(method)) from None


class PublishedLISASwitch:
    """The layer switch of the published LISA callbacks, as their code does it (LMFlow's
    DynamicLayerActivationCallback; axolotl's and ms-swift's are adapted from it): at the beginning of
    every step whose global step is a multiple of `interval` (step 0 included), requires_grad=False on
    every parameter of every block, then `numpy.random.choice(range(N), n_layers, replace=False)` blocks
    get requires_grad=True again. Nothing outside the block stack is touched (embedding, head, norms stay
    trained). LMFlow and ms-swift draw from numpy's global generator after the Trainer's set_seed(seed); a
    private RandomState(seed) gives the same draws here without touching the global one (axolotl reseeds
    with the global step at each switch instead)."""

    def __init__(self, model: torch.nn.Module, n_layers: int, interval: int, seed: int):
        from ..layers import find_layout

        self.layers = find_layout(model).stack
        self.total_layers = len(self.layers)
        if not 1 <= n_layers <= self.total_layers:
            raise ValueError(f"n_layers {n_layers}: must be in 1..{self.total_layers}, the model's blocks")
        self.n_layers, self.interval = n_layers, interval
        self.rng = np.random.RandomState(seed)
        self.active_layers_indices: list[int] = []
        self.drawn: set[int] = set()  # every block drawn so far (its AdamW state stays)

    def on_step_begin(self, global_step: int) -> None:
        if global_step % self.interval != 0:
            return
        for layer in self.layers:
            for p in layer.parameters():
                p.requires_grad = False
        self.active_layers_indices = [int(i) for i in self.rng.choice(range(self.total_layers), self.n_layers,
                                                                      replace=False)]
        self.drawn.update(self.active_layers_indices)
        for i in self.active_layers_indices:
            for p in self.layers[i].parameters():
                p.requires_grad = True


def lisa_published(model, cfg) -> Setup:
    # the Trainer's optimizer is created (over every parameter: nothing is frozen yet) before the
    # callback's first switch at step 0
    opt = torch.optim.AdamW(list(model.parameters()), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    seed = cfg.get("run_seed", cfg["seed"])
    switch = PublishedLISASwitch(model, cfg["gamma"], cfg["switch_every"], seed)
    return Setup(model, opt, cfg["lr"],
                 f"LISA as published (LMFlow/axolotl/ms-swift callbacks, reimplemented to match their code): "
                 f"torch.optim.AdamW over every parameter, requires_grad flipped every {cfg['switch_every']} "
                 f"steps to {cfg['gamma']} blocks drawn by numpy RandomState({seed}).choice; lr={cfg['lr']:g}",
                 on_step_begin=switch.on_step_begin, switch_every=cfg["switch_every"])


def _decay_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def badam(model, cfg) -> Setup:
    badam_pkg = import_package("badam")
    base = torch.optim.AdamW(_decay_groups(model, cfg.get("weight_decay", 0.0)), lr=cfg["lr"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # BAdam warns (once per run, listing every parameter) that it expects a bf16/fp16 model; an fp32
        # model makes it keep an fp32 copy of the active block all the same (param.clone().float()).
        warnings.filterwarnings("ignore", message="BAdam expect model to be loaded in fp16/bf16")
        opt = badam_pkg.BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                                       block_prefix_list=None, **BADAM)

    def kept():  # AdamW's state of the active block and BAdam's fp32 masters of it
        return [*kept_bytes.state_tensors(opt.base_optimizer), *opt.param_idx2hp.values()]

    knobs = ", ".join(f"{k}={v!r}" for k, v in BADAM.items())
    return Setup(model, opt, cfg["lr"],
                 f"badam {getattr(badam_pkg, '__version__', '1.4')} BlockOptimizer({knobs}, block_prefix_list=None: "
                 f"one block at a time, embedding and head frozen) around torch.optim.AdamW lr={cfg['lr']:g}, as "
                 f"LlamaFactory builds it", kept=kept)


def galore(model, cfg) -> Setup:
    galore_torch = import_package("galore")
    from transformers.trainer_utils import check_target_module_exists

    targets = {f"{name}.weight" for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and check_target_module_exists(list(GALORE_TARGETS), name)}
    if not targets:
        raise ValueError(f"galore: no nn.Linear matches {GALORE_TARGETS} in {type(model).__name__}")
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n not in targets]},
              {"params": [p for n, p in named if n in targets], **GALORE}]
    # no_deprecation_warning: GaLoreAdamW descends from transformers' old AdamW and warns about it on every build
    opt = galore_torch.GaLoreAdamW(groups, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0),
                                   no_deprecation_warning=True)
    smallest = min(min(p.shape) for n, p in named if n in targets)
    note = (f" (rank >= the smallest target dimension {smallest}: no compression at this width)"
            if GALORE["rank"] >= smallest else "")
    knobs = ", ".join(f"{k}={v!r}" for k, v in GALORE.items())
    return Setup(model, opt, cfg["lr"],
                 f"galore-torch GaLoreAdamW({knobs}) on {len(targets)} nn.Linear weights matching "
                 f"{','.join(GALORE_TARGETS)}{note}, AdamW on the rest; lr={cfg['lr']:g}, as transformers builds "
                 f"optim='galore_adamw'")


def adamw_8bit(model, cfg) -> Setup:
    import_package("adamw-8bit")
    from torchao.optim import AdamW8bit

    opt = AdamW8bit(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    return Setup(model, opt, cfg["lr"], f"torchao.optim.AdamW8bit (block_size={opt.block_size}; tensors under 4096 "
                                        f"elements or not a multiple of the block keep fp32 state), every parameter, "
                                        f"lr={cfg['lr']:g}", backend="torchao (torch.compile)")


def adamw_8bit_bnb(model, cfg) -> Setup:
    bnb = import_package("adamw-8bit-bnb")
    device = next(model.parameters()).device
    probe = torch.nn.Parameter(torch.ones(4096, device=device))  # does this bitsandbytes' path run here?
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError) as exc:
        raise Unavailable("adamw-8bit-bnb", f"bitsandbytes {bnb.__version__} AdamW8bit does not run on "
                                            f"{device.type}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                          install_line("adamw-8bit-bnb")) from None
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    return Setup(model, opt, cfg["lr"], f"bitsandbytes {bnb.__version__} bnb.optim.AdamW8bit (block-wise, tensors "
                                        f"under 4096 elements keep 32-bit state), every parameter, lr={cfg['lr']:g}",
                 backend=f"bitsandbytes ({device.type})")


# Peers whose step cannot run under the CPU memory pass's allocation tracker (a TorchDispatchMode): their
# live-tensor peak is not measured (their RSS peak is)
UNTRACEABLE = {"adamw-8bit": "torchao's step is torch.compile(fullgraph=True), which does not run under the "
                             "allocation tracker's TorchDispatchMode"}
BUILDERS = {"lisa-published": lisa_published, "badam": badam, "galore": galore, "adamw-8bit": adamw_8bit,
            "adamw-8bit-bnb": adamw_8bit_bnb}
