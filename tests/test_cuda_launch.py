"""The CUDA launch path around the kernel (kernels/native.py, csrc/bindings.cpp), checked where a CPU can
see it (issue 29): which GPUs backend="auto" hands to the CUDA kernel (a mocked compute capability), the
device guard a launch runs under, the chunk-size bound of the kernel's 32-bit offsets, and that every
host->device table of a launch goes through _tables.to_device (pinned staging, no host wait). The
GPU-side checks (a launch under a busy stream returns at once; no context on another GPU) are the `gpu`
tests at the end, run by benchmarks/gpu_check.sh.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re

import pytest
import torch

from lisa_fused import kernels
from lisa_fused.kernels import ALIGN, Segments, _tables, adamw_segments_, native, quant

from helpers import watch_transfers

BETAS, EPS = (0.9, 0.999), 1e-8


# ------------------------------------------------------------------------------ capability rule
@pytest.mark.parametrize("capability,sass,ptx,runs", [
    ((8, 0), [80, 90], 90, True),
    ((8, 6), [80, 90], 90, True),     # sm_80 SASS runs on 8.6 / 8.9 (same major, higher minor)
    ((8, 9), [80, 90], None, True),
    ((9, 0), [80, 90], None, True),
    ((10, 0), [80, 90], 90, True),    # compute_90 PTX, compiled by the driver
    ((10, 0), [80, 90], None, False),  # sm_90 SASS does not run on another major
    ((12, 1), [80, 90, 100, 120], 120, True),
    ((10, 3), [80, 90, 100, 120], None, True),
    ((11, 0), [80, 90, 100, 120], 120, False),  # PTX runs only on its own and later architectures
    ((7, 5), [80, 90], 90, False),    # T4
    ((7, 0), [80, 90, 100, 120], 120, False),  # V100
])
def test_capability_rule(capability, sass, ptx, runs):
    reason = native.arch_reason(capability, "Some GPU (cuda:1)", sass, ptx)
    assert (reason is None) == runs, reason
    if not runs:
        major, minor = capability
        assert f"Some GPU (cuda:1), compute capability {major}.{minor}" in reason
        assert "Triton" in reason and f"LISA_FUSED_CUDA_ARCHS naming {major}{minor}" in reason
        assert ", ".join(f"sm_{a}" for a in sass) in reason


class FakeC:
    """lisa_fused._C as a CUDA build for sm_80, sm_90 and compute_90 PTX would answer."""

    def __init__(self, archs=None):
        self.archs = archs if archs is not None else {"sass": [80, 90], "ptx": 90}
        self.calls = []

    def has_cuda(self):
        return True

    def cuda_unavailable_reason(self):
        return None

    def cuda_archs(self):
        return self.archs

    def adamw_cuda(self, **kwargs):
        self.calls.append(kwargs)


@pytest.fixture
def gpu_of(monkeypatch):
    """gpu_of(capability, name): torch sees one GPU of that compute capability; lisa_fused._C is FakeC."""
    def make(capability, name, archs=None):
        fake = FakeC(archs)
        monkeypatch.setattr(native, "_C", fake)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        native._cuda_runtime_reason.cache_clear()
        native._device_arch_reason.cache_clear()
        kernels._warned_fallbacks.clear()
        return fake

    yield make
    native._cuda_runtime_reason.cache_clear()
    native._device_arch_reason.cache_clear()
    kernels._warned_fallbacks.clear()


def test_auto_skips_cuda_on_a_gpu_the_build_has_no_code_for(gpu_of, monkeypatch, caplog):
    from lisa_fused.kernels import triton_adamw

    gpu_of((7, 5), "Tesla T4")
    monkeypatch.setattr(triton_adamw, "unavailable_reason", lambda device: None)  # Triton runs there
    with caplog.at_level(logging.WARNING, logger="lisa_fused.kernels"):
        assert kernels.resolve_backend("auto", torch.device("cuda:0")) == "triton"
    (record,) = [r for r in caplog.records if "Tesla T4" in r.getMessage()]
    assert "uses 'triton', not 'cuda'" in record.getMessage() and "compute capability 7.5" in record.getMessage()
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: .*Tesla T4 \(cuda:0\), compute "
                                           r"capability 7\.5.*sm_80, sm_90, compute_90 PTX"):
        kernels.resolve_backend("cuda", torch.device("cuda:0"))


def test_auto_picks_cuda_where_the_build_has_code(gpu_of):
    gpu_of((8, 6), "NVIDIA A10")
    assert kernels.resolve_backend("auto", torch.device("cuda:0")) == "cuda"
    gpu_of((12, 0), "NVIDIA RTX PRO 6000")  # compute_90 PTX: the driver compiles it
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "cuda"


def test_an_old_build_that_cannot_say_its_architectures_is_not_used(gpu_of, monkeypatch):
    fake = gpu_of((9, 0), "NVIDIA H100")
    monkeypatch.delattr(FakeC, "cuda_archs")
    assert fake is native._C
    assert "rebuild it" in native.unavailable_reason("cuda", torch.device("cuda:0"))


# ------------------------------------------------------------------------------ device guard, chunk bound
def test_cuda_launch_runs_under_the_tensors_device(monkeypatch):
    """The extension launches on the current device and never switches itself (switching back could
    create a context on the previous GPU): native enters torch's device guard for the tensors' device."""
    current = [0]
    seen = []

    @contextlib.contextmanager
    def guard(device):
        before, current[0] = current[0], torch.device(device).index
        try:
            yield
        finally:
            current[0] = before

    class Stream:
        cuda_stream = 1234

    fake = FakeC()
    fake.adamw_cuda = lambda **kw: seen.append((current[0], kw["device"], kw["stream"]))
    monkeypatch.setattr(torch.cuda, "device", guard)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    native._call_cuda(fake, {}, torch.device("cuda:1"))
    assert seen == [(1, 1, 1234)] and current[0] == 0


def test_cuda_chunk_bound_is_checked_before_anything_runs(monkeypatch):
    """The lean kernel's offsets within a chunk are 32-bit (a thread's first code bit, offset * 8, must fit):
    CUDA_CHUNK at or over CUDA_MAX_CHUNK raises naming the bound, on any machine."""
    from lisa_fused import _C

    assert native.CUDA_MAX_CHUNK == _C.CUDA_MAX_CHUNK  # csrc/adamw.h kCudaMaxChunk
    assert native.CUDA_CHUNK < native.CUDA_MAX_CHUNK and (native.CUDA_MAX_CHUNK + 2048) * 8 < 2**31
    monkeypatch.setattr(native, "CUDA_CHUNK", native.CUDA_MAX_CHUNK)
    p, g = torch.zeros(4), torch.ones(4)
    st = quant.state_buffers(ALIGN, "8bit", "fp32", torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"CUDA chunks must hold 1 to {native.CUDA_MAX_CHUNK - 1} elements.*got "
                                         f"{native.CUDA_MAX_CHUNK}"):
        native.adamw_segments_cuda_([p], [g], st.pop("exp_avg"), st.pop("exp_avg_sq"), Segments([(0, 4)]),
                                    hparams(1, True), beta1=0.9, beta2=0.999, eps=1e-8, moments="8bit", **st)
    assert torch.equal(p, torch.zeros(4))


# ------------------------------------------------------------------------------ tables through to_device
def hparams(n_segments: int, lean: bool) -> torch.Tensor:
    rows = [[1e-3 / (1 - BETAS[0]), 1 - 1e-4, math.sqrt(1 - BETAS[1]), 1.0] + ([float(s), 1.0] if lean else [])
            for s in range(n_segments)]
    return torch.tensor(rows, dtype=torch.float64)


MODES = [("fp32", "fp32"), ("8bit", "fp32"), ("4bit", "kahan"), ("bf16", "stochastic")]


def launch_inputs(moments, master):
    pdtype = torch.float32 if master == "fp32" else torch.bfloat16
    st = quant.state_buffers(3 * ALIGN, moments, master, pdtype, "cpu")
    params = [torch.zeros(5, dtype=pdtype), torch.zeros(300, dtype=pdtype)]
    grads = [torch.ones_like(p) for p in params]
    return params, grads, st, Segments([(0, 5), (ALIGN, 300)])


@pytest.mark.parametrize("moments,master", MODES)
def test_cuda_launch_tables_go_through_to_device(moments, master, monkeypatch):
    """The CUDA branch of a launch (native._run / _launch with backend "cuda", the extension replaced by a
    recorder, CPU tensors standing in for device ones): the chunk, pointer and hparams tables and the code
    table go through to_device, nothing else moves a tensor to a device, and a second step with the same
    tensors re-sends only the hparams (the others are cached)."""
    fake = FakeC()
    monkeypatch.setattr(native, "_require", lambda backend, device=None: fake)
    monkeypatch.setattr(native, "_call_cuda", lambda C, args, device: C.adamw_cuda(**args))
    quant._kernel_table.cache_clear()
    params, grads, st, segs = launch_inputs(moments, master)
    lean = moments != "fp32" or master != "fp32"
    sent = []
    staged, moved = watch_transfers(monkeypatch)
    for _ in range(2):
        run_as_cuda(monkeypatch, params, grads, st, segs, lean, moments, master)
        sent.append(list(staged))
        staged.clear()
    quant._kernel_table.cache_clear()
    assert not moved, f"{moments}/{master}: tensors moved to a device outside _tables.to_device: {moved}"
    ncols = 6 if lean else 4
    first = [(2, 3), (2, kernels.contract.N_SEG_COLS), (2, ncols)] + ([(4, 256)] if moments in quant.BLOCK else [])
    assert sorted(sent[0]) == sorted(first), f"{moments}/{master}: first step sent {sent[0]}"
    assert sent[1] == [(2, ncols)], f"{moments}/{master}: second step sent {sent[1]}"
    assert len(fake.calls) == 2 and fake.calls[0]["n_chunks"] == 2


def run_as_cuda(monkeypatch, params, grads, st, segs, lean, moments, master):
    """native._run("cuda", ...) on CPU tensors: the device-type check is the one thing skipped."""
    with monkeypatch.context() as m:
        m.setattr(native, "_check_device", lambda backend, device: None, raising=True)
        native._run("cuda", native.CUDA_CHUNK, params, grads, st["exp_avg"], st["exp_avg_sq"], segs,
                    hparams(2, lean), beta1=0.9, beta2=0.999, eps=1e-8, moments=moments, master_weights=master,
                    exp_avg_scale=st.get("exp_avg_scale"), exp_avg_sq_scale=st.get("exp_avg_sq_scale"),
                    compensation=st.get("compensation"), seed=1)


@pytest.mark.parametrize("moments,master", MODES)
def test_cpu_launch_moves_no_tensor_outside_to_device(moments, master, monkeypatch):
    """The same launch code on the native CPU kernel, for real: nothing outside to_device moves a tensor."""
    from lisa_fused import _C  # noqa: F401  (the CPU kernel must be built)

    params, grads, st, segs = launch_inputs(moments, master)
    lean = moments != "fp32" or master != "fp32"
    staged, moved = watch_transfers(monkeypatch)
    adamw_segments_(params, grads, st.pop("exp_avg"), st.pop("exp_avg_sq"), segs, hparams(2, lean),
                    beta1=0.9, beta2=0.999, eps=1e-8, backend="cpu", moments=moments, master_weights=master,
                    seed=1, **st)
    assert not moved, f"{moments}/{master}: {moved}"
    assert all(not torch.equal(p, torch.zeros_like(p)) for p in params), "the step changed nothing"


def test_no_launch_module_moves_tensors_to_a_device_by_itself():
    """Source check of the kernels package's host code: no `.to(<device>)`, `.cuda()` or `torch.tensor(...,
    device=...)` outside _tables.to_device (a copy from pageable memory makes the host wait for the
    stream, which after a switch waits for the page-in). Triton jit code (`x.to(tl.float32)`) is not host
    code; `torch.zeros/empty/arange(..., device=)` allocate on the device and copy nothing."""
    import ast
    import inspect

    from lisa_fused.kernels import contract, reference

    offenders = []
    for module in (native, _tables, quant, contract, reference, kernels):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            where = f"{module.__name__}:{node.lineno}"
            text = ast.unparse(node)
            if name == "cuda":
                offenders.append((where, text))
            elif name in ("tensor", "as_tensor") and any(k.arg == "device" for k in node.keywords):
                offenders.append((where, text))
            elif name == "to" and (any(k.arg == "device" for k in node.keywords) or any(
                    re.search(r"device|dev\b", ast.unparse(a)) for a in node.args)):
                if not (module is _tables and "staged.to(" in text):
                    offenders.append((where, text))
    assert not offenders, f"host->device copies outside _tables.to_device: {offenders}"


# ------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("moments,master", MODES)
def test_launch_returns_while_the_stream_is_busy(backend, moments, master):
    """A full launch (fresh layout: every table built and sent) behind ~1 s of GPU work on the current
    stream returns before that work ends: no table came from pageable memory, nothing synchronized."""
    reason = kernels.backend_unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    pdtype = torch.float32 if master == "fp32" else torch.bfloat16
    st = quant.state_buffers(3 * ALIGN, moments, master, pdtype, "cuda")
    params = [torch.zeros(5, dtype=pdtype, device="cuda"), torch.zeros(300, dtype=pdtype, device="cuda")]
    grads = [torch.ones_like(p) for p in params]
    lean = moments != "fp32" or master != "fp32"
    quant._kernel_table.cache_clear()  # the code table too
    torch.cuda.synchronize()
    done = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time on the current stream
    done.record()
    adamw_segments_(params, grads, st.pop("exp_avg"), st.pop("exp_avg_sq"), Segments([(0, 5), (ALIGN, 300)]),
                    hparams(2, lean), beta1=0.9, beta2=0.999, eps=1e-8, backend=backend, moments=moments,
                    master_weights=master, seed=1, **st)
    assert not done.query(), f"{backend} {moments}/{master}: the host waited for the stream"
    torch.cuda.synchronize()
    assert all(not torch.equal(p, torch.zeros_like(p)) for p in params)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_launch_on_the_second_gpu_creates_no_context_on_the_first():
    """From a fresh thread (no current context), a launch on cuda:1 leaves cuda:0's primary context
    inactive (driver API cuDevicePrimaryCtxGetState through ctypes) when nothing else used cuda:0."""
    import ctypes
    import threading

    libcuda = ctypes.CDLL("libcuda.so.1")

    def active(ordinal: int) -> bool:
        dev, flags, on = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        assert libcuda.cuDeviceGet(ctypes.byref(dev), ordinal) == 0
        assert libcuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(on)) == 0
        return bool(on.value)

    if active(0):
        pytest.skip("cuda:0 already has a primary context in this process (run this test alone)")
    errors = []

    def work():
        try:
            p = torch.zeros(300, device="cuda:1")
            st = quant.state_buffers(ALIGN, "fp32", "fp32", torch.float32, "cuda:1")
            adamw_segments_([p], [torch.ones_like(p)], st["exp_avg"], st["exp_avg_sq"], Segments([(0, 300)]),
                            hparams(1, False), beta1=0.9, beta2=0.999, eps=1e-8, backend="cuda")
            torch.cuda.synchronize(1)
        except Exception as exc:  # reported in the main thread
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    assert not active(0), "a launch on cuda:1 created a context on cuda:0"
