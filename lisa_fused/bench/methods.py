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

The FusedLISA methods take cfg["sampler"] (default "uniform"); `run_seed` (default `seed`) seeds what a
repeat with another seed changes: the LISA draws and the LoRA init (the data order and the base weights
stay those of `seed`, so every repeat sees the same data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import DEFAULT_METHODS, METHODS  # noqa: F401  (defined torch-free for the CLI's parser)

# FusedLISA keywords of each LISA method (README, "Lean optimizer state")
LISA_KWARGS = {"lisa": dict(inactive_moments="host"), "lisa-device": dict(inactive_moments="device"),
               "lisa-8bit": dict(inactive_moments="host", moments="8bit"),
               "lisa-4bit": dict(inactive_moments="host", moments="4bit"),
               "lisa-4bit-sr": dict(inactive_moments="host", moments="4bit", master_weights="stochastic")}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Setup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    describe: str                       # one line for the report: what exactly this method runs
    backend: str = "torch"              # the kernel that ran; "<name> FALLBACK (<why>)" when not the best one

    def trainable_params(self) -> int:
        """Parameters trained at one time (for LISA: gamma blocks plus the always-trained ones)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def optimizer_bytes(self) -> tuple[int, int]:
        """(bytes on the model's device, bytes on the host) the optimizer holds right now.

        FusedLISA reports its own memory_stats() (packed masters, grads, moments; paged-out state).
        For torch.optim.AdamW this is the same sum: its state tensors plus the .grad of trained params.
        """
        opt = self.optimizer
        if hasattr(opt, "memory_stats"):
            stats = opt.memory_stats()
            return int(stats["device_bytes"]), int(stats["host_bytes"])
        n = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t))
        n += sum(p.grad.numel() * p.grad.element_size() for g in opt.param_groups for p in g["params"]
                 if p.grad is not None)
        return n, 0


def import_libraries(method: str) -> None:
    """Import what `build(method, ...)` needs, so a memory baseline taken afterwards excludes imports."""
    if method.startswith("lora"):
        import peft  # noqa: F401
    elif method.startswith("lisa"):
        fused_lisa_class()


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
                     f"sampler={sampler!r} seed={seed} lr={cfg['lr']:g}", backend=lisa_backend(opt))
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
