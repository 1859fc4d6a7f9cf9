"""The segment-table contract (kernels/contract.py): params and grads stay where they live.

Every backend updates params given as their own tensors (separate allocations of odd sizes, slices of a
shared buffer at odd element offsets so that no 16-byte alignment holds, a transposed 2-D param and a
non-contiguous grad through the slow path) with the state packed at each segment's offset, and must be
bit for bit what the same backend computes on the packed form (`adamw_packed_`, itself checked against
the reference and torch.optim.AdamW in test_kernels.py / test_lean_kernels.py) over several steps, in
every state format: params, low-precision copies, moments, scales, compensation, grad_sumsq. A disabled
segment (grad None) stays bitwise untouched, and no byte outside a segment's tensors is written.
"""
from __future__ import annotations

import math

import pytest
import torch

from lisa_fused import kernels
from lisa_fused.kernels import ALIGN, Segments, adamw_packed_, adamw_segments_, quant
from lisa_fused.kernels.contract import N_COLS_LEAN

from test_kernels import ALL, backend_device

BETAS, EPS = (0.9, 0.999), 1e-8
# (moments, master_weights, param dtype, grad dtype, lowp dtype, grad_scale, grad_sumsq)
MODES = {
    "fp32": ("fp32", "fp32", torch.float32, torch.float32, None, None, False),
    "fp32-bf16copy": ("fp32", "fp32", torch.float32, torch.bfloat16, torch.bfloat16, None, False),
    "fp32-fp16copy-scaled": ("fp32", "fp32", torch.float32, torch.float16, torch.float16, 512.0, False),
    "8bit": ("8bit", "fp32", torch.float32, torch.float32, None, None, False),
    "4bit-kahan": ("4bit", "kahan", torch.bfloat16, torch.bfloat16, None, None, False),
    "fp32-kahan-fp16": ("fp32", "kahan", torch.float16, torch.float16, None, None, False),
    "bf16-stochastic": ("bf16", "stochastic", torch.bfloat16, torch.bfloat16, None, None, False),
    "8bit-stochastic-sumsq": ("8bit", "stochastic", torch.bfloat16, torch.bfloat16, None, None, True),
}
SIZES = [4097, 1, 300, 3 * 2**14 + 5, 129]
DISABLED = 1  # segment index whose grad is None
STEPS = 3


def packed_bounds(sizes) -> Segments:
    bounds, off = [], 0
    for n in sizes:
        bounds.append((off, n))
        off += -(-n // ALIGN) * ALIGN
    return Segments(bounds)


def hparams(steps, lean: bool) -> torch.Tensor:
    rows = []
    for s, step in enumerate(steps):
        lr, wd = 1e-3 * (1 + s), (0.0, 0.1, 0.5)[s % 3]
        rows.append([lr / (1 - BETAS[0] ** step), 1 - lr * wd, math.sqrt(1 - BETAS[1] ** step),
                     0.0 if s == DISABLED else 1.0] + ([float(s), float(step)] if lean else []))
    return torch.tensor(rows, dtype=torch.float64)


def state(total, moments, master, pdtype, device):
    return quant.state_buffers(total, moments, master, pdtype, device)


def scattered(values, dtype, device, shift: int, gen):
    """`values` (flat tensors) copied into one shared buffer at odd element offsets (`shift` elements of
    random filler before each), so their addresses are not 16-byte aligned: (views, buffer)."""
    total = sum(v.numel() + shift for v in values)
    buf = torch.randn(total, generator=gen).to(dtype).to(device)
    views, off = [], 0
    for v in values:
        off += shift
        views.append(buf[off:off + v.numel()])
        views[-1].copy_(v)
        off += v.numel()
    return views, buf


def run_case(backend, mode, layout):
    """(packed run, segment run): each a dict of the tensors to compare, after STEPS steps."""
    moments, master, pdtype, gdtype, ldtype, scale, sumsq = MODES[mode]
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(7 + len(mode))
    segs = packed_bounds(SIZES)
    total = segs.bounds[-1][0] + -(-segs.bounds[-1][1] // ALIGN) * ALIGN
    p0 = [torch.randn(n, generator=gen) for n in SIZES]
    lean = quant.FORMAT_CODE[moments] != 0 or master != "fp32" or sumsq
    grad_scale = None if scale is None else torch.tensor([scale], device=device)

    # packed form: param / grad / param_lowp as flat buffers
    pk_param = torch.zeros(total, dtype=pdtype if master != "fp32" else torch.float32, device=device)
    for (off, n), v in zip(segs.bounds, p0):
        pk_param[off:off + n] = v.to(pk_param.dtype)
    pk_low = None if ldtype is None else pk_param.to(ldtype)
    pk_state = state(total, moments, master, pdtype, device)
    pk_sumsq = torch.zeros(len(SIZES), device=device) if sumsq else None

    # segment form: separate / scattered / non-contiguous tensors with the same values
    sg_state = state(total, moments, master, pdtype, device)
    sg_sumsq = torch.zeros(len(SIZES), device=device) if sumsq else None
    pvals = [v.to(pk_param.dtype) for v in p0]
    if layout == "separate":
        sg_params = [v.clone().to(device) for v in pvals]
        keep = None
    elif layout == "misaligned":
        sg_params, keep = scattered(pvals, pk_param.dtype, device, 1, gen)
    else:  # "noncontiguous": segment 0 is a transposed [17, 241] view (4097 elements)
        sg_params = [v.clone().to(device) for v in pvals]
        keep = sg_params[0].view(241, 17).t().contiguous().t()  # same logical order, column-major storage
        keep.copy_(sg_params[0].view(241, 17))
        sg_params[0] = keep
    sg_lows = None if ldtype is None else [p.to(ldtype) for p in sg_params]
    filler_before = None if layout != "misaligned" else keep.clone()

    steps = [1 + 5 * s for s in range(len(SIZES))]
    for _ in range(STEPS):
        g = [(torch.randn(n, generator=gen) * 0.1 * (scale or 1.0)).to(gdtype) for n in SIZES]
        hp = hparams(steps, lean)
        pk_grad = torch.zeros(total, dtype=gdtype, device=device)
        for (off, n), gi in zip(segs.bounds, g):
            pk_grad[off:off + n] = gi.to(device)
        common = dict(beta1=BETAS[0], beta2=BETAS[1], eps=EPS, grad_scale=grad_scale, backend=backend,
                      moments=moments, master_weights=master, seed=99,
                      **{k: v for k, v in pk_state.items() if k not in ("exp_avg", "exp_avg_sq")})
        adamw_packed_(pk_param, pk_grad, pk_state["exp_avg"], pk_state["exp_avg_sq"], segs, hp,
                      param_lowp=pk_low, grad_sumsq=pk_sumsq, **common)
        if layout == "misaligned":
            sg_grads, _ = scattered(g, gdtype, device, 3, gen)
        else:
            sg_grads = [gi.to(device) for gi in g]
        if layout == "noncontiguous":  # segment 3's grad as a strided view
            wide = torch.zeros(2 * SIZES[3], dtype=gdtype, device=device)
            wide[::2] = sg_grads[3]
            sg_grads[3] = wide[::2]
        sg_grads[DISABLED] = None
        common.update({k: v for k, v in sg_state.items() if k not in ("exp_avg", "exp_avg_sq")})
        adamw_segments_(sg_params, sg_grads, sg_state["exp_avg"], sg_state["exp_avg_sq"], segs, hp,
                        lowps=sg_lows, grad_sumsq=sg_sumsq, **common)
        steps = [s + 1 for s in steps]
    packed = {f"param[{s}]": pk_param[off:off + n] for s, (off, n) in enumerate(segs.bounds)}
    seg = {f"param[{s}]": sg_params[s].reshape(-1) for s in range(len(SIZES))}
    if pk_low is not None:
        packed.update({f"lowp[{s}]": pk_low[off:off + n] for s, (off, n) in enumerate(segs.bounds)})
        seg.update({f"lowp[{s}]": sg_lows[s].reshape(-1) for s in range(len(SIZES))})
    packed.update(pk_state)
    seg.update(sg_state)
    return packed, seg, (pk_sumsq, sg_sumsq), (keep, filler_before, p0, pvals, sg_params)


@pytest.mark.parametrize("layout", ["separate", "misaligned", "noncontiguous"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ALL)
def test_segments_equal_the_packed_form(backend, mode, layout):
    packed, seg, (pk_sumsq, sg_sumsq), (keep, filler_before, p0, pvals, sg_params) = run_case(backend, mode, layout)
    for key in packed:
        a, b = seg[key].cpu(), packed[key].cpu()
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), \
            f"{backend} {mode} {layout}: {key} differs from the packed form"
    if pk_sumsq is not None:
        torch.testing.assert_close(sg_sumsq.cpu(), pk_sumsq.cpu(), rtol=1e-5, atol=0)
        assert sg_sumsq[DISABLED].item() == 0.0
    # the disabled segment kept its value; every other segment moved
    assert torch.equal(sg_params[DISABLED].reshape(-1).cpu(), pvals[DISABLED]), "disabled segment changed"
    for s in range(len(SIZES)):
        if s != DISABLED:
            assert not torch.equal(sg_params[s].reshape(-1).cpu(), pvals[s]), f"segment {s} did not move"


@pytest.mark.parametrize("backend", ALL)
def test_misaligned_segments_write_nothing_outside(backend):
    """Params at odd offsets of one buffer with sentinels between them: the sentinels stay as they were."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    sizes = [5, 4099, 33, 2**16 + 7]
    segs = packed_bounds(sizes)
    total = segs.bounds[-1][0] + -(-sizes[-1] // ALIGN) * ALIGN
    buf = torch.full((sum(sizes) + 2 * len(sizes) + 1,), 12345.0, device=device)
    params, off = [], 1
    for n in sizes:
        params.append(buf[off:off + n])
        params[-1].copy_(torch.randn(n, generator=gen))
        off += n + 2
    grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
    st = state(total, "fp32", "fp32", torch.float32, device)
    hp = torch.tensor([[1e-3, 1.0, 0.03, 1.0]] * len(sizes), dtype=torch.float64)
    adamw_segments_(params, grads, st["exp_avg"], st["exp_avg_sq"], segs, hp, beta1=0.9, beta2=0.999, eps=1e-8,
                    backend=backend)
    mask = torch.ones_like(buf, dtype=torch.bool)
    off = 1
    for n in sizes:
        mask[off:off + n] = False
        off += n + 2
    assert torch.all(buf[mask] == 12345.0), "a byte outside the segments' tensors was written"


def test_segment_errors_name_the_segment():
    segs = Segments([(0, 4), (256, 3)])
    st = state(512, "fp32", "fp32", torch.float32, "cpu")
    hp = torch.tensor([[1e-3, 1.0, 0.1, 1.0]] * 2, dtype=torch.float64)
    p, g = [torch.zeros(4), torch.zeros(3)], [torch.zeros(4), torch.zeros(3)]
    run = lambda params, grads, **kw: adamw_segments_(params, grads, st["exp_avg"], st["exp_avg_sq"], segs,  # noqa
                                                      kw.pop("hp", hp), beta1=0.9, beta2=0.999, eps=1e-8, **kw)
    with pytest.raises(ValueError, match=r"params\[1\] has 2 elements, segment 1 has 3"):
        run([p[0], torch.zeros(2)], g)
    with pytest.raises(ValueError, match=r"grads\[1\] is None but segment 1 is enabled"):
        run(p, [g[0], None])
    with pytest.raises(ValueError, match=r"grads mix dtypes"):
        run(p, [g[0], g[1].bfloat16()])
    with pytest.raises(ValueError, match=r"params\[0\] is torch.bfloat16"):
        run([p[0].bfloat16(), p[1]], g)
    with pytest.raises(ValueError, match=r"grads has 1 entries for 2 segments"):
        run(p, g[:1])
    with pytest.raises(ValueError, match="lowps=None"):
        run([t.bfloat16() for t in p], g, lowps=[t.bfloat16() for t in p], master_weights="kahan",
            compensation=torch.zeros(512, dtype=torch.bfloat16))
    disabled = hp.clone()
    disabled[1, 3] = 0.0
    before = p[1].clone()
    run(p, [g[0], None], hp=disabled)  # a disabled segment may come without its grad
    assert torch.equal(p[1], before)
    with pytest.raises(ValueError, match=f"{N_COLS_LEAN} columns"):
        run([t.bfloat16() for t in p], [t.bfloat16() for t in g], master_weights="stochastic")


def test_pointer_table_is_reused_while_pointers_stay():
    """The native backends' device table is rebuilt only when an address changes (cheap per step)."""
    from lisa_fused.kernels import _tables

    segs = Segments([(0, 4), (256, 3)])
    p, g = [torch.zeros(4), torch.zeros(3)], [torch.ones(4), torch.ones(3)]
    t1 = _tables.pointer_table(segs, p, g, None, torch.device("cpu"))
    assert _tables.pointer_table(segs, p, g, None, torch.device("cpu")) is t1
    g2 = [torch.ones(4), g[1]]
    t2 = _tables.pointer_table(segs, p, g2, None, torch.device("cpu"))
    assert t2 is not t1 and t2[0, 3].item() == g2[0].data_ptr() and t2[1, 3].item() == g[1].data_ptr()
    assert t2[:, 0].tolist() == [0, 256] and t2[:, 1].tolist() == [4, 3] and t2[:, 4].tolist() == [0, 0]
    assert kernels.contract.N_SEG_COLS == t2.shape[1]
