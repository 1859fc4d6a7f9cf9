"""Lean optimizer state (kernels/contract.py): every moment format x master mode, native kernels against
the pure-torch reference bit for bit; the quantizer against its definition and torchao's; the
stochastic-rounding hash (determinism, unbiasedness); grad_sumsq against torch; 8-bit / 4-bit
trajectories against torchao's AdamW8bit / AdamW4bit; validation errors.

The CUDA kernel is compiled (nvcc, tests/test_build.py and the build) but runs only where a GPU is.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_fused.kernels import ALIGN, Segments, adamw_packed_, backend_unavailable_reason, native, quant
from lisa_fused.kernels.contract import N_COLS_LEAN

BETAS = (0.9, 0.999)
EPS = 1e-8
SIZES = [4097, 1, 257, 300]  # the second segment is disabled
DISABLED = 1
MODES = [(m, w) for m in quant.FORMATS for w in quant.MASTER_WEIGHTS]


def backend_param(backend: str):
    device = "cuda" if backend == "cuda" else "cpu"
    marks = [pytest.mark.gpu] if device == "cuda" else []
    reason = None if device == "cuda" else backend_unavailable_reason(backend, device)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(backend, marks=marks, id=backend)


NATIVE = [backend_param("cpu"), backend_param("cuda")]


def layout(sizes):
    bounds, off = [], 0
    for n in sizes:
        bounds.append((off, n))
        off += -(-n // ALIGN) * ALIGN
    return Segments(bounds), off


def hparams(steps, n_segments):
    """[S, 6] table: per-segment lr, weight decay and step; param id = 10 + segment index."""
    b1, b2 = BETAS
    rows = []
    for s, step in enumerate(steps):
        lr, wd = 1e-3 * (1 + s), (0.0, 0.1, 0.5)[s % 3]
        rows.append([lr / (1 - b1**step), 1 - lr * wd, math.sqrt(1 - b2**step), 0.0 if s == DISABLED else 1.0,
                     10 + s, step])
    return torch.tensor(rows, dtype=torch.float64)


def make_state(n, moments, master, gen, device="cpu", pdtype=torch.bfloat16):
    """Buffers for one mode, as the optimizer would allocate them (moments start at zero); a 1-element
    grad_scale of 2 (AMP's unscale in the kernel)."""
    pdtype = torch.float32 if master == "fp32" else pdtype
    st = {"param": (torch.randn(n, generator=gen) * 0.02).to(pdtype)}
    if moments in quant.BLOCK:
        for name in ("exp_avg", "exp_avg_sq"):
            st[name] = torch.zeros(quant.codes_numel(n, moments), dtype=torch.uint8)
            st[name + "_scale"] = torch.zeros(quant.n_blocks(n, moments))
    else:
        dtype = torch.float32 if moments == "fp32" else torch.bfloat16
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    if master == "kahan":
        st["compensation"] = torch.zeros(n, dtype=pdtype)
    if master == "fp32":
        st["param_lowp"] = st["param"].to(torch.bfloat16)
    st["grad_sumsq"] = torch.zeros(len(SIZES))
    st["grad_scale"] = torch.tensor([2.0])
    return {k: v.to(device) for k, v in st.items()}


def step(st, grad, segments, hp, moments, master, backend, seed=1234):
    st = dict(st)
    adamw_packed_(st.pop("param"), grad, st.pop("exp_avg"), st.pop("exp_avg_sq"), segments, hp, beta1=BETAS[0],
                  beta2=BETAS[1], eps=EPS, backend=backend, moments=moments, master_weights=master, seed=seed, **st)


def ieee_sqrt(t):
    """Correctly rounded sqrt: torch's CPU sqrt is off by one ulp on some inputs, the kernels' is not."""
    return torch.from_numpy(np.sqrt(t.numpy()))


def torch_fma() -> bool:
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


# The Triton interpreter costs ~0.4 s per launch here: every moment format and master mode once, 2 steps.
TRITON_MODES = [("fp32", "kahan"), ("bf16", "stochastic"), ("8bit", "fp32"), ("4bit", "stochastic")]


def case(backend: str, moments: str, master: str):
    bp = backend_param(backend)
    return pytest.param(backend, moments, master, marks=bp.marks, id=f"{backend}-{moments}-{master}")


CASES = [case(b, m, w) for b in ("cpu", "cuda") for m, w in MODES] + [case("triton", m, w) for m, w in TRITON_MODES]


@pytest.mark.parametrize("backend,moments,master,pdtype", [
    *[pytest.param(*c.values, torch.bfloat16, marks=c.marks, id=c.id) for c in CASES],
    pytest.param("cpu", "8bit", "kahan", torch.float16, id="cpu-8bit-kahan-fp16"),
    pytest.param("triton", "fp32", "kahan", torch.float16, marks=backend_param("triton").marks,
                 id="triton-fp32-kahan-fp16"),
])
def test_native_bitwise_equal_to_reference(backend, moments, master, pdtype, monkeypatch):
    """Four steps with fresh bf16 grads, several segments with their own step/lr/wd, one disabled: params,
    codes, scales, compensation and the bf16 copy equal the reference bit for bit (the reference with an
    IEEE sqrt), the disabled segment is untouched, and grad_sumsq matches to fp32 summation order."""
    bitwise_run(backend, moments, master, pdtype, monkeypatch)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` one element into a new buffer: 2 or 4 bytes off 16-byte alignment."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    buf[1:].copy_(t)
    assert buf[1:].data_ptr() % 16
    return buf[1:]


def bitwise_run(backend, moments, master, pdtype, monkeypatch, misalign=False):
    """test_native_bitwise_equal_to_reference; `misalign`: the kernel's param, grad and param_lowp sit one
    element off 16-byte alignment (the packed state stays aligned)."""
    if backend == "cpu" and (native._C.cpu_kernel_isa() == "avx2+fma") != torch_fma():
        pytest.skip("torch's CPU kernels and the C++ loop round lerp/addcmul differently on this machine")
    device = "cuda" if backend == "cuda" else "cpu"
    segments, n = layout(SIZES)
    gen = torch.Generator().manual_seed(3)
    ref = make_state(n, moments, master, gen, pdtype=pdtype)
    out = {k: v.clone().to(device) for k, v in ref.items()}
    if misalign:
        out.update({k: misaligned(out[k]) for k in ("param", "param_lowp") if k in out})
    before = {k: v.clone() for k, v in ref.items()}
    steps = [1, 7, 3, 100]
    for _ in range(2 if backend == "triton" else 4):
        g = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
        hp = hparams(steps, len(SIZES))
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "sqrt", ieee_sqrt)
            step(ref, g, segments, hp, moments, master, "torch")
        step(out, misaligned(g.to(device)) if misalign else g.to(device), segments, hp, moments, master, backend)
        steps = [s + 1 for s in steps]
    for name, r in ref.items():
        o = out[name].cpu()
        if name == "grad_sumsq":
            torch.testing.assert_close(o, r, rtol=1e-5, atol=0)
            assert o[DISABLED] == 0
            continue
        assert torch.equal(o, r), f"{backend} {moments}/{master} {name}: {(o != r).sum().item()} entries differ"
    # the disabled segment (elements [off, off + 1)) and its code byte / scale never changed
    off, cnt = segments.bounds[DISABLED]
    p_changed = ref["param"].float() != before["param"].float()
    assert not p_changed[off:off + cnt].any()
    assert p_changed[segments.bounds[0][0]:segments.bounds[0][1]].float().mean() > 0.5, "params did not train"
    if moments in quant.BLOCK:
        lo = off // 2 if moments == "4bit" else off
        assert torch.equal(ref["exp_avg"][lo:lo + 1], before["exp_avg"][lo:lo + 1])
        assert ref["exp_avg_scale"][off // quant.BLOCK[moments]] == 0
        assert ref["exp_avg_sq_scale"][0] > 0


@pytest.mark.parametrize("moments,master,aligned", [(m, w, True) for m, w in MODES] + [
    (m, w, False) for m, w in TRITON_MODES], ids=[f"{m}-{w}" for m, w in MODES] + [
    f"{m}-{w}-unaligned" for m, w in TRITON_MODES])
def test_triton_gpu_tile_bitwise_equal_to_reference(moments, master, aligned, monkeypatch):
    """The Triton lean kernel with the GPU launch's TILE and num_warps (triton_lean._GPU_CONFIG) and chunks
    of two tiles: the 4097-element segment runs full unmasked tiles (16-bit words of 4-bit codes, the
    per-warp absmax) over three chunks, the others masked tails; "unaligned" (param, grad and param_lowp
    one element off 16-byte alignment, as slices of a shared buffer can be) masks every tile. Bit for bit
    as the reference (the test above, whose interpreter tiles are larger than every segment)."""
    reason = backend_unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(reason)
    from lisa_fused.kernels import triton_lean

    _, tile, warps = triton_lean._GPU_CONFIG
    monkeypatch.setattr(triton_lean, "_INTERPRETER_CONFIG", (2 * tile, tile, warps))
    bitwise_run("triton", moments, master, torch.bfloat16, monkeypatch, misalign=not aligned)


@pytest.mark.parametrize("backend", NATIVE + [backend_param("triton")])
def test_fp32_through_the_lean_loop_equals_the_fast_loop(backend):
    """grad_sumsq with fp32 state runs the block-wise lean loop (Triton: the lean kernel): params and
    moments must equal the original fp32 loop's bit for bit (same element math)."""
    device = "cuda" if backend == "cuda" else "cpu"
    segments, n = layout(SIZES)
    gen = torch.Generator().manual_seed(5)
    a = make_state(n, "fp32", "fp32", gen, device)
    b = {k: v.clone() for k, v in a.items()}
    del b["grad_sumsq"]
    want = torch.zeros(len(SIZES), dtype=torch.float64)
    for s in range(3):
        g = (torch.randn(n, generator=gen) * 0.1).to(device)
        hp = hparams([1 + s] * len(SIZES), len(SIZES))
        step(a, g, segments, hp, "fp32", "fp32", backend)
        step(b, g, segments, hp, "fp32", "fp32", backend)
        want += torch.tensor([0.0 if i == DISABLED else float(((g[o:o + c].double() / 2) ** 2).sum())
                              for i, (o, c) in enumerate(segments.bounds)], dtype=torch.float64)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(a["grad_sumsq"].cpu().double(), want, rtol=1e-5, atol=0)


def test_grad_sumsq_matches_torch_and_accumulates():
    segments, n = layout(SIZES)
    gen = torch.Generator().manual_seed(6)
    st = make_state(n, "8bit", "fp32", gen)
    st["grad_sumsq"].fill_(1.0)  # the kernel adds to what is there
    g = torch.randn(n, generator=gen).to(torch.float16)
    scale = torch.tensor([4.0])
    st["grad_scale"] = scale
    step(st, g, segments, hparams([1] * len(SIZES), len(SIZES)), "8bit", "fp32", "cpu")
    for s, (off, cnt) in enumerate(segments.bounds):
        want = 1.0 if s == DISABLED else 1.0 + float(((g[off:off + cnt].double() / 4.0) ** 2).sum())
        assert math.isclose(float(st["grad_sumsq"][s]), want, rel_tol=1e-5), s


# ------------------------------------------------------------------------------ the quantizer
@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("which", ["exp_avg", "exp_avg_sq"])
def test_quantize_picks_the_nearest_code(fmt, which):
    """Each code is a nearest map value to x / absmax (ties within fp32 midpoint rounding), scales are the
    block absmax, and dequantize(quantize(x)) errs by at most half the widest map gap times the scale."""
    gen = torch.Generator().manual_seed(7)
    blk = quant.BLOCK[fmt]
    x = torch.randn(8 * blk, generator=gen) * torch.logspace(-6, 0, 8).repeat_interleave(blk)
    if which == "exp_avg_sq":
        x = x.abs()
    x[:blk] = 0.0  # an all-zero block
    codes, scale = quant.quantize(x, fmt, which)
    assert scale[0] == 0 and torch.equal(scale[1:], x.reshape(-1, blk).abs().amax(1)[1:])
    q = quant.code_map(fmt, which)
    xn = (x.reshape(-1, blk)[1:] / scale[1:, None]).reshape(-1)
    c = quant.unpack(codes, fmt)[blk:].long()
    err = (q[c] - xn).abs()
    best = (q[None, :] - xn[:, None]).abs().min(dim=1).values
    assert (err <= best + 1e-7).all()
    back = quant.dequantize(codes, scale, fmt, which, x.numel())
    assert back[:blk].eq(0).all()  # scale 0 (even the zero-free 4-bit v map gives 0 * 1/16)
    lo = -1.0 if which == "exp_avg" else 0.0  # the range x / absmax covers; the map's ends may fall short
    half_gap = max(float((q[1:] - q[:-1]).max()) / 2, float(q[0]) - lo, 1.0 - float(q[-1]))
    assert ((back - x).abs().reshape(-1, blk) <= half_gap * scale[:, None] * (1 + 1e-3)).all()


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_code_maps_are_torchaos(fmt):
    """Same maps as torchao's AdamW8bit/AdamW4bit (bnb's dynamic map; lpmm's zero-free linear v map)."""
    qu = pytest.importorskip("torchao.optim.quant_utils")
    if fmt == "8bit":
        assert torch.equal(quant.code_map(fmt, "exp_avg"), torch.tensor(qu.create_dynamic_map(True)))
        assert torch.equal(quant.code_map(fmt, "exp_avg_sq"), torch.tensor(qu.create_dynamic_map(False)))
    else:
        assert torch.equal(quant.code_map(fmt, "exp_avg"), torch.tensor(qu.create_dynamic_map(True, 3, 4)))
        assert torch.equal(quant.code_map(fmt, "exp_avg_sq"), torch.linspace(0, 1, 17)[1:])


# ------------------------------------------------------------------------------ the kernels' code search
MAPS = [(f, w) for f in ("8bit", "4bit") for w in ("exp_avg", "exp_avg_sq")]


def _bucket_ranges(fmt, which):
    """(lowest, highest) fp32 value of every entry of the kernels' bucket table of the map, "beyond"
    excluded, in table order (csrc/adamw_math.h CodeBuckets; kernels/triton_lean.py BUCKETS)."""
    from lisa_fused.kernels.triton_lean import BUCKETS

    shift, first, count, signed = BUCKETS[(fmt, which)]
    j = torch.arange(count, dtype=torch.int64)
    lo = torch.where(j == 0, 0, (first + j) << shift).to(torch.int32).view(torch.float32)
    hi = ((((first + j + 1) << shift) - 1).to(torch.int32)).view(torch.float32)
    return [(lo, hi)] + ([(-hi, -lo)] if signed else [])


def code_probes(fmt, which):
    """fp32 values the code search must get right: every midpoint and 3 ulps either side, both ends of every
    bucket and 1 ulp beyond, +-0, +-1, NaN, and 2^18 random patterns of [-1, 1] (x / absmax is in [-1, 1]
    or NaN, never anything else)."""
    from lisa_fused.kernels.triton_lean import BUCKETS

    mid = quant.midpoints(quant.code_map(fmt, which))
    vals = [mid, torch.tensor([0.0, -0.0, 1.0, -1.0, float("nan")])]
    if (fmt, which) in BUCKETS:
        vals += [t for pair in _bucket_ranges(fmt, which) for t in pair]
    for _ in range(3):
        vals += [torch.nextafter(v, torch.full_like(v, 2.0)) for v in vals[:1]] + [
            torch.nextafter(v, torch.full_like(v, -2.0)) for v in vals[:1]]
        vals[0] = torch.cat([vals[0], vals[-1], vals[-2]])
    gen = torch.Generator().manual_seed(13)
    bits = torch.randint(0, 0x3F800001, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    sweep = bits.view(torch.float32) * torch.where(torch.rand(1 << 18, generator=gen) < 0.5, -1.0, 1.0)
    x = torch.cat([v.flatten() for v in vals] + [sweep]).contiguous()
    x = x[x.isnan() | (x.abs() <= 1)]
    want = torch.searchsorted(mid, x, right=False).to(torch.uint8)
    want[x.isnan()] = 0  # nearest_code: no midpoint is below NaN
    return x, want


def test_4bit_v_map_has_the_closed_form():
    """csrc code_linear16 and the Triton kernel's dequantization assume the 4-bit v map is k / 16, k = 1..16:
    values (code + 1) / 16 and midpoints (2j + 3) / 32 exactly."""
    q = quant.code_map("4bit", "exp_avg_sq")
    assert torch.equal(q, (torch.arange(16) + 1).float() / 16)
    assert torch.equal(quant.kernel_table("4bit", "cpu")[2, :16], q)
    assert torch.equal(quant.midpoints(q), (2 * torch.arange(15) + 3).float() / 32)


@pytest.mark.parametrize("fmt,which", [m for m in MAPS if m != ("4bit", "exp_avg_sq")])
def test_code_buckets_hold_one_midpoint_and_their_base(fmt, which):
    """The bucket tables' invariant that makes code = base + (midpoint[base] < x) exact: no bucket holds two
    midpoints and each base is the code of the bucket's lowest value; the C++ constants are the same."""
    from lisa_fused.kernels import triton_lean

    shift, first, count, signed = triton_lean.BUCKETS[(fmt, which)]
    mid = quant.midpoints(quant.code_map(fmt, which))
    table = triton_lean._bucket_table(fmt, which)
    base, thr = table >> 32, (table & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    padded = torch.cat([mid, torch.tensor([float("inf")])])
    for side, (lo, hi) in enumerate(_bucket_ranges(fmt, which)):
        inside = torch.searchsorted(mid, hi, right=True) - torch.searchsorted(mid, lo, right=False)
        assert int(inside.max()) <= 1, f"{fmt} {which}: a bucket holds {int(inside.max())} midpoints"
        entries = slice(side * (count + 1), side * (count + 1) + count)
        assert torch.equal(base[entries], torch.searchsorted(mid, lo, right=False))
        assert torch.equal(thr[entries], padded[base[entries]])
        assert base[side * (count + 1) + count] == 0  # "beyond": NaN gets code 0
    header = (Path(__file__).resolve().parents[1] / "csrc" / "adamw_math.h").read_text()
    name = {"exp_avg": "M", "exp_avg_sq": "V"}[which]
    want = f"kBuckets{fmt}{name}{{{shift}, {first}, {count}, {'true' if signed else 'false'}}}"
    assert want in header, f"csrc/adamw_math.h and kernels/triton_lean.py BUCKETS disagree: no {want}"


@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar", "avx2"])
@pytest.mark.parametrize("fmt,which", MAPS)
def test_cpu_code_search_equals_searchsorted(fmt, which, vectorized):
    """The C++ code search (adamw_math.h code_of, the function the CUDA kernel runs too; the AVX2 copy's
    gathers) on the probes: the count of midpoints below x, NaN -> 0."""
    if backend_unavailable_reason("cpu", "cpu"):
        pytest.skip(backend_unavailable_reason("cpu", "cpu"))
    x, want = code_probes(fmt, which)
    out = torch.empty(x.numel(), dtype=torch.uint8)
    qt = quant.kernel_table(fmt, "cpu")
    native._C.nearest_codes_cpu(x.data_ptr(), x.numel(), qt.data_ptr(), quant.FORMAT_CODE[fmt],
                                ("exp_avg", "exp_avg_sq").index(which), vectorized, out.data_ptr())
    bad = (out != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. x={x[bad[:4]].tolist()}: {out[bad[:4]].tolist()} " \
                             f"vs {want[bad[:4]].tolist()}"


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # NaN -> int32 in numpy
@pytest.mark.parametrize("fmt,which", MAPS)
def test_triton_code_search_equals_searchsorted(fmt, which):
    """triton_lean._codes (the bucket table gather, or the closed form) on the probes, in the interpreter
    (where the closed form's NaN -> int32 conversion warns, then clamps to 0 as on the GPU)."""
    reason = backend_unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(reason)
    from lisa_fused.kernels import triton_lean

    x, want = code_probes(fmt, which)
    tables = triton_lean.code_tables(fmt, "cpu")
    shift, first, count, signed = triton_lean.BUCKETS.get((fmt, which), (0, 0, 0, False))
    start = 2 * (triton_lean.BUCKETS[(fmt, "exp_avg")][2] + 1) if which == "exp_avg_sq" and fmt == "8bit" else 0
    out = torch.empty(x.numel(), dtype=torch.int32)
    block = 1 << 16
    _codes_probe[(-(-x.numel() // block),)](x, out, tables[start:], x.numel(), shift, first, count, signed,
                                            (fmt, which) == ("4bit", "exp_avg_sq"), BLOCK=block)
    bad = (out.to(torch.uint8) != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. x={x[bad[:4]].tolist()}"


try:
    import triton
    import triton.language as tl

    from lisa_fused.kernels.triton_lean import _codes

    @triton.jit
    def _codes_probe(x_ptr, out_ptr, table_ptr, n, SHIFT: tl.constexpr, FIRST: tl.constexpr, COUNT: tl.constexpr,
                     SIGNED: tl.constexpr, LINEAR16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        c = _codes(x, tl.full(x.shape, 1.0, tl.float32), table_ptr, SHIFT, FIRST, COUNT, SIGNED, LINEAR16)
        tl.store(out_ptr + offs, c, mask=offs < n)
except ImportError:  # triton is optional; the tests above skip
    _codes_probe = None


# ------------------------------------------------------------------------------ stochastic rounding
def test_sr_hash_is_deterministic_and_keyed():
    idx = torch.arange(1 << 12)
    a = quant.sr_bits(1, 2, 3, idx, 0)
    assert torch.equal(a, quant.sr_bits(1, 2, 3, idx, 0))
    for other in (quant.sr_bits(2, 2, 3, idx, 0), quant.sr_bits(1, 3, 3, idx, 0), quant.sr_bits(1, 2, 4, idx, 0),
                  quant.sr_bits(1, 2, 3, idx, 1)):
        assert (a != other).float().mean() > 0.99
    assert 0 <= int(a.min()) and int(a.max()) < 1 << 32
    assert abs(float((a >> 16).float().mean()) / 65536 - 0.5) < 0.02  # top 16 bits roughly uniform
    # a Python-int spot check of the definition (mix32 on ints equals mix32 on tensors)
    k = quant.segment_key(1, 2, 3, 0)
    assert int(a[5]) == quant.mix32((k + quant._mul32(5, quant.GOLDEN)) & 0xFFFFFFFF)


def test_sr_is_unbiased():
    """The mean of many stochastic roundings of one value is the value (to sampling error), where round
    to nearest is off by the full rounding error."""
    n = 1 << 16
    x = torch.full((n,), 1.0 + 3 * 2**-10)  # 3/8 of the way between two bf16 neighbours of 1
    bits = quant.sr_bits(0, 0, 0, torch.arange(n), quant.LANE_PARAM)
    r = quant.round_bf16_stochastic(x, bits).double()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    err = abs(r.mean().item() - x[0].item())
    assert err < 4 * 2**-7 * 0.5 / math.sqrt(n)  # 4 sigma of a Bernoulli(3/8) mean, scaled by the ulp
    assert abs(x[0].to(torch.bfloat16).item() - x[0].item()) > 10 * err


# ------------------------------------------------------------------------------ against torchao
@pytest.mark.parametrize("fmt,ao_cls", [("8bit", "AdamW8bit"), ("4bit", "AdamW4bit")])
def test_trajectory_close_to_torchao(fmt, ao_cls, monkeypatch):
    """Same gradients into our kernel and torchao's optimizer . The schemes share
    block size and maps; they differ in the nearest-code tie rule (torchao: x - lo >= (hi - lo) / 2 in fp32;
    ours: fp32 midpoints), in v's update (torchao lerps g^2, ours is torch AdamW's addcmul) and in where
    the bias corrections enter. Tolerance: after 20 steps (gradient scale dropping 10x halfway) the two
    trajectories differ by under 1e-3 of the largest distance a param travelled, and each is as far from
    fp32 AdamW as the other."""
    ao = pytest.importorskip("torchao.optim")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    n, steps, lr, wd = 8192, 20, 1e-3, 0.01
    gen = torch.Generator().manual_seed(8)
    p0 = torch.randn(n, generator=gen) * 0.02
    ao_p = torch.nn.Parameter(p0.clone())
    opt = getattr(ao, ao_cls)([ao_p], lr=lr, betas=BETAS, eps=EPS, weight_decay=wd)
    segments = Segments([(0, n)])
    st = make_state(n, fmt, "fp32", torch.Generator().manual_seed(0))
    st["param"].copy_(p0)
    del st["param_lowp"], st["grad_sumsq"], st["grad_scale"]
    ref_p = p0.clone()
    ref_m, ref_v = torch.zeros(n), torch.zeros(n)
    for t in range(1, steps + 1):
        g = torch.randn(n, generator=gen) * (1.0 if t < steps // 2 else 0.1)
        ao_p.grad = g.clone()
        opt.step()
        hp = torch.tensor([[lr / (1 - BETAS[0] ** t), 1 - lr * wd, math.sqrt(1 - BETAS[1] ** t), 1.0, 0, t]],
                          dtype=torch.float64)
        step(st, g, segments, hp, fmt, "fp32", "cpu")
        adamw_packed_(ref_p, g, ref_m, ref_v, segments, hp[:, :4], beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                      backend="torch")
    travelled = (ref_p - p0).abs().max().item()
    ours_vs_ao = (st["param"] - ao_p.detach()).abs().max().item()
    ours_vs_fp32 = (st["param"] - ref_p).abs().max().item()
    ao_vs_fp32 = (ao_p.detach() - ref_p).abs().max().item()
    # measured: ours vs torchao ~1e-5 of the distance travelled; both ~4% (8-bit) / ~37% (4-bit) off fp32
    assert ours_vs_ao < 1e-3 * travelled, (ours_vs_ao, travelled)
    assert abs(ours_vs_fp32 - ao_vs_fp32) < 1e-3 * travelled, (ours_vs_fp32, ao_vs_fp32)
    assert ours_vs_fp32 > 0  # the quantized state really was used


# ------------------------------------------------------------------------------ validation
def test_bad_arguments_name_the_value():
    segments, n = layout([300])
    gen = torch.Generator().manual_seed(9)
    st = make_state(n, "8bit", "fp32", gen)
    del st["grad_sumsq"]
    hp = hparams([1], 1)
    g = torch.zeros(n)
    with pytest.raises(ValueError, match="'9bit'"):
        step(st, g, segments, hp, "9bit", "fp32", "cpu")
    with pytest.raises(ValueError, match="'sr'"):
        step(st, g, segments, hp, "8bit", "sr", "cpu")
    bad = dict(st, exp_avg_scale=torch.zeros(1))
    with pytest.raises(ValueError, match="exp_avg_scale"):
        step(bad, g, segments, hp, "8bit", "fp32", "cpu")
    with pytest.raises(ValueError, match="compensation is required"):
        step(dict(st, param=st["param"].bfloat16(), param_lowp=None), g, segments, hp, "8bit", "kahan", "cpu")
    with pytest.raises(ValueError, match="float32"):  # stochastic on an fp32 param
        step(dict(st, param_lowp=None), g, segments, hp, "8bit", "stochastic", "cpu")
    bf = make_state(n, "bf16", "fp32", gen)
    del bf["grad_sumsq"]
    with pytest.raises(ValueError, match=f"{N_COLS_LEAN} columns"):
        step(bf, g, segments, hp[:, :4], "bf16", "fp32", "cpu")
    with pytest.raises(ValueError, match="6-column hparams"):  # also without the checks
        adamw_packed_(bf["param"], g, bf["exp_avg"], bf["exp_avg_sq"], segments, hp[:, :4], beta1=0.9, beta2=0.999,
                      eps=EPS, backend="cpu", moments="bf16", check=False)
    before = {k: v.clone() for k, v in st.items()}
    with pytest.raises(ValueError, match="integers"):
        step(bf, g, segments, hp * torch.tensor([1, 1, 1, 1, 1, 0.5], dtype=torch.float64), "bf16", "fp32", "cpu")
    assert all(torch.equal(before[k], st[k]) for k in st)


def test_custom_op_opcheck_lean():
    """The torch.compile path (lisa_fused::adamw_segments) with lean arguments: schema, mutated buffers
    and fake implementation agree (torch.library.opcheck)."""
    if backend_unavailable_reason("cpu", "cpu"):
        pytest.skip(backend_unavailable_reason("cpu", "cpu"))
    from lisa_fused.kernels._tables import chunk_table

    segments, n = layout([1000, 77])
    gen = torch.Generator().manual_seed(11)
    st = make_state(n, "4bit", "kahan", gen)
    chunks = chunk_table(segments, native.CPU_CHUNK, "cpu")
    hp = hparams([1, 3], 2)
    hp[1, 3] = 1.0  # both enabled
    params = [st["param"][off:off + k].clone() for off, k in segments.bounds]  # separate tensors
    grads = [torch.randn(k, generator=gen) for _, k in segments.bounds]
    args = (params, grads, st["exp_avg"], st["exp_avg_sq"], [], None, chunks, segments.tensor(), hp, 0.9, 0.999, 1e-8)
    kwargs = dict(moments="4bit", master_weights="kahan", exp_avg_scale=st["exp_avg_scale"],
                  exp_avg_sq_scale=st["exp_avg_sq_scale"], compensation=st["compensation"],
                  grad_sumsq=st["grad_sumsq"][:2].clone(), seed=3)
    torch.library.opcheck(native.adamw_segments_op, args, kwargs)


@pytest.mark.parametrize("master", ["kahan", "stochastic"])
def test_master_free_bf16_keeps_small_updates(master):
    """Updates far below half a bf16 ulp: round to nearest loses them all, Kahan's p + c tracks the fp32
    master closely, stochastic rounding tracks it in the mean (Zamirai et al. 2020). 200 steps."""
    n, steps, lr = 4096, 200, 1e-5
    segments = Segments([(0, n)])
    gen = torch.Generator().manual_seed(12)
    p0 = (0.02 + 0.01 * torch.rand(n, generator=gen)).to(torch.bfloat16)  # typical weights: bf16 ulp 2^-13
    fp32 = {"param": p0.float()}
    lean = {"param": p0.clone()}
    for st in (fp32, lean):
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros(n), torch.zeros(n)
    if master == "kahan":
        lean["compensation"] = torch.zeros(n, dtype=torch.bfloat16)
    g = torch.full((n,), 1.0)  # constant gradient: Adam's step is ~lr = ulp / 12 every step
    for t in range(1, steps + 1):
        hp = torch.tensor([[lr / (1 - 0.9**t), 1.0, math.sqrt(1 - 0.999**t), 1.0, 0, t]], dtype=torch.float64)
        step(fp32, g, segments, hp[:, :4], "fp32", "fp32", "cpu")
        step(lean, g, segments, hp, "fp32", master, "cpu", seed=5)
    moved = (p0.float() - fp32["param"]).mean().item()
    assert moved == pytest.approx(steps * lr, rel=0.05)
    assert torch.equal((p0.float() - lr).to(torch.bfloat16), p0)  # round to nearest drops every step
    got = lean["param"].float() + (lean["compensation"].float() if master == "kahan" else 0.0)
    err = (got - fp32["param"]).abs()
    if master == "kahan":
        assert err.max().item() < 0.03 * moved  # bf16 compensation: its own rounding, ~1% per step
    else:
        assert abs((p0.float() - got).mean().item() - moved) < 0.1 * moved


@pytest.mark.parametrize("moments,master", MODES, ids=[f"{m}-{w}" for m, w in MODES])
def test_state_buffers_fit_the_kernel_and_state_bytes(moments, master):
    """quant.state_buffers allocates what the kernel checks accept; state_bytes counts the same bytes."""
    segments, n = layout(SIZES)
    pdtype = torch.float32 if master == "fp32" else torch.bfloat16
    bufs = quant.state_buffers(n, moments, master, pdtype, "cpu")
    param = torch.zeros(n, dtype=pdtype)
    adamw_packed_(param, torch.ones(n), segments=segments, hparams=hparams([1] * len(SIZES), len(SIZES)),
                  beta1=0.9, beta2=0.999, eps=EPS, backend="torch", moments=moments, master_weights=master, **bufs)
    nbytes = quant.state_bytes(n, moments, master, pdtype)
    assert sum(nbytes.values()) == sum(t.numel() * t.element_size() for t in bufs.values())
    assert nbytes["scales"] == sum(t.nbytes for k, t in bufs.items() if k.endswith("_scale"))
