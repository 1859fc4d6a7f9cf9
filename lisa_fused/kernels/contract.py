"""The data contract every AdamW backend implements.

A launch updates S *segments*, one parameter tensor each. A segment's parameter and gradient stay where
the model and autograd put them: the launch gets, per segment, the tensors themselves (`params[s]`,
`grads[s]`, optionally `lowps[s]`, any shape, contiguous; the backends read their data pointers), and
an offset into the optimizer's own *packed state* buffers (moments, scales, Kahan compensation; the fp32
masters of bf16/fp16 models are packed state too, and are then the `params[s]` of the launch):

    Segments.bounds[s] = (offset, numel)   offset: element index into the packed state (the fp32 / bf16
                                           moments, the 4-bit codes at offset / 2, the scales at
                                           offset / BLOCK); numel: the parameter's elements
    params[s]    the tensor the update reads and writes as `p`: an fp32 param itself or its fp32 master
                 (master_weights="fp32"), or the model's bf16/fp16 param ("kahan", "stochastic")
    grads[s]     its gradient (fp32, bf16 or fp16; one dtype per launch), or None for a segment that is
                 disabled in this launch (COL_ENABLED 0)
    lowps[s]     optional (master_weights="fp32" only): the model's bf16/fp16 param, written as
                 round_to_nearest_even(p) after the update

The native backends turn the lists into an int64 pointer table [S, N_SEG_COLS] on the device
(_tables.pointer_table: SEG_OFFSET, SEG_NUMEL, SEG_PARAM, SEG_GRAD, SEG_LOWP; addresses as integers, 0 for
an absent tensor), the way torch's fused AdamW and apex's multi_tensor_apply address tensor lists, but one
launch for every segment. Params and grads may sit at any address (a slice of a flat buffer, an FSDP2
shard, a DDP bucket view): the backends take vector loads only where a segment's addresses are 16-byte
aligned and a masked loop elsewhere. A non-contiguous tensor is updated through a contiguous copy by
kernels.adamw_segments_ (the slow path, correct for every backend).

Per step the optimizer hands over a host table `hparams`, float64, one row per segment, of shape
[S, N_COLS] (fp32 state, master weights "fp32") or [S, N_COLS_LEAN] (required whenever stochastic
rounding is used: master_weights="stochastic" or moments="bf16"):

    COL_STEP_SIZE  lr / (1 - beta1**step)                   (bias-corrected step size)
    COL_DECAY      1 - lr * weight_decay                    (decoupled weight decay factor)
    COL_BC2_SQRT   sqrt(1 - beta2**step)
    COL_ENABLED    1.0 to update this segment, 0.0 to leave param, moments, scales, compensation and
                   grad_sumsq untouched
    COL_PARAM_ID   integer id of the parameter (stable across switches and resumes; the optimizer's
                   param index), 0 <= id < 2**24 (exact in the fp32 device table)
    COL_STEP       integer step count of this segment (the `step` of the bias corrections), 0 <= step
                   < 2**24; with COL_PARAM_ID and the launch's `seed` it keys the stochastic rounding

The scalars are computed on the host in double, so every backend starts from the same rounded fp32
values that torch's AdamW feeds its kernels. Element math, in fp32 whatever the storage dtype:

    g  = grad / grad_scale            (grad_scale: optional 1-element fp32 tensor on the device)
    grad_sumsq[s] += g * g            (optional fp32 [S] device tensor; summed over the segment)
    p  = load_param()                 (see master weights)
    m, v = load_moments()             (see moment formats)
    p  = p * decay
    m  = m + (1 - beta1) * (g - m)     (torch's lerp for weight < 0.5)
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - step_size * (m / (sqrt(v) / bc2_sqrt + eps))
    store_moments(m, v); store_param(p)

Roundings, as torch's own CPU kernels do them (reference.py calls those kernels): the m and v updates
are one fused multiply-add each where the CPU has FMA (torch's AVX2/AVX-512 kernels; every GPU), two
roundings otherwise; p is updated as p + ((-step_size * m) / denom). The native kernels do the same and
take a correctly rounded sqrt, where torch's CPU sqrt is off by one ulp on some inputs: with that one
exception they match the reference bit for bit (tests/test_kernels.py, tests/test_lean_kernels.py).

Moment formats (`moments=`, the same for exp_avg and exp_avg_sq; formats and maps in quant.py), over the
packed state index space of N elements:
    "fp32"  exp_avg, exp_avg_sq: float32 [N]. Today's exact AdamW (the default).
    "bf16"  bfloat16 [N], stored with stochastic rounding (lanes 1 and 2 of quant.sr_bits). Round to
            nearest stalls v: with beta2 = 0.999 an update (1 - beta2) * g^2 below half a bf16 ulp of v
            is lost every step, so v cannot decay after the gradient scale drops; SR keeps it unbiased.
    "8bit"  uint8 codes [N] + fp32 scales [ceil(N / 256)] per moment (exp_avg_scale, exp_avg_sq_scale):
            block-wise dynamic quantization, Dettmers et al. 2022 (bnb >= 0.44 / torchao block 256).
    "4bit"  uint8 [ceil(N / 2)] (two codes per byte) + fp32 scales [ceil(N / 128)]: Li et al. 2023
            (block 128; signed dynamic map for m, linear map without zero for v, as torchao / lpmm).
    Quantized moments are dequantized (map[code] * scale) on load and requantized on store from the new
    block absmax; each kernel handles whole blocks, so a block's scale is the max over its segment
    elements. The sign fix of bnb's kernel and its NaN policy are not used (torchao does neither):
    a NaN or inf gradient in a quantized block leaves that block's codes and scale unspecified.

Master weights (`master_weights=`):
    "fp32"        params[s]: float32 (the fp32 param itself, or the packed fp32 master of a bf16/fp16
                  param); optional lowps[s] (bf16/fp16) gets round_to_nearest_even(p).
    "kahan"       params[s]: the bf16 or fp16 param (no fp32 master), compensation: same dtype [N] packed
                  state. The fp32 value is p + c (optimi's Kahan-compensated update): load
                  p = f32(param) + f32(comp); store param = rne(p), comp = rne(p - f32(param)). No lowps.
    "stochastic"  params[s]: the bf16 param (no master, no compensation): param = SR(p) with lane 0 of
                  quant.sr_bits. No lowps.

Stochastic rounding bits (quant.sr_bits, csrc/adamw_math.h sr_bits, the Triton kernel: one definition):
the 32-bit word mix32(key + index * 0x9E3779B9), key = quant.segment_key(seed, COL_PARAM_ID, COL_STEP,
lane), index = element index within the parameter (< 2**32); SR adds its top 16 bits to the fp32
pattern and truncates to bf16. Same seed, param id, step and index give the same bits on every backend
and in a resumed run.

Exactness across backends (tests/test_lean_kernels.py): every lean mode of the C++ (AVX2+FMA copy),
CUDA and Triton kernels equals the reference bit for bit (params, codes, scales, compensation, bf16
moments) given a correctly rounded sqrt; the reference's one deviation is torch's CPU sqrt (1 ulp on
some inputs), which can move a code by one. The C++ baseline copy (no FMA) rounds lerp/addcmul twice,
as torch does on such CPUs. Buffers are never read or written past a segment's end, except the 4-bit
state byte holding an odd segment's last element, whose high nibble is written as 0.

grad_sumsq (issue 13): fp32 [S] on the buffers' device; each enabled segment's sum of g*g is ADDED
(the caller zeroes it when it starts a window). Summation order is backend specific: the CPU kernel
sums each block in 8 interleaved lanes and adds block and chunk partials in order (deterministic); the GPU
kernels add per-block partials with atomics. Compare with a relative tolerance (~1e-5), not bitwise.

The packed form (`kernels.adamw_packed_`: one flat param and grad buffer, segments at their offsets) is
the special case params[s] = param[offset:offset + numel]; the kernel tests use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

COL_STEP_SIZE, COL_DECAY, COL_BC2_SQRT, COL_ENABLED, COL_PARAM_ID, COL_STEP = range(6)
N_COLS = 4  # the columns every table has
N_COLS_LEAN = 6  # with COL_PARAM_ID and COL_STEP (needed for stochastic rounding)
# Columns of the int64 pointer table the native backends read (_tables.pointer_table), one row per segment.
SEG_OFFSET, SEG_NUMEL, SEG_PARAM, SEG_GRAD, SEG_LOWP = range(5)
N_SEG_COLS = 5

# Segment offsets in the packed state are multiples of this many elements: 16-byte vector loads work for
# fp32 (4 elements) and bf16 (8), and 256 is a multiple of every quantization block (BLOCK: 256
# for 8-bit, 128 for 4-bit), so no block of codes holds two parameters.
ALIGN = 256

# The state formats (quant.py defines their maps and (de)quantizers and re-exports these): here so the
# checks below need no import of quant, which imports _tables, which imports this module.
FORMATS = ("fp32", "bf16", "8bit", "4bit")
MASTER_WEIGHTS = ("fp32", "kahan", "stochastic")
BLOCK = {"8bit": 256, "4bit": 128}  # elements per fp32 scale


def n_blocks(numel: int, fmt: str) -> int:
    """Scale entries a packed buffer of `numel` elements needs in format `fmt` (0 when not quantized)."""
    return -(-numel // BLOCK[fmt]) if fmt in BLOCK else 0


def codes_numel(numel: int, fmt: str) -> int:
    """uint8 entries of a quantized moment buffer: numel (8-bit) or ceil(numel / 2) (4-bit)."""
    return numel if fmt == "8bit" else -(-numel // 2)


@dataclass
class Segments:
    """Host-side segment layout: where each parameter's state lives in the packed state buffers.

    `bounds` is a list of (offset, numel) pairs. Backends may cache device-side tables (chunk lists) in
    `cache`, keyed by whatever they need; the optimizer builds a new Segments whenever the layout
    changes, so a cache never goes stale.
    """

    bounds: list[tuple[int, int]]
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for off, n in self.bounds:
            if off < 0 or n < 0:
                raise ValueError(f"invalid segment (offset={off}, numel={n})")

    def __len__(self) -> int:
        return len(self.bounds)

    def tensor(self) -> torch.Tensor:
        """int64 [S, 2] host tensor of (offset, numel)."""
        if "bounds_cpu" not in self.cache:
            self.cache["bounds_cpu"] = torch.tensor(self.bounds, dtype=torch.int64).reshape(-1, 2)
        return self.cache["bounds_cpu"]


def host_scalars(beta1: float, beta2: float, eps: float) -> tuple[float, float, float, float]:
    """(1-beta1, beta2, 1-beta2, eps): computed in double on the host, then handed to kernels."""
    return 1.0 - beta1, beta2, 1.0 - beta2, eps


def _check_mode(moments: str, master_weights: str) -> None:
    if moments not in FORMATS:
        raise ValueError(f"Invalid moments format {moments!r}; choose one of {FORMATS}")
    if master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights {master_weights!r}; choose one of {MASTER_WEIGHTS}")


def _param_dtypes(master_weights: str) -> tuple[torch.dtype, ...]:
    return {"fp32": (torch.float32,), "kahan": (torch.bfloat16, torch.float16),
            "stochastic": (torch.bfloat16,)}[master_weights]


def _check_grad_scale(grad_scale, dev) -> None:
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.device != dev
                                   or grad_scale.dtype != torch.float32):
        raise ValueError(f"grad_scale must be a 1-element float32 tensor on {dev}, "
                         f"got {grad_scale.dtype} {tuple(grad_scale.shape)} on {grad_scale.device}")


def _check_state(n: int, dev, param_dtype, exp_avg, exp_avg_sq, segments: Segments, hparams, *, moments: str,
                 master_weights: str, exp_avg_scale, exp_avg_sq_scale, compensation, seed: int, grad_sumsq,
                 lean: bool) -> None:
    """The packed state of `n` elements on `dev` (moments, scales, compensation), the hparams table and the
    segment bounds; `lean`: the lean formats' rules (ALIGN offsets, 32-bit element indices)."""
    if (hparams.device.type != "cpu" or hparams.dtype != torch.float64 or hparams.dim() != 2
            or hparams.shape[0] != len(segments) or hparams.shape[1] not in (N_COLS, N_COLS_LEAN)):
        raise ValueError(f"hparams must be a float64 CPU tensor of shape ({len(segments)}, {N_COLS} or "
                         f"{N_COLS_LEAN}), got {hparams.dtype} {tuple(hparams.shape)} on {hparams.device}")

    def need(name, t, dtype, numel):
        if t is None:
            raise ValueError(f"{name} is required (a {dtype} [{numel}] tensor on {dev})")
        if t.device != dev or t.dtype != dtype or t.dim() != 1 or t.numel() != numel or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} [{numel}] tensor on {dev}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")

    def forbid(name, t, why):
        if t is not None:
            raise ValueError(f"{name} must be None {why}")

    if master_weights == "kahan":
        need("compensation", compensation, param_dtype, n)
    else:
        forbid("compensation", compensation, f"with master_weights={master_weights!r}")
    if moments in BLOCK:
        for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            need(name, t, torch.uint8, codes_numel(n, moments))
        for name, t in (("exp_avg_scale", exp_avg_scale), ("exp_avg_sq_scale", exp_avg_sq_scale)):
            need(name, t, torch.float32, n_blocks(n, moments))
    else:
        dtype = torch.float32 if moments == "fp32" else torch.bfloat16
        need("exp_avg", exp_avg, dtype, n)
        need("exp_avg_sq", exp_avg_sq, dtype, n)
        forbid("exp_avg_scale", exp_avg_scale, f"with moments={moments!r} (no scales)")
        forbid("exp_avg_sq_scale", exp_avg_sq_scale, f"with moments={moments!r} (no scales)")
    if grad_sumsq is not None:
        need("grad_sumsq", grad_sumsq, torch.float32, len(segments))
    for off, cnt in segments.bounds:
        if off + cnt > n:
            raise ValueError(f"segment (offset={off}, numel={cnt}) runs past the buffer end ({n})")
        if lean and off % ALIGN:
            raise ValueError(f"segment offset {off} is not a multiple of ALIGN={ALIGN} (lean formats need it)")
        if lean and cnt >= 1 << 32:
            raise ValueError(f"segment of {cnt} elements: lean formats index elements with 32 bits")
    if uses_sr(moments, master_weights):
        if not 0 <= int(seed) < 1 << 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if hparams.dim() != 2 or hparams.shape[1] < N_COLS_LEAN:
            raise ValueError(f"stochastic rounding (moments={moments!r}, master_weights={master_weights!r}) "
                             f"needs hparams with {N_COLS_LEAN} columns (COL_PARAM_ID, COL_STEP), "
                             f"got shape {tuple(hparams.shape)}")
        ids = hparams[:, COL_PARAM_ID:COL_STEP + 1]
        bad = (ids != ids.floor()) | (ids < 0) | (ids >= 1 << 24)
        if bool(bad.any()):
            raise ValueError("hparams COL_PARAM_ID / COL_STEP must be integers in [0, 2**24), got "
                             f"{ids[bad.any(dim=1)][:3].tolist()}")


def check_lean(param, exp_avg, exp_avg_sq, segments: Segments, hparams, *, moments: str, master_weights: str,
               exp_avg_scale=None, exp_avg_sq_scale=None, compensation=None, param_lowp=None, seed: int = 0,
               grad_sumsq=None, grad=None, grad_scale=None) -> None:
    """Validate every buffer of a packed lean-state call (kernels.check_buffers does it for the fp32
    defaults): formats, dtypes, shapes, devices, the SR columns. Raises ValueError naming the bad value and
    the fix before any kernel sees a pointer."""
    _check_mode(moments, master_weights)
    n, dev = param.numel(), param.device
    want_param = _param_dtypes(master_weights)
    if param.dtype not in want_param:
        raise ValueError(f"master_weights={master_weights!r} needs param of dtype {want_param}, got {param.dtype}")
    if master_weights != "fp32" and param_lowp is not None:
        raise ValueError(f"master_weights={master_weights!r} updates param in place; pass param_lowp=None")
    if param.dim() != 1 or not param.is_contiguous():
        raise ValueError(f"param must be a contiguous 1-D tensor, got shape {tuple(param.shape)}")
    if grad is not None:
        if grad.dtype not in GRAD_DTYPES:
            raise ValueError(f"grad must be float32, bfloat16 or float16, got {grad.dtype}")
        if grad.device != dev or grad.dim() != 1 or grad.numel() != n or not grad.is_contiguous():
            raise ValueError(f"grad must be a contiguous 1-D tensor of {n} elements on {dev}, "
                             f"got {tuple(grad.shape)} on {grad.device}")
    if param_lowp is not None and (param_lowp.dtype not in LOWP_DTYPES or param_lowp.device != dev
                                   or param_lowp.shape != param.shape or not param_lowp.is_contiguous()):
        raise ValueError(f"param_lowp must be a contiguous bfloat16/float16 [{n}] tensor on {dev}, "
                         f"got {param_lowp.dtype} {tuple(param_lowp.shape)} on {param_lowp.device}")
    _check_grad_scale(grad_scale, dev)
    _check_state(n, dev, param.dtype, exp_avg, exp_avg_sq, segments, hparams, moments=moments,
                 master_weights=master_weights, exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale,
                 compensation=compensation, seed=seed, grad_sumsq=grad_sumsq, lean=True)


GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOWP_DTYPES = (torch.bfloat16, torch.float16)


def state_numel(exp_avg: torch.Tensor, moments: str) -> int:
    """Elements N of the packed state index space that buffers in format `moments` cover (4-bit: 2 codes
    per byte)."""
    return 2 * exp_avg.numel() if moments == "4bit" else exp_avg.numel()


def check_segments(params, grads, lowps, exp_avg, exp_avg_sq, segments: Segments, hparams, *, moments: str,
                   master_weights: str, exp_avg_scale=None, exp_avg_sq_scale=None, compensation=None, seed: int = 0,
                   grad_sumsq=None, grad_scale=None) -> None:
    """Validate a segment-list call (kernels.adamw_segments_) before any kernel sees a pointer: one entry
    per segment in `params`, `grads` (None only where the segment is disabled) and `lowps` (None, or one
    per segment), each of the segment's numel, on the state's device, one dtype per list; then the packed
    state as _check_state. Non-contiguous tensors are accepted (adamw_segments_ takes the slow path).
    Raises ValueError naming the segment and the bad value."""
    _check_mode(moments, master_weights)
    s_count = len(segments)
    dev = exp_avg.device
    for name, lst in (("params", params), ("grads", grads)) + ((("lowps", lowps),) if lowps is not None else ()):
        if len(lst) != s_count:
            raise ValueError(f"{name} has {len(lst)} entries for {s_count} segments: pass one per segment")
    if lowps is not None and master_weights != "fp32":
        raise ValueError(f"master_weights={master_weights!r} updates the params in place; pass lowps=None")
    enabled = hparams[:, COL_ENABLED].tolist() if hparams.dim() == 2 and hparams.shape[0] == s_count else None
    want_param = _param_dtypes(master_weights)
    kinds = {"params": set(), "grads": set(), "lowps": set()}
    for s, (off, n) in enumerate(segments.bounds):
        p, g = params[s], grads[s]
        for name, t, allowed in (("params", p, want_param), ("grads", g, GRAD_DTYPES),
                                 ("lowps", None if lowps is None else lowps[s], LOWP_DTYPES)):
            if t is None:
                if name == "params" or (name == "grads" and enabled is not None and enabled[s]):
                    raise ValueError(f"{name}[{s}] is None but segment {s} is enabled (COL_ENABLED 1): pass its "
                                     "tensor, or disable the segment")
                continue
            if t.dtype not in allowed:
                raise ValueError(f"{name}[{s}] is {t.dtype}; {name} must be one of {allowed}"
                                 + (f" with master_weights={master_weights!r}" if name == "params" else ""))
            if t.device != dev:
                raise ValueError(f"{name}[{s}] is on {t.device}, the packed state on {dev}: move it to {dev}")
            if t.numel() != n:
                raise ValueError(f"{name}[{s}] has {t.numel()} elements, segment {s} has {n}")
            kinds[name].add(t.dtype)
    for name, dtypes in kinds.items():
        if len(dtypes) > 1:
            raise ValueError(f"{name} mix dtypes {sorted(map(str, dtypes))}: one launch takes one dtype per list; "
                             "convert them, or launch each dtype separately")
    _check_grad_scale(grad_scale, dev)
    param_dtype = next(iter(kinds["params"]), want_param[0])
    lean = moments != "fp32" or master_weights != "fp32" or grad_sumsq is not None
    _check_state(state_numel(exp_avg, moments), dev, param_dtype, exp_avg, exp_avg_sq, segments, hparams,
                 moments=moments, master_weights=master_weights, exp_avg_scale=exp_avg_scale,
                 exp_avg_sq_scale=exp_avg_sq_scale, compensation=compensation, seed=seed, grad_sumsq=grad_sumsq,
                 lean=lean)


def uses_sr(moments: str, master_weights: str) -> bool:
    """True when this mode draws stochastic-rounding bits (needs seed and the N_COLS_LEAN table)."""
    return moments == "bf16" or master_weights == "stochastic"
