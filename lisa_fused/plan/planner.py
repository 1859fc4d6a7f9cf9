"""One row per method and state setting: weights, trainable state, activations, peak; what fits.

Where each number comes from:
- weights: the model's parameter storages in the chosen dtype (LoRA: plus its adapters); FusedLISA keeps
  params and grads where they are, so its weights are the model's, as for the other methods.
- state, full and LoRA: `torch.optim.AdamW` (foreach on CUDA, as torch picks by default) run for real
  on fake parameters with fake grads in the traced step below: its exp_avg/exp_avg_sq/step tensors as
  created by torch, plus the grads of trained parameters, on 1- and 2-block copies extrapolated (a sum
  over parameters, every block's alike: exact; tests/test_plan.py compares a full-depth meta model).
- state, LISA: `FusedLISA(model_on_meta, **kwargs).memory_stats()["device_bytes"]` (masters, moments,
  scales, compensation) after every block has been active and has left once (a round-robin sampler and
  `_switch()` on meta tensors, so the host store and a "device" policy's resident moments reach their
  steady size), plus the grads of the params trained in one interval (always-trained + gamma blocks, in
  the param dtype), as for full and LoRA; host bytes from the same call.
- activations (and temporaries) of one step: `trace.trace_events` on fake 1- and 2-block copies of the
  model (same widths and vocabulary) with the method's trainable set: forward with logits and loss,
  backward, and the torch optimizer's step, peak per event (each block's forward and backward, head,
  embedding backward, step). Every event's peak is affine in the number of blocks, so
  `trace.extrapolate` gives the full depth; tests/test_plan.py checks it equals a full-depth trace.
  LISA: frozen blocks under `gamma` active ones (the worst place for them), from 2- and 3-block copies.
- largest batch: activations scaled linearly in batch from the traced batch (weights and state do not
  depend on it). Largest gamma (LISA): FusedLISA's bytes, affine in gamma below n, interpolated from two
  real builds; the activations extrapolated as above for each gamma.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..layers import find_layout
from . import badam
from .models import meta_model
from .trace import extrapolate, fakeify, peak_role, roles, trace_events

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
    # the embedding and head keep fp32 moments (what torchao ends up doing where their sizes are not a
    # multiple of its block): FusedLISA param groups by name; a model without these names skips the row
    dict(inactive_moments="host", moments="4bit", master_weights="stochastic",
         param_groups=[{"params": ["*embed_tokens", "lm_head"], "moments": "fp32"}]),
)


def describe_setting(kwargs: dict) -> str:
    """The row's label: FusedLISA keywords, param groups as [patterns: their options]."""
    def value(k, v):
        if k != "param_groups":
            return f"{k}={v}"
        groups = []
        for g in v:
            params = g["params"] if isinstance(g["params"], (list, tuple)) else [g["params"]]
            opts = ", ".join(f"{a}={b}" for a, b in g.items() if a != "params")
            groups.append(f"{','.join(map(str, params))}: {opts}")
        return "param_groups=[" + "; ".join(groups) + "]"

    return ", ".join(value(k, v) for k, v in kwargs.items())


@dataclass
class Row:
    method: str                 # full | lora | lisa | badam
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
    peak_at: str = ""           # where in the step activations + temporaries peak (trace.peak_role)


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
    """Bytes of the parameters' storages, each storage once (tied weights share one)."""
    by_storage: dict[int, list] = {}
    for p in model.parameters():
        by_storage.setdefault(p.untyped_storage()._cdata, []).append(p)
    n = 0
    for ps in by_storage.values():
        nbytes = ps[0].untyped_storage().nbytes()
        if nbytes <= max(p.numel() * p.element_size() for p in ps):
            n += nbytes
    return n


def _round_robin(step: int):
    """A sampler whose window of n_active blocks moves by `step` blocks a draw. With step <=
    n - n_active, each switch sends `step` blocks not sent before out, so after ceil(n / step)
    switches every block has left once (the steady state of the host store)."""
    calls = [0]

    def sampler(n_layers, n_active, generator):
        i, calls[0] = calls[0], calls[0] + 1
        return [(i * step + j) % n_layers for j in range(n_active)]

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
        self._lisa_model = self._meta()  # the full-depth meta model, reused by _lisa_meta
        layout = find_layout(self._lisa_model)
        self.n_blocks, self.stack_path = layout.num_blocks, layout.stack_path
        if not 1 <= gamma <= self.n_blocks:
            raise ValueError(f"--gamma {gamma}: must be in 1..{self.n_blocks}, the model's number of blocks")
        self._act_cache: dict[int, int] = {}
        self._lisa_events: dict[tuple[int, int], dict] = {}
        self._stats_cache: dict[tuple, tuple] = {}

    # ------------------------------------------------------------------ building blocks
    def _meta(self, n_blocks: int | None = None):
        """The meta model; with `n_blocks`, a copy of the config cut to that many blocks (same widths)."""
        config = self.config
        if n_blocks is not None:
            config = copy.deepcopy(config)
            config.num_hidden_layers = n_blocks
            if getattr(config, "layer_types", None) is not None:  # per-block attention kinds (gemma-2, qwen2)
                config.layer_types = list(config.layer_types[:n_blocks])
        return meta_model(config, self.dtype, self.gradient_checkpointing)

    def _events(self, model, optimizer_fn=None) -> dict:
        """Per-role peaks (`trace.roles`) of a trace on a fake copy of a meta `model` (flags kept)."""
        return self._trace(model, model.get_submodule(self.stack_path), optimizer_fn)[0]

    def _trace(self, model, stack, optimizer_fn) -> tuple[dict, tuple[int, int, int]]:
        """Roles of one traced step of `model` (meta, made fake in place) and, from the same fake tensors,
        (optimizer state, grads, weights) bytes: a torch optimizer's state as its step created it, a grad
        like each trained param (FusedLISA, optimizer_fn None: no step is traced; its state comes from
        memory_stats, and its grads, autograd's, are created by the traced backward as for the others)."""
        with FakeTensorMode():
            fakeify(model, self.trace_device)
            opt = optimizer_fn(model) if optimizer_fn is not None else None
            events = trace_events(model, self.batch_size, self.seq_len, self.vocab_size, opt, layers=stack)
            state = 0 if opt is None else _bytes(t for st in opt.state.values() for t in st.values()
                                                 if torch.is_tensor(t))
            nbytes = (state, _bytes(p for p in model.parameters() if p.requires_grad), _bytes(model.parameters()))
        kinds = ["trainable" if any(p.requires_grad for p in b.parameters()) else "frozen" for b in stack]
        return roles(events, kinds), nbytes

    def _adamw(self, params):
        return torch.optim.AdamW(params, lr=1e-5, foreach=self.target == "cuda")

    def _lisa_meta(self, kwargs: dict, gamma: int):
        """(model, FusedLISA) on meta in steady state: every block has been active once."""
        from lisa_fused import FusedLISA

        if self._lisa_model is None:
            self._lisa_model = self._meta()
        model = self._lisa_model  # built once: FusedLISA.release() hands it back as it was
        step = max(1, min(gamma, self.n_blocks - gamma))
        with torch.device("meta"):
            try:
                opt = FusedLISA(model, n_active_layers=gamma, switch_every=1, sampler=_round_robin(step),
                                layers=self.stack_path, **kwargs)
            except Exception:
                self._lisa_model = None  # a refused setting may have left it half bound
                raise
            # Every block has been active and has left once (~10 ms a switch at 7B).
            for _ in range(math.ceil(self.n_blocks / step) if gamma < self.n_blocks else 0):
                opt._switch()
        return model, opt

    # ------------------------------------------------------------------ rows
    def _extrapolated(self, build, optimizer_fn) -> tuple[int, int, int, int, str]:
        """(traced peak, optimizer state, grads, weights) bytes of the full-depth model and where the
        peak is (trace.peak_role), from traced
        steps of `build(1)` and `build(2)` blocks (each `(model, stack)`): every event's peak is affine in
        the number of blocks (trace.extrapolate), and the byte counts are sums over parameters, each
        block's alike."""
        (one, b1), (two, b2) = (self._trace(*build(n), optimizer_fn) for n in (1, 2))
        deltas = [(two, self.n_blocks - 1)]
        return (extrapolate(one, deltas), *(x + (self.n_blocks - 1) * (y - x) for x, y in zip(b1, b2)),
                peak_role(one, deltas))

    def _blocks(self, n_blocks: int):
        model = self._meta(n_blocks)
        return model, model.get_submodule(self.stack_path)

    def full(self) -> Row:
        adamw = lambda m: self._adamw(list(m.parameters()))  # noqa: E731
        peak, state, grads, weights, where = self._extrapolated(self._blocks, adamw)
        # peak counts grads as they are created; state bytes = moments + grads at the step.
        row = self._row("full", "torch.optim.AdamW, all parameters", weights, state + grads, peak - grads, 0, {})
        row.peak_at = where
        return row

    def lora(self) -> Row:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank, lora_dropout=0.0,
                         target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")

        def build(n_blocks):
            model, stack = self._blocks(n_blocks)
            # On meta (peft's .to() cannot swap fakes), and the adapters are created there too: peft would
            # otherwise allocate and initialize them in host memory, then move them (~0.2 s at 8B).
            with warnings.catch_warnings(), torch.device("meta"):
                # peft calls a transformers property deprecated in v5
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                return get_peft_model(model, copy.deepcopy(cfg)), stack

        adamw = lambda m: self._adamw([p for p in m.parameters() if p.requires_grad])  # noqa: E731
        # From 1 and 2 blocks: peft takes ~6 s to wrap a 7B model, even on meta.
        peak, state, grads, weights, where = self._extrapolated(build, adamw)
        row = self._row("lora", f"peft r={self.lora_rank}, all 7 projections; AdamW", weights,
                        state + grads, peak - grads, 0, {})
        row.peak_at = where
        return row

    def badam(self) -> Row:
        """BAdam's row (plan/badam.py says how it is traced). ImportError when badam is not installed."""
        peak, kept, grads, weights, where = badam.plan_badam(self)
        row = self._row("badam", badam.SETTING, weights, kept + grads, peak - grads, 0, {})
        row.peak_at = where
        return row

    def _lisa_trace(self, n_frozen: int, n_active: int) -> dict:
        """Roles of a trace with `n_frozen` frozen blocks under `n_active` active ones, as FusedLISA
        leaves the flags (backward creates the active params' grads, counted while they live)."""
        from lisa_fused import FusedLISA

        key = (n_frozen, n_active)
        if key not in self._lisa_events:
            model = self._meta(n_frozen + n_active)
            with torch.device("meta"):
                FusedLISA(model, n_active_layers=n_active, layers=self.stack_path,
                          sampler=lambda n, k, generator: list(range(n - k, n)))
            self._lisa_events[key] = self._events(model)
        return self._lisa_events[key]

    def _lisa_deltas(self, gamma: int) -> tuple[dict, list]:
        """(base roles, deltas) for `trace.extrapolate` to `gamma` active blocks on top of the stack."""
        n_frozen = self.n_blocks - gamma
        if n_frozen == 0:
            return self._lisa_trace(0, 1), [(self._lisa_trace(0, 2), gamma - 1)]
        return self._lisa_trace(1, 1), [(self._lisa_trace(2, 1), n_frozen - 1), (self._lisa_trace(1, 2), gamma - 1)]

    def lisa_activations(self, gamma: int) -> int:
        """Traced peak of a step with `gamma` active blocks on top of the stack, the worst place for them
        (their weight-grad temporaries then meet every block's saved activations). Each block adds the
        same bytes as any other of its kind, so the peak of every role is affine in the number of frozen
        and active blocks: traced with (1, 1), (2, 1), (1, 2) blocks; with (0, 1), (0, 2) at gamma = n."""
        if gamma not in self._act_cache:
            self._act_cache[gamma] = extrapolate(*self._lisa_deltas(gamma))
        return self._act_cache[gamma]

    def _lisa_state(self, kwargs: dict, gamma: int) -> tuple[int, int, int, int]:
        """(weights, device, host, grads) bytes of FusedLISA(**kwargs) at `gamma` on the full-depth meta model:
        device = its memory_stats()["device_bytes"] + grads, the grads of one interval's trained params."""
        key = (repr(sorted(kwargs.items())), gamma)  # (param_groups is a list of dicts)
        if key not in self._stats_cache:
            model, opt = self._lisa_meta(kwargs, gamma)
            stats = opt.memory_stats()
            grads = sum(p.numel() * p.element_size() for p in opt._params if p.requires_grad)  # one interval's
            self._stats_cache[key] = (_own_weight_bytes(model), int(stats["device_bytes"]) + grads,
                                      int(stats["host_bytes"]), grads)
            opt.release()
        return self._stats_cache[key]

    def lisa(self, kwargs: dict) -> Row:
        weights, device, host, grads = self._lisa_state(kwargs, self.gamma)
        setting = describe_setting(kwargs)
        # the traced peak counts the grads as backward creates them; the state column holds them (as full's)
        row = self._row("lisa", f"gamma={self.gamma} {setting}", weights, device,
                        self.lisa_activations(self.gamma) - grads, host, dict(kwargs))
        row.peak_at = peak_role(*self._lisa_deltas(self.gamma))
        return row

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

    def _lisa_state_affine(self, kwargs: dict, gamma: int) -> tuple[int, ...]:
        """`_lisa_state` for the search of the largest gamma: in 1..n-1 each byte count is affine in gamma
        (gamma slots of packed state, n - gamma blocks paged or frozen; tests/test_plan.py checks every
        setting), so it is interpolated from two real builds: the row's own gamma (already built) and
        its neighbour. Exact at gamma = n (nothing pages: built)."""
        n = self.n_blocks
        if gamma == n or n < 3:
            return self._lisa_state(kwargs, gamma)
        lo = min(max(self.gamma, 1), n - 2)
        a, b = self._lisa_state(kwargs, lo), self._lisa_state(kwargs, lo + 1)
        return tuple(x + (gamma - lo) * (y - x) for x, y in zip(a, b))

    def _lisa_peak(self, kwargs, gamma) -> int:
        weights, device, host, grads = self._lisa_state_affine(kwargs, gamma)
        return self._row("lisa", "", weights, device, self.lisa_activations(gamma) - grads, host, {}).peak_bytes

    def _max_gamma(self, row: Row, gpu_mem: int) -> int:
        """Largest gamma whose peak fits; 0 when none. The peak grows with gamma, except at gamma = n
        blocks on a cpu target: nothing pages then, so the host store disappears from the peak. So n is
        checked only where it can fit: on a cpu target, or when n - 1 fits."""
        n = self.n_blocks
        lo, hi = 0, n - 1  # largest g in [1, n - 1] with peak <= gpu_mem
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._lisa_peak(row.kwargs, mid) <= gpu_mem:
                lo = mid
            else:
                hi = mid - 1
        if (lo == n - 1 or self.target == "cpu") and self._lisa_peak(row.kwargs, n) <= gpu_mem:
            return n
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
                    setting = describe_setting(kwargs)
                    skipped.append(Skipped("lisa", setting, str(exc).splitlines()[0]))
        elif method == "badam":
            try:
                rows.append(planner.badam())
            except ImportError as exc:
                skipped.append(Skipped("badam", badam.SETTING, f"{exc}; {badam.INSTALL}"))
        else:
            raise ValueError(f"unknown method {method!r}; choose from full, lora, lisa, badam")
    for row in rows:
        planner.fit(row, gpu_mem)
    return rows, skipped, planner


def as_dict(row) -> dict:
    return asdict(row)
