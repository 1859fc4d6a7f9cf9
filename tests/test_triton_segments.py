"""The Triton kernels (kernels/triton_adamw.py, kernels/triton_lean.py) on the segment pointer table: which
path a chunk takes, and how their tables reach the device.

- Path: a chunk whose addresses (the segment's param / grad / lowp, the packed state at its index) are all
  16-byte aligned runs its full blocks unmasked (128-bit accesses on a GPU) and at most one masked block;
  a chunk with any misaligned address runs every block masked. Counted in the interpreter by wrapping the
  block functions the kernels call (`_update_block`, `_tile`; their last argument is MASKED); both paths
  give the same bits. A GPU would fault on a 128-bit access to a
  misaligned address; the interpreter would not, so these counts are the CPU's check of the decision.
- Tables (issue 29, item 3): every host->device table a launch builds (chunk table, hparams table,
  pointer table) goes through kernels/_tables.to_device (pinned staging, no host wait); nothing else in
  the launch moves a tensor to a device. The constant code tables (quant.kernel_table,
  triton_codes.code_tables) go through it too, once per process and device (cached).
"""
from __future__ import annotations

import math

import pytest
import torch

from lisa_fused import kernels
from lisa_fused.kernels import ALIGN, Segments, adamw_segments_, quant

from helpers import watch_transfers
from test_kernels import TEST_DEVICE, backend_param

TRITON = backend_param("triton")
pytestmark = TRITON.marks
BETAS, EPS = (0.9, 0.999), 1e-8
N = 3 * 2**14 + 5  # three full interpreter blocks (2^14) and a tail


def interpreted() -> bool:
    return kernels.triton_interpreted()


def offset_by(t: torch.Tensor, k: int, device=None) -> torch.Tensor:
    """A copy of `t` starting k elements into a new buffer on `device` (default t's; k = 0: a separate,
    aligned allocation). Copied in, not moved with .to (test_constant_tables_... watches those)."""
    buf = torch.zeros(t.numel() + k, dtype=t.dtype, device=device or t.device)
    buf[k:].copy_(t)
    return buf[k:]


def hparams(n_segments: int, lean: bool) -> torch.Tensor:
    rows = [[1e-3 / (1 - BETAS[0]), 1 - 1e-4, math.sqrt(1 - BETAS[1]), 1.0] + ([float(s), 1.0] if lean else [])
            for s in range(n_segments)]
    return torch.tensor(rows, dtype=torch.float64)


def run(moments, master, misalign: int, state_offset: int = 0):
    """One step on one segment of N elements whose param and grad (and bf16 copy, for fp32 masters) start
    `misalign` elements into their buffers, state at `state_offset`; -> the tensors it updated."""
    device = torch.device(TEST_DEVICE)
    gen = torch.Generator().manual_seed(1)
    pdtype = torch.float32 if master == "fp32" else torch.bfloat16
    total = state_offset + -(-N // ALIGN) * ALIGN
    st = quant.state_buffers(total, moments, master, pdtype, device)
    param = offset_by((torch.randn(N, generator=gen) * 0.1).to(pdtype), misalign, device)
    grad = offset_by((torch.randn(N, generator=gen) * 0.01).to(pdtype), misalign, device)
    lowps = [offset_by(param.to(torch.bfloat16), misalign)] if master == "fp32" else None
    lean = moments != "fp32" or master != "fp32"
    adamw_segments_([param], [grad], st.pop("exp_avg"), st.pop("exp_avg_sq"), Segments([(state_offset, N)]),
                    hparams(1, lean), beta1=BETAS[0], beta2=BETAS[1], eps=EPS, lowps=lowps, backend="triton",
                    moments=moments, master_weights=master, seed=5, **st)
    return [param] + (lowps or [])


def record_blocks(monkeypatch, module, name: str) -> list[bool]:
    """Replace the block function `name` of `module` by one that records its MASKED flag (last argument)."""
    calls: list[bool] = []
    original = getattr(module, name)

    def recording(*args):
        calls.append(bool(args[-1]))
        return original(*args)

    monkeypatch.setattr(module, name, recording)
    return calls


# (moments, master weights, module stem, block function, elements per masked block in the interpreter)
# (masked blocks: a quarter of the unmasked ones in the fp32 kernel, half in the lean one)
KERNELS = {"fp32": ("fp32", "fp32", "triton_adamw", "_update_block", 2**12),
           "lean-8bit": ("8bit", "fp32", "triton_lean", "_tile", 2**13),
           "lean-bf16-sr": ("bf16", "stochastic", "triton_lean", "_tile", 2**13)}


@pytest.mark.skipif(not interpreted(), reason="counts block calls in the Triton interpreter")
@pytest.mark.parametrize("misalign", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_alignment_picks_the_path(kernel, misalign, monkeypatch):
    moments, master, stem, fn, masked_block = KERNELS[kernel]
    import importlib

    module = importlib.import_module(f"lisa_fused.kernels.{stem}")
    calls = record_blocks(monkeypatch, module, fn)
    out = run(moments, master, misalign)
    if misalign:
        assert calls == [True] * -(-N // masked_block), f"{kernel}: a misaligned chunk ran unmasked blocks: {calls}"
    else:
        assert calls == [False] * 3 + [True], f"{kernel}: an aligned chunk: {calls}"
    monkeypatch.undo()
    other = run(moments, master, 1 - misalign)  # the other path: the same bits
    for a, b in zip(out, other):
        assert torch.equal(a.cpu(), b.cpu()), f"{kernel}: the masked and unmasked paths differ"


@pytest.mark.skipif(not interpreted(), reason="counts block calls in the Triton interpreter")
def test_unaligned_state_offset_takes_the_masked_path(monkeypatch):
    """fp32 state allows any segment offset: one not a multiple of 4 elements misaligns the moments."""
    from lisa_fused.kernels import triton_adamw

    calls = record_blocks(monkeypatch, triton_adamw, "_update_block")
    out = run("fp32", "fp32", 0, state_offset=2)
    assert calls == [True] * -(-N // 2**12), calls
    monkeypatch.undo()
    for a, b in zip(out, run("fp32", "fp32", 0)):
        assert torch.equal(a.cpu(), b.cpu()), "the masked and unmasked paths differ"


def test_launch_tables_reach_the_device_only_through_to_device(monkeypatch):
    """No Tensor.to / .cuda to a device in a launch of either kernel, outside _tables.to_device; each of
    the chunk, hparams and pointer tables goes through it once for a fresh layout (cached after)."""
    for moments, master in (("fp32", "fp32"), ("8bit", "fp32"), ("bf16", "stochastic")):
        run(moments, master, 0)  # warms the constant code tables (test_constant_tables_...)
    staged, moved = watch_transfers(monkeypatch)
    for moments, master in (("fp32", "fp32"), ("8bit", "fp32"), ("bf16", "stochastic")):
        device = torch.device(TEST_DEVICE)
        pdtype = torch.float32 if master == "fp32" else torch.bfloat16
        st = quant.state_buffers(3 * ALIGN, moments, master, pdtype, device)
        params = [torch.zeros(5, dtype=pdtype, device=device), torch.zeros(300, dtype=pdtype, device=device)]
        grads = [torch.ones_like(p) for p in params]
        segs = Segments([(0, 5), (ALIGN, 300)])
        lean = moments != "fp32" or master != "fp32"
        staged.clear()
        for _ in range(2):  # the second step reuses every table but the hparams
            adamw_segments_(params, grads, st.pop("exp_avg"), st.pop("exp_avg_sq"), segs, hparams(2, lean),
                            beta1=0.9, beta2=0.999, eps=1e-8, backend="triton", moments=moments,
                            master_weights=master, seed=1, **st)
            st = quant.state_buffers(3 * ALIGN, moments, master, pdtype, device)
        assert not moved, f"{moments}/{master}: tensors moved to a device outside _tables.to_device: {moved}"
        ncols = 6 if lean else 4
        assert sorted(staged) == sorted([(2, 3), (2, kernels.contract.N_SEG_COLS), (2, ncols), (2, ncols)]), (
            f"{moments}/{master}: tables through to_device: {staged}")


@pytest.mark.parametrize("moments", ["8bit", "4bit"])
def test_constant_tables_reach_the_device_through_to_device(moments, monkeypatch):
    """The code maps (quant.kernel_table, [4, 256] fp32) and the bucket tables (triton_codes.code_tables,
    int64) go through _tables.to_device on their first use per process and device, and are cached."""
    from lisa_fused.kernels import triton_codes

    quant._kernel_table.cache_clear()
    triton_codes._code_tables.cache_clear()
    staged, moved = watch_transfers(monkeypatch)
    run(moments, "fp32", 0)
    assert not moved, f"{moments}: tensors moved to a device outside _tables.to_device: {moved}"
    constant = [(4, 256), tuple(triton_codes._code_tables_cpu(moments).shape)]
    assert all(staged.count(shape) == 1 for shape in constant), f"{moments}: tables through to_device: {staged}"
    staged.clear()
    run(moments, "fp32", 0)
    assert not set(constant) & set(staged), f"{moments}: constant tables copied again: {staged}"


def test_fp32_kernel_refuses_lean_modes():
    from lisa_fused.kernels.triton_adamw import adamw_segments_triton_

    st = quant.state_buffers(ALIGN, "8bit", "fp32", torch.float32, TEST_DEVICE)
    with pytest.raises(ValueError, match="triton_lean"):
        adamw_segments_triton_([torch.zeros(4)], [torch.zeros(4)], st.pop("exp_avg"), st.pop("exp_avg_sq"),
                               Segments([(0, 4)]), hparams(1, False), beta1=0.9, beta2=0.999, eps=1e-8,
                               moments="8bit", **st)


def test_lean_kernel_refuses_unaligned_offsets_even_unchecked():
    """The lean tile addresses block scales from the chunk start: an offset off ALIGN raises before any
    launch, also with check=False (the packed state stays as it was)."""
    st = quant.state_buffers(2 * ALIGN, "8bit", "fp32", torch.float32, TEST_DEVICE)
    before = {k: v.clone() for k, v in st.items()}
    with pytest.raises(ValueError, match=f"multiple of ALIGN={ALIGN}"):
        adamw_segments_([torch.zeros(4, device=TEST_DEVICE)], [torch.ones(4, device=TEST_DEVICE)], st["exp_avg"],
                        st["exp_avg_sq"], Segments([(8, 4)]), hparams(1, True), beta1=0.9, beta2=0.999, eps=1e-8,
                        backend="triton", moments="8bit", check=False, exp_avg_scale=st["exp_avg_scale"],
                        exp_avg_sq_scale=st["exp_avg_sq_scale"])
    assert all(torch.equal(st[k], before[k]) for k in st)
