"""One training setup per benchmarked method. Each takes the loaded model and returns a `Setup`.

    full         torch.optim.AdamW over every parameter (torch's default implementation)
    lora         peft LoRA on every attention and MLP projection, torch.optim.AdamW over the adapters
    lora-fa      the same adapters with A frozen, peft's LoRA-FA optimizer (Zhang et al. 2023,
                 peft.optimizers.create_lorafa_optimizer: AdamW on B with projected gradients)
    lisa         FusedLISA, inactive_moments="host" (moments of inactive layers paged off the device)
    lisa-device  FusedLISA, inactive_moments="device" (the published behaviour: every moment stays)
    lisa-8bit    FusedLISA, "host", moments="8bit" (block-wise 8-bit moments; fp32 masters for bf16 models)
    lisa-4bit    FusedLISA, "host", moments="4bit" (block-wise 4-bit moments; fp32 masters for bf16 models)
    lisa-4bit-sr FusedLISA, "host", moments="4bit", master_weights="stochastic" (the leanest; --dtype
                 bfloat16 only). The lean methods run only when --methods names them.
    lisa-published, badam, galore, adamw-8bit, adamw-8bit-bnb: the peers (peers.py, `--methods peers`).

The FusedLISA methods take cfg["sampler"] (default "uniform"); `run_seed` (default `seed`) seeds what a
repeat with another seed changes: the LISA draws and the LoRA init (the data order and the base weights
stay those of `seed`, so every repeat sees the same data).
"""
from __future__ import annotations

import torch

from . import DEFAULT_METHODS, FUSED_LISA_METHODS, METHODS, PEER_PACKAGES, PEERS  # noqa: F401  (torch-free, for the CLI)
from . import peers
from .setups import Setup  # noqa: F401  (importable from here, as before)

# FusedLISA keywords of each LISA method (README, "Lean optimizer state"); keys = FUSED_LISA_METHODS
LISA_KWARGS = {"lisa": dict(inactive_moments="host"), "lisa-device": dict(inactive_moments="device"),
               "lisa-8bit": dict(inactive_moments="host", moments="8bit"),
               "lisa-4bit": dict(inactive_moments="host", moments="4bit"),
               "lisa-4bit-sr": dict(inactive_moments="host", moments="4bit", master_weights="stochastic")}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def import_libraries(method: str) -> None:
    """Import what `build(method, ...)` needs, so a memory baseline taken afterwards excludes imports."""
    if method.startswith("lora"):
        import peft  # noqa: F401
    elif method in LISA_KWARGS:
        fused_lisa_class()
    elif method in PEER_PACKAGES:
        try:
            peers.import_package(method)
        except peers.Unavailable:
            pass  # build() raises it again, and the bench reports the row as skipped


def lisa_backend(opt) -> str:
    """FusedLISA's backend, flagged when it is not the first choice of "auto" for the device."""
    from lisa_fused import kernels

    best = kernels._AUTO_ORDER.get(opt.device.type, ("torch",))[0]
    if opt.backend == best:
        return opt.backend
    return f"{opt.backend} FALLBACK ({kernels.backend_unavailable_reason(best, opt.device)})"


def fused_lisa_class():
    """The optimizer under test; imported late so that full/lora run even where it is missing."""
    from lisa_fused import FusedLISA

    return FusedLISA


def build(method: str, model: torch.nn.Module, cfg: dict) -> Setup:
    """cfg keys: lr, lora_lr, lora_rank, gamma, switch_every, seed, weight_decay; optional sampler, run_seed."""
    wd = cfg.get("weight_decay", 0.0)
    seed = cfg.get("run_seed", cfg["seed"])
    if method == "full":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=wd)
        return Setup(model, opt, cfg["lr"], f"torch.optim.AdamW, all parameters, lr={cfg['lr']:g}")
    if method in ("lora", "lora-fa"):
        from peft import LoraConfig, get_peft_model

        rank = cfg["lora_rank"]
        torch.manual_seed(seed)
        lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        adapters = f"peft LoRA r={rank} alpha={2 * rank} on {','.join(LORA_TARGETS)}"
        if method == "lora-fa":
            from peft.optimizers import create_lorafa_optimizer  # freezes every lora_A

            opt = create_lorafa_optimizer(model, r=rank, lora_alpha=2 * rank, lr=cfg["lora_lr"], weight_decay=wd)
            return Setup(model, opt, cfg["lora_lr"], f"{adapters}, A frozen; peft create_lorafa_optimizer "
                                                     f"lr={cfg['lora_lr']:g}")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lora_lr"], weight_decay=wd)
        return Setup(model, opt, cfg["lora_lr"], f"{adapters}; torch.optim.AdamW lr={cfg['lora_lr']:g}")
    if method in LISA_KWARGS:
        kwargs = LISA_KWARGS[method]
        sampler = cfg.get("sampler", "uniform")
        opt = fused_lisa_class()(model, lr=cfg["lr"], weight_decay=wd, n_active_layers=cfg["gamma"],
                                 switch_every=cfg["switch_every"], seed=seed, sampler=sampler, **kwargs)
        state = " ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return Setup(model, opt, cfg["lr"],
                     f"FusedLISA gamma={cfg['gamma']} K={cfg['switch_every']} {state} "
                     f"sampler={sampler!r} seed={seed} lr={cfg['lr']:g}", backend=lisa_backend(opt),
                     switch_every=cfg["switch_every"])
    if method in peers.BUILDERS:
        return peers.BUILDERS[method](model, cfg)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
