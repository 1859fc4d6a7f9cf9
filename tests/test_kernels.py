"""Every packed-AdamW backend against the reference and against torch.optim.AdamW.

Trajectories over several steps on fresh random grads: params, exp_avg and exp_avg_sq (and the bf16/fp16
copy) compared with a per-dtype tolerance; segments with their own step counts, lr and weight decay; a
disabled segment that must stay bitwise untouched. The Triton kernel runs in the interpreter on CPU
(conftest sets TRITON_INTERPRET=1 where there is no GPU), the C++ kernel runs for real, the CUDA kernel
only where a GPU is present.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from lisa_fused import kernels
from lisa_fused.kernels import ALIGN, Segments, adamw_packed_, backend_unavailable_reason
from lisa_fused.kernels import native

# Where the device-generic backends (torch, triton) run: as conftest.py's `device` fixture decides, but
# needed at collection time for the marks.
TEST_DEVICE = os.environ.get("LISA_FUSED_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
BETAS = (0.9, 0.999)
EPS = 1e-8


def backend_device(backend: str) -> torch.device:
    return torch.device({"cpu": "cpu", "cuda": "cuda"}.get(backend, TEST_DEVICE))


def backend_param(backend: str):
    """pytest param for `backend`: gpu-marked for cuda, skipped (with the reason) where it cannot run."""
    marks = [pytest.mark.gpu] if backend == "cuda" or backend_device(backend).type == "cuda" else []
    if not marks or torch.cuda.is_available():  # on a GPU: e.g. a driver too old for the static runtime
        reason = backend_unavailable_reason(backend, backend_device(backend))
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(backend, marks=marks, id=backend)


FUSED = [backend_param(b) for b in ("cpu", "triton", "cuda")]
ALL = [backend_param("torch")] + FUSED

# (grad dtype, param_lowp dtype, grad_scale): fp32 params, bf16 grads with fp32 masters and a bf16 copy,
# fp16 grads with an fp16 copy, and a loss scale.
MODES = {
    "fp32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "fp16": (torch.float16, torch.float16, None),
    "fp32-scaled": (torch.float32, None, 1024.0),
}
# Segment sizes of a packed buffer: the first one gives the case its name. 3 * 2^14 + 5: full blocks and
# a masked tail in one Triton program (interpreter BLOCK 2^14); 2^20 + 3: a chunk of full blocks only.
LAYOUTS = {"1": [1], "4097": [4097, 1, 300, 129], "2^20+3": [2**20 + 3, 4097, 63, 3 * 2**14 + 5]}
STEPS = 3


# ------------------------------------------------------------------------------ tolerances
def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-dtype float tensors (via monotonic int codes)."""
    int_dtype = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    def code(t):
        i = t.contiguous().view(int_dtype).long()
        sign_bit = 1 << (torch.finfo(t.dtype).bits - 1)
        return torch.where(i < 0, -(i + sign_bit), i)  # negative floats: flip to below zero
    return (code(a) - code(b)).abs()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str):
    """Per-dtype tolerance: fp32 to 1e-6 relative (of the tensor's scale), bf16/fp16 to one ulp."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype, what
    if actual.dtype == torch.float32:
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")
    else:
        worst = ulp_distance(actual, expected).max().item()
        assert worst <= 1, f"{what}: {worst} {actual.dtype} ulps apart (allowed: 1)"


# ------------------------------------------------------------------------------ problem setup
def pack(numels: list[int]) -> Segments:
    bounds, off = [], 0
    for n in numels:
        bounds.append((off, n))
        off += -(-n // ALIGN) * ALIGN
    return Segments(bounds)


def buffer_len(segments: Segments) -> int:
    off, n = segments.bounds[-1]
    return off + n


def segment_hparams(n_segments: int):
    """Per-segment (lr, weight_decay, first step); the second segment, when present, is disabled."""
    rows = [(1e-3 * (1 + s), (0.0, 0.1, 0.5)[s % 3], 1 + 5 * s) for s in range(n_segments)]
    disabled = {1} if n_segments > 1 else set()
    return rows, disabled


def hparams_table(rows, steps, disabled) -> torch.Tensor:
    """contract.py's [S, 4] float64 table, with torch.optim.AdamW's scalar formulas."""
    b1, b2 = BETAS
    table = []
    for s, ((lr, wd, _), step) in enumerate(zip(rows, steps)):
        table.append([lr / (1 - b1**step), 1 - lr * wd, math.sqrt(1 - b2**step), 0.0 if s in disabled else 1.0])
    return torch.tensor(table, dtype=torch.float64)


def random_state(n: int, lowp_dtype, gen: torch.Generator):
    p = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen) * 0.01
    v = torch.rand(n, generator=gen) * 1e-4
    lowp = None if lowp_dtype is None else p.to(lowp_dtype)
    return p, m, v, lowp


def random_grads(n: int, dtype, gen: torch.Generator):
    return (torch.randn(n, generator=gen) * 0.1).to(dtype)


def clone_to(t, device):
    return None if t is None else t.clone().to(device)


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", FUSED)
def test_matches_reference(backend, layout, mode):
    device = backend_device(backend)
    grad_dtype, lowp_dtype, scale = MODES[mode]
    segments = pack(LAYOUTS[layout])
    n = buffer_len(segments)
    gen = torch.Generator().manual_seed(len(LAYOUTS[layout]) * 7 + len(mode))
    rows, disabled = segment_hparams(len(segments))
    steps = [r[2] for r in rows]

    state = random_state(n, lowp_dtype, gen)
    ref = [clone_to(t, "cpu") for t in state]
    out = [clone_to(t, device) for t in state]
    grad_scale_ref = None if scale is None else torch.tensor([scale])
    grad_scale = None if scale is None else grad_scale_ref.to(device)
    for _ in range(STEPS):
        g = random_grads(n, grad_dtype, gen) * (1.0 if scale is None else scale)
        hp = hparams_table(rows, steps, disabled)
        p, m, v, low = ref
        adamw_packed_(p, g, m, v, segments, hp, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, param_lowp=low,
                      grad_scale=grad_scale_ref, backend="torch")
        p, m, v, low = out
        adamw_packed_(p, g.to(device), m, v, segments, hp, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                      param_lowp=low, grad_scale=grad_scale, backend=backend)
        steps = [s + 1 for s in steps]

    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "param_lowp"), out, ref):
        if a is not None:
            assert_close(a, b, f"{backend} {name}")
    for s in disabled:
        off, cnt = segments.bounds[s]
        for name, a, before in zip(("param", "exp_avg", "exp_avg_sq", "param_lowp"), out, state):
            if a is not None:
                assert torch.equal(a[off:off + cnt].cpu(), before[off:off + cnt]), f"disabled segment {s}: {name} changed"


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ALL)
def test_matches_torch_adamw(backend, mode):
    """Each segment is its own nn.Parameter in torch.optim.AdamW (own param group, own step count)."""
    device = backend_device(backend)
    grad_dtype, lowp_dtype, _ = MODES[mode]
    segments = pack(LAYOUTS["4097"])
    n = buffer_len(segments)
    gen = torch.Generator().manual_seed(11)
    rows, disabled = segment_hparams(len(segments))
    p0, m0, v0, low0 = random_state(n, lowp_dtype, gen)

    params = [torch.nn.Parameter(p0[off:off + cnt].clone()) for off, cnt in segments.bounds]
    opt = torch.optim.AdamW(
        [dict(params=[q], lr=lr, weight_decay=wd) for q, (lr, wd, _) in zip(params, rows)],
        betas=BETAS, eps=EPS, foreach=False,
    )
    for q, (off, cnt), (_, _, first) in zip(params, segments.bounds, rows):
        opt.state[q] = dict(step=torch.tensor(float(first - 1)), exp_avg=m0[off:off + cnt].clone(),
                            exp_avg_sq=v0[off:off + cnt].clone())

    p, m, v, low = (clone_to(t, device) for t in (p0, m0, v0, low0))
    steps = [r[2] for r in rows]
    for _ in range(STEPS):
        g = random_grads(n, grad_dtype, gen)
        for s, (q, (off, cnt)) in enumerate(zip(params, segments.bounds)):
            q.grad = None if s in disabled else g[off:off + cnt].float()
        opt.step()
        adamw_packed_(p, g.to(device), m, v, segments, hparams_table(rows, steps, disabled), beta1=BETAS[0],
                      beta2=BETAS[1], eps=EPS, param_lowp=low, grad_scale=None, backend=backend)
        steps = [st + 1 for st in steps]

    for s, (q, (off, cnt)) in enumerate(zip(params, segments.bounds)):
        st = opt.state[q]
        assert_close(p[off:off + cnt], q.detach(), f"{backend} param[{s}]")
        assert_close(m[off:off + cnt], st["exp_avg"], f"{backend} exp_avg[{s}]")
        assert_close(v[off:off + cnt], st["exp_avg_sq"], f"{backend} exp_avg_sq[{s}]")
        if low is not None:
            assert_close(low[off:off + cnt], q.detach().to(low.dtype), f"{backend} param_lowp[{s}]")


def uses_fma(backend: str) -> bool:
    """Whether `backend` rounds lerp/addcmul once (FMA) or twice, on this machine."""
    if backend == "cpu":
        return native._C.cpu_kernel_isa() == "avx2+fma"
    if backend == "triton" and kernels.triton_interpreted():
        return triton_interpreter_fuses_fma()
    return backend in ("cuda", "triton")


def triton_interpreter_fuses_fma() -> bool:
    """Triton's interpreter rounds tl.fma once from 3.7 on, twice before (3.6: x * y + z in numpy)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(x_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, -tl.load(x_ptr + 1)))

    x = torch.tensor([1 + 2**-23, 1 + 2**-22], dtype=torch.float32)  # x0 * x0 - x1 is 2^-46, or 0 rounded
    out = torch.zeros(1)
    fma_kernel[(1,)](x, out)
    return out.item() != 0.0


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_equal_to_reference_with_ieee_sqrt(backend, monkeypatch):
    """The fused kernels compute torch's AdamW operations in torch's order and with torch's roundings
    (FMAs where torch's CPU kernels use them), so they equal the reference bit for bit once the one
    difference is taken out: torch's CPU `sqrt` is not correctly rounded (off by one ulp on ~1 in 6
    inputs), the kernels' is. Everything else must match exactly."""
    import numpy as np

    torch_fma = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    if uses_fma(backend) != torch_fma:
        pytest.skip(f"torch's CPU kernels ({torch.backends.cpu.get_cpu_capability()}, FMA: {torch_fma}) and "
                    f"{backend} (FMA: {not torch_fma}) round lerp/addcmul differently on this machine")
    device = backend_device(backend)
    segments = pack([2**16 + 3, 4097, 1, 129])
    n = buffer_len(segments)
    gen = torch.Generator().manual_seed(12)
    rows, disabled = segment_hparams(len(segments))
    steps = [r[2] for r in rows]
    state = random_state(n, torch.bfloat16, gen)
    ref = [t.clone() for t in state]
    out = [t.clone().to(device) for t in state]
    for beta1 in (0.9, 0.3):  # both lerp branches
        g = random_grads(n, torch.bfloat16, gen)
        hp = hparams_table(rows, steps, disabled)
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "sqrt", lambda t: torch.from_numpy(np.sqrt(t.numpy())))
            adamw_packed_(*ref[:1], g, *ref[1:3], segments, hp, beta1=beta1, beta2=0.999, eps=1e-8,
                          param_lowp=ref[3], backend="torch")
        adamw_packed_(*out[:1], g.to(device), *out[1:3], segments, hp, beta1=beta1, beta2=0.999, eps=1e-8,
                      param_lowp=out[3], backend=backend)
        steps = [s + 1 for s in steps]
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "param_lowp"), out, ref):
        assert torch.equal(a.cpu(), b), f"{backend} {name}: {(a.cpu() != b).sum().item()} elements differ"


@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("backend", FUSED)
def test_both_lerp_branches(backend, beta1):
    """torch's lerp switches formulas at weight 1 - beta1 = 0.5; each kernel must switch with it."""
    device = backend_device(backend)
    segments = pack([4097])
    gen = torch.Generator().manual_seed(9)
    p, m, v, _ = random_state(4097, None, gen)
    g = random_grads(4097, torch.float32, gen)
    hp = hparams_table([(1e-2, 0.1, 2)], [2], set())
    ref = [t.clone() for t in (p, m, v)]
    out = [t.clone().to(device) for t in (p, m, v)]
    kw = dict(beta1=beta1, beta2=0.99, eps=1e-8)
    adamw_packed_(ref[0], g, ref[1], ref[2], segments, hp, backend="torch", **kw)
    adamw_packed_(out[0], g.to(device), out[1], out[2], segments, hp, backend=backend, **kw)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), out, ref):
        assert_close(a, b, f"{backend} {name} beta1={beta1}")


def special_floats(gen: torch.Generator) -> torch.Tensor:
    """Random fp32 bit patterns over every exponent, plus zeros, infinities, NaN, subnormals and exact
    bf16/fp16 rounding ties (odd and even)."""
    bits = torch.randint(-2**31, 2**31, (20000,), generator=gen, dtype=torch.int64).to(torch.int32)
    rand = bits.view(torch.float32)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-45, -1e-45, 1e-40, 65504.0, 65519.0, 65520.0,
                             -65520.0, 6e-8, 2.0**-25, 2.0**-24, 3 * 2.0**-25, 2.0**-14, 1e38, 3.4e38])
    ties = []
    for base in (1.0, 1.5, 3.0, 1e-3, 2.0**-20, 1000.0):
        for half_ulp in (2.0**-8, 2.0**-11):  # bf16 and fp16 half ulps at 1.0
            scale = 2.0 ** math.floor(math.log2(base))
            ties += [base + half_ulp * scale, base + 3 * half_ulp * scale, -(base + half_ulp * scale)]
    return torch.cat([rand, specials, torch.tensor(ties, dtype=torch.float32)])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf/nan on purpose
@pytest.mark.parametrize("lowp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_copy_rounds_like_torch(backend, lowp_dtype):
    """With step_size 0 and decay 1 the param passes through unchanged, so param_lowp must equal
    torch's own round-to-nearest-even `.to(dtype)` bit for bit, over every exponent and at exact ties."""
    device = backend_device(backend)
    p = special_floats(torch.Generator().manual_seed(3))
    n = p.numel()
    segments = Segments([(0, n)])
    hp = torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    zeros = torch.zeros(n, device=device)
    low = torch.empty(n, dtype=lowp_dtype, device=device)
    adamw_packed_(p.to(device), zeros, zeros.clone(), zeros.clone(), segments, hp, beta1=0.9, beta2=0.999,
                  eps=1e-8, param_lowp=low, backend=backend)
    expected = p.to(lowp_dtype)
    nan = expected.isnan()
    assert torch.equal(low.cpu().isnan(), nan)
    assert torch.equal(low.cpu()[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", FUSED)
def test_grad_dtype_conversion_is_exact(backend):
    """bf16/fp16 grads (including subnormals and infinities) reach the math as their exact fp32 values."""
    device = backend_device(backend)
    for dtype in (torch.bfloat16, torch.float16):
        g = special_floats(torch.Generator().manual_seed(4)).to(dtype)
        g = g[~g.isnan()]
        n = g.numel()
        segments = Segments([(0, n)])
        # beta1 = 0 makes exp_avg the grad itself: m = m + 1 * (g - m) = g exactly for finite g
        hp = torch.tensor([[0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
        m = torch.zeros(n, device=device)
        adamw_packed_(torch.zeros(n, device=device), g.to(device), m, torch.zeros(n, device=device), segments, hp,
                      beta1=0.0, beta2=0.999, eps=1e-8, backend=backend)
        expected = torch.zeros(n)
        expected.lerp_(g.float(), 1.0)
        finite = expected.isfinite()
        assert torch.equal(m.cpu()[finite], expected[finite]), dtype


@pytest.mark.parametrize("backend", FUSED)
def test_empty_and_all_disabled(backend):
    device = backend_device(backend)
    p = torch.randn(200, device=device)
    before = p.clone()
    for segments, hp in ((Segments([(0, 0), (64, 0)]), torch.ones(2, 4, dtype=torch.float64)),
                         (Segments([(0, 100), (128, 72)]), torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2, dtype=torch.float64))):
        adamw_packed_(p, torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p), segments, hp,
                      beta1=0.9, beta2=0.999, eps=1e-8, backend=backend)
        assert torch.equal(p, before)


def test_bad_grad_scale_is_named():
    p = torch.zeros(64)
    with pytest.raises(ValueError, match="grad_scale must be a 1-element float32 tensor"):
        adamw_packed_(p, p.clone(), p.clone(), p.clone(), Segments([(0, 64)]), torch.ones(1, 4, dtype=torch.float64),
                      beta1=0.9, beta2=0.999, eps=1e-8, grad_scale=torch.tensor([2.0], dtype=torch.float64))


# ------------------------------------------------------------------------------ native module
needs_native = pytest.mark.skipif(native.unavailable_reason("cpu") is not None,
                                  reason=str(native.unavailable_reason("cpu")))


@needs_native
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; a GPU is present")
def test_cuda_backend_without_gpu_says_why():
    reason = native.unavailable_reason("cuda")
    assert reason is not None and ("without CUDA" in reason or "no CUDA device" in reason), reason
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        kernels.resolve_backend("cuda", "cpu")
    p = torch.zeros(64)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*(without CUDA|no CUDA device)"):
        native.adamw_segments_cuda_([p], [p], p, p, Segments([(0, 64)]), torch.ones(1, 4, dtype=torch.float64),
                                    beta1=0.9, beta2=0.999, eps=1e-8)
    # the raw entry point refuses before touching any pointer
    with pytest.raises(RuntimeError, match="without CUDA|no usable CUDA device|no CUDA device present"):
        native._C.adamw_cuda(segs=1, exp_avg=1, exp_avg_sq=1, grad_scale=0, chunks=1, n_chunks=1, table=1,
                             grad_dtype=0, lowp_dtype=-1, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001,
                             eps=1e-8, device=0, stream=0)


def test_auto_fallback_is_logged_once_per_reason(monkeypatch, caplog):
    """"auto" passing over a backend it prefers says so (once per device and reason); explicit asks raise."""
    from lisa_fused.kernels import triton_adamw

    old_driver = "the CUDA driver (12080) is older than the CUDA 13.0 runtime linked into lisa_fused._C (needs >= 580)"
    reasons = {"cuda": old_driver, "cpu": None}
    monkeypatch.setattr(native, "unavailable_reason", lambda backend: reasons[backend])
    monkeypatch.setattr(triton_adamw, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(kernels, "_warned_fallbacks", set())
    cuda0 = torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger="lisa_fused.kernels"):
        assert kernels.resolve_backend("auto", cuda0) == "triton"
        assert kernels.resolve_backend("auto", cuda0) == "triton"
        assert kernels.resolve_backend("auto", "cpu") == "cpu"  # nothing passed over: no warning
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert old_driver in caplog.text and "'triton'" in caplog.text and "cuda:0" in caplog.text
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: the CUDA driver"):
        kernels.resolve_backend("cuda", cuda0)

    caplog.clear()
    reasons["cpu"] = "the native extension lisa_fused._C is not built"
    with caplog.at_level("WARNING", logger="lisa_fused.kernels"):
        assert kernels.resolve_backend("auto", "cpu") == "torch"
        assert kernels.resolve_backend("auto", torch.device("cuda", 1)) == "triton"  # another device: logged
        assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert len(caplog.records) == 2
    assert "uses 'torch', not 'cpu': the native extension" in caplog.records[0].getMessage()
    assert "cuda:1" in caplog.records[1].getMessage()


@needs_native
def test_cpu_kernel_refuses_a_bad_segment_table_before_writing():
    """The C++ side checks every enabled chunk against its segment-table row (pointers present, the chunk
    inside the segment, a low-precision copy iff lowp_dtype says so) before the first write: a bad row
    raises ValueError naming the segment and changes nothing, even past the Python checks."""
    from lisa_fused.kernels import _tables

    segments = pack([300, 70])
    n = buffer_len(segments)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(k, generator=gen) for _, k in segments.bounds]
    grads = [torch.randn(k, generator=gen) for _, k in segments.bounds]
    m, v = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    hp = hparams_table([(1e-3, 0.1, 1), (1e-3, 0.1, 1)], [1, 1], set())
    chunks = _tables.chunk_table(segments, native.CPU_CHUNK, "cpu")
    before = [t.clone() for t in params + [m, v]]

    def launch(table, lowp_dtype=-1):
        native._C.adamw_cpu(segs=table.data_ptr(), exp_avg=m.data_ptr(), exp_avg_sq=v.data_ptr(), grad_scale=0,
                            chunks=chunks.data_ptr(), n_chunks=chunks.shape[0], table=hp.data_ptr(), grad_dtype=0,
                            lowp_dtype=lowp_dtype, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001,
                            eps=1e-8, num_threads=2)

    good = _tables.pointer_table(segments, params, grads, None, "cpu")
    low0 = torch.zeros(300, dtype=torch.bfloat16)
    for col, value, lowp_dtype, match in ((3, 0, -1, "segment 1 is enabled but its grad pointer is null"),
                                          (2, 0, -1, "segment 1 is enabled but its param pointer is null"),
                                          (1, 69, -1, r"chunk \[\d+, \d+\) is outside segment 1 \(offset \d+, numel 69\)"),
                                          (4, 0, 1, "segment 1 has no low-precision copy")):
        bad = good.clone()
        bad[1, col] = value
        if lowp_dtype != -1:  # segment 0 has a copy, segment 1 does not
            bad[0, 4] = low0.data_ptr()
        with pytest.raises(ValueError, match=match):
            launch(bad, lowp_dtype)
        assert all(torch.equal(a, b) for a, b in zip(before, params + [m, v])), f"written before the raise: {match}"
    launch(good)  # the same call with a good table runs and moves every segment
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[1], before[1])


def test_missing_build_is_explained(monkeypatch):
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'lisa_fused._C'", raising=False)
    for backend in ("cpu", "cuda"):
        reason = native.unavailable_reason(backend)
        assert "lisa_fused._C is not built" in reason and "pip install" in reason
    p = torch.zeros(64)
    with pytest.raises(RuntimeError, match="not built.*pip install"):
        native.adamw_segments_cpu_([p], [p], p, p, Segments([(0, 64)]), torch.ones(1, 4, dtype=torch.float64),
                                   beta1=0.9, beta2=0.999, eps=1e-8)


@needs_native
def test_survives_torch_compile():
    """fullgraph: the native step is one custom op in the graph, and AOTAutograd's functionalization of
    its in-place updates gives the eager result bit for bit."""
    segments = pack([1000, 77])
    n = buffer_len(segments)
    gen = torch.Generator().manual_seed(6)
    hp = hparams_table([(1e-3, 0.1, 1), (2e-3, 0.0, 3)], [1, 3], set())

    def step(p, g, m, v):
        adamw_packed_(p, g, m, v, segments, hp, beta1=0.9, beta2=0.999, eps=1e-8, backend="cpu")

    eager = [torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)]
    compiled = [t.clone() for t in eager]
    step(*eager)  # builds and caches the chunk table outside the graph
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    step(*eager)
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_custom_op_opcheck(device):
    """The torch.compile path (lisa_fused::adamw_segments): schema, mutated tensor lists and fake
    implementation agree (torch.library.opcheck); params as separate tensors, one of them 2-D, a disabled
    segment without its grad."""
    from lisa_fused.kernels._tables import chunk_table

    if device == "cuda" and native.unavailable_reason("cuda"):
        pytest.skip(native.unavailable_reason("cuda"))
    gen = torch.Generator().manual_seed(5)
    sizes = [1000, 77, 5]
    segments = pack(sizes)
    n = buffer_len(segments)
    chunks = chunk_table(segments, native.CPU_CHUNK if device == "cpu" else native.CUDA_CHUNK, device)
    hp = hparams_table([(1e-3, 0.1, 1), (2e-3, 0.0, 3), (1e-3, 0.0, 2)], [1, 3, 2], {2})  # stays on the host
    for lowp, scale in ((None, None), (torch.bfloat16, torch.tensor([4.0]))):
        params = [torch.randn(k, generator=gen).to(device) for k in sizes]
        params[0] = params[0].view(40, 25)
        grads = [torch.randn(k, generator=gen).to(lowp or torch.float32).to(device) for k in sizes]
        grads[0] = grads[0].view(40, 25)
        grads[2] = None
        lowps = [] if lowp is None else [q.to(lowp) for q in params]
        args = (params, grads, torch.zeros(n, device=device), torch.zeros(n, device=device), lowps,
                None if scale is None else scale.to(device), chunks, segments.tensor(), hp, 0.9, 0.999, 1e-8)
        torch.library.opcheck(native.adamw_segments_op, args)
