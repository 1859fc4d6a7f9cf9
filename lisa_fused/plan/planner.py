"""One row per method and state setting: weights, trainable state, activations, peak; what fits.

Where each number comes from:
- weights: the model's parameter storages in the chosen dtype (LoRA: plus its adapters). For LISA, the
  parameters FusedLISA binds into its packed buffers are counted there, in state, not twice.
- state, full and LoRA: `torch.optim.AdamW` (foreach on CUDA, as torch picks by default) run for real
  on fake parameters with fake grads: its exp_avg/exp_avg_sq/step tensors as created by torch, plus the
  grads of trained parameters.
- state, LISA: `FusedLISA(model_on_meta, **kwargs).memory_stats()["device_bytes"]` after every block
  has been active once (a round-robin sampler and `_switch()` on meta tensors, so the host store and a
  "device" policy's resident moments reach their steady size); host bytes from the same call.
- activations (and temporaries) of one step: the peak of `trace.trace_step` on a fake model with the
  method's trainable set: forward with logits and loss, backward, and the torch optimizer's step.
- largest batch: activations scaled linearly in batch from the traced batch (weights and state do not
  depend on it). Largest gamma (LISA): exact state from FusedLISA at each gamma; activations
  interpolated linearly between the traced gamma and a trace with every block trainable.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .models import meta_model
from .trace import fakeify, trace_step

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# FusedLISA keyword settings, one row each. Settings the installed FusedLISA rejects (a keyword it does
# not have yet, or a value it refuses for this dtype) are skipped with the reason. Extend freely.
LISA_SETTINGS: tuple[dict, ...] = (
    dict(inactive_moments="host"),
    dict(inactive_moments="device"),
    dict(inactive_moments="drop"),
    dict(inactive_moments="host", moments="bf16"),
    dict(inactive_moments="host", moments="8bit"),
    dict(inactive_moments="host", moments="8bit", master_weights="kahan"),
    dict(inactive_moments="host", moments="4bit", master_weights="stochastic"),
)


@dataclass
class Row:
    method: str                 # full | lora | lisa
    setting: str                # what distinguishes the row: rank, or the FusedLISA keywords
    weights_bytes: int
    state_bytes: int            # grads, moments, masters, scales on the device
    activation_bytes: int       # activations and temporaries at the step's peak (logits, loss included)
    host_bytes: int             # pinned host memory (LISA paging)
    peak_bytes: int
    fits: bool | None = None
    max_batch_size: int | None = None
    max_gamma: int | None = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class Skipped:
    method: str
    setting: str
    reason: str


def _bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def _own_weight_bytes(model) -> int:
    """Storages of parameters that are their own (not views into a larger packed buffer)."""
    by_storage: dict[int, list] = {}
    for p in model.parameters():
        by_storage.setdefault(p.untyped_storage()._cdata, []).append(p)
    n = 0
    for ps in by_storage.values():
        nbytes = ps[0].untyped_storage().nbytes()
        if nbytes <= max(p.numel() * p.element_size() for p in ps):
            n += nbytes
    return n


def _round_robin():
    calls = [0]

    def sampler(n_layers, n_active, generator):
        i, calls[0] = calls[0], calls[0] + 1
        return [(i * n_active + j) % n_layers for j in range(n_active)]

    return sampler


class Planner:
    """Plans for one model shape and step shape. `target`: "cuda" or "cpu", the device whose memory is
    predicted; traces run on fake tensors of that device type where torch has it, else on CPU."""

    def __init__(self, config, dtype: torch.dtype, batch_size: int, seq_len: int, *, target: str = "cuda",
                 gradient_checkpointing: bool = False, lora_rank: int = 128, gamma: int = 2):
        self.config, self.dtype = config, dtype
        self.batch_size, self.seq_len = batch_size, seq_len
        self.target = target
        self.trace_device = target if target == "cpu" or torch.cuda.is_available() else "cpu"
        self.gradient_checkpointing = gradient_checkpointing
        self.lora_rank, self.gamma = lora_rank, gamma
        self.vocab_size = int(config.vocab_size)
        self.n_blocks = self._lisa_meta({}, 1)[1].model_layout.num_blocks
        if not 1 <= gamma <= self.n_blocks:
            raise ValueError(f"--gamma {gamma}: must be in 1..{self.n_blocks}, the model's number of blocks")
        self._act_cache: dict[int, int] = {}

    # ------------------------------------------------------------------ building blocks
    def _meta(self):
        return meta_model(self.config, self.dtype, self.gradient_checkpointing)

    def _trace(self, model, optimizer_fn=None) -> int:
        """Trace on a fake copy of a meta `model` (its requires_grad flags kept)."""
        with FakeTensorMode():
            fakeify(model, self.trace_device)
            opt = optimizer_fn(model) if optimizer_fn is not None else None
            if opt is None:  # FusedLISA: grads live in its packed buffer, before the step
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.empty_like(p)
            peak = trace_step(model, self.batch_size, self.seq_len, self.vocab_size, opt)
            state = 0 if opt is None else _bytes(t for st in opt.state.values() for t in st.values()
                                                 if torch.is_tensor(t))
            grads = _bytes(p for p in model.parameters() if p.requires_grad)  # a grad is like its param
        return peak, state, grads

    def _adamw(self, params):
        return torch.optim.AdamW(params, lr=1e-5, foreach=self.target == "cuda")

    def _lisa_meta(self, kwargs: dict, gamma: int):
        """(model, FusedLISA) on meta in steady state: every block has been active once."""
        from lisa_fused import FusedLISA

        model = self._meta()
        with torch.device("meta"):
            opt = FusedLISA(model, n_active_layers=gamma, switch_every=1, sampler=_round_robin(), **kwargs)
            # Round robin: after 2 * ceil(n / gamma) + 1 switches every block has been active and has left.
            for _ in range(2 * math.ceil(opt.model_layout.num_blocks / gamma) + 1):
                opt._switch()
        return model, opt

    # ------------------------------------------------------------------ rows
    def full(self) -> Row:
        model = self._meta()
        peak, state, grads = self._trace(model, lambda m: self._adamw([p for p in m.parameters()]))
        weights = _bytes(model.parameters())
        # peak counts grads as they are created; state bytes = moments + grads at the step.
        return self._row("full", "torch.optim.AdamW, all parameters", weights, state + grads, peak - grads, 0,
                         {})

    def lora(self) -> Row:
        from peft import LoraConfig, get_peft_model

        model = self._meta()
        cfg = LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank, lora_dropout=0.0,
                         target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, cfg)  # on meta: peft's own .to() cannot swap fake params
        with FakeTensorMode():
            fakeify(model, self.trace_device)
            opt = self._adamw([p for p in model.parameters() if p.requires_grad])
            peak = trace_step(model, self.batch_size, self.seq_len, self.vocab_size, opt)
            state = _bytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
            grads = _bytes(p for p in model.parameters() if p.requires_grad)  # a grad is like its param
            weights = _bytes(model.parameters())
        return self._row("lora", f"peft r={self.lora_rank}, all 7 projections; AdamW", weights,
                         state + grads, peak - grads, 0, {})

    def lisa_activations(self, gamma: int) -> int:
        if gamma not in self._act_cache:
            model, _ = self._lisa_meta({}, gamma)
            self._act_cache[gamma] = self._trace(model)[0]
        return self._act_cache[gamma]

    def lisa(self, kwargs: dict) -> Row:
        model, opt = self._lisa_meta(kwargs, self.gamma)
        stats = opt.memory_stats()
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        return self._row("lisa", f"gamma={self.gamma} {setting}", _own_weight_bytes(model),
                         int(stats["device_bytes"]), self.lisa_activations(self.gamma), int(stats["host_bytes"]),
                         dict(kwargs))

    def _row(self, method, setting, weights, state, act, host, kwargs) -> Row:
        # On a CPU the "host" store is the same memory as everything else.
        peak = weights + state + act + (host if self.target == "cpu" else 0)
        return Row(method, setting, weights, state, act, host, peak, kwargs=kwargs)

    # ------------------------------------------------------------------ what fits
    def fit(self, row: Row, gpu_mem: int | None) -> Row:
        """Fill fits, max_batch_size and (LISA) max_gamma for `gpu_mem` bytes; None when no limit."""
        if gpu_mem is None:
            return row
        row.fits = row.peak_bytes <= gpu_mem
        per_sample = row.activation_bytes / self.batch_size
        room = gpu_mem - (row.peak_bytes - row.activation_bytes)
        row.max_batch_size = max(0, int(room // per_sample)) if per_sample > 0 else None
        if row.method == "lisa":
            row.max_gamma = self._max_gamma(row, gpu_mem)
        return row

    def _lisa_peak(self, kwargs, gamma) -> int:
        model, opt = self._lisa_meta(kwargs, gamma)
        g0, act0 = self.gamma, self.lisa_activations(self.gamma)
        if gamma == g0:
            act = act0
        else:
            top = self.n_blocks
            act_top = self.lisa_activations(top)
            act = act0 + (act_top - act0) * (gamma - g0) / max(1, top - g0)
        stats = opt.memory_stats()
        return self._row("lisa", "", _own_weight_bytes(model), int(stats["device_bytes"]), int(act),
                         int(stats["host_bytes"]), {}).peak_bytes

    def _max_gamma(self, row: Row, gpu_mem: int) -> int:
        """Largest gamma whose peak fits; 0 when none. The peak grows with gamma, except at gamma = n
        blocks on a cpu target: nothing pages then, so the host store disappears from the peak."""
        if self._lisa_peak(row.kwargs, self.n_blocks) <= gpu_mem:
            return self.n_blocks
        lo, hi = 0, self.n_blocks - 1  # largest g in [1, n - 1] with peak <= gpu_mem
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._lisa_peak(row.kwargs, mid) <= gpu_mem:
                lo = mid
            else:
                hi = mid - 1
        return lo


def plan(config, *, dtype=torch.bfloat16, batch_size=1, seq_len=1024, target="cuda", gradient_checkpointing=False,
         methods=("full", "lora", "lisa"), lora_rank=128, gamma=2, gpu_mem=None,
         lisa_settings=LISA_SETTINGS) -> tuple[list[Row], list[Skipped], Planner]:
    """Rows for `methods` (and every LISA setting the installed FusedLISA accepts) plus skipped settings."""
    planner = Planner(config, dtype, batch_size, seq_len, target=target,
                      gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank, gamma=gamma)
    rows, skipped = [], []
    for method in methods:
        if method == "full":
            rows.append(planner.full())
        elif method == "lora":
            rows.append(planner.lora())
        elif method == "lisa":
            for kwargs in lisa_settings:
                try:
                    rows.append(planner.lisa(copy.deepcopy(kwargs)))
                except (TypeError, ValueError, NotImplementedError) as exc:
                    setting = ", ".join(f"{k}={v}" for k, v in kwargs.items())
                    skipped.append(Skipped("lisa", setting, str(exc).splitlines()[0]))
        else:
            raise ValueError(f"unknown method {method!r}; choose from full, lora, lisa")
    for row in rows:
        planner.fit(row, gpu_mem)
    return rows, skipped, planner


def as_dict(row) -> dict:
    return asdict(row)
