"""Smoke test of an installed lisa_fused wheel (run from outside the source tree, see .ci/run).

The wheel's own lisa_fused is imported (not a checkout), its _C holds the CUDA kernel (has_cuda) with no
dynamic libcudart, and one CPU AdamW step of the C++ kernel matches the pure-torch reference.
"""
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

import lisa_fused
import lisa_fused._C as C
from lisa_fused.kernels import Segments, adamw_packed_

site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert site in Path(lisa_fused.__file__).resolve().parents, f"imported {lisa_fused.__file__}, not the wheel in {site}"
assert C.has_cuda(), "the wheel's lisa_fused._C was built without its CUDA kernel"
deps = subprocess.run(["ldd", C.__file__], capture_output=True, text=True, check=True).stdout
assert "libcudart" not in deps, f"_C links libcudart dynamically:\n{deps}"

gen = torch.Generator().manual_seed(0)
n = 4097 + 64 * 3
segments = Segments([(0, 4097), (4160, 100)])
lr, wd, step = 1e-3, 0.1, 3
row = [lr / (1 - 0.9**step), 1 - lr * wd, math.sqrt(1 - 0.999**step), 1.0]
hparams = torch.tensor([row, row], dtype=torch.float64)
state = [torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.01, torch.rand(n, generator=gen) * 1e-4]
grad = torch.randn(n, generator=gen) * 0.1
out = {}
for backend in ("cpu", "torch"):
    p, m, v = (t.clone() for t in state)
    adamw_packed_(p, grad, m, v, segments, hparams, beta1=0.9, beta2=0.999, eps=1e-8, backend=backend)
    out[backend] = (p, m, v)
for name, a, b, before in zip(("param", "exp_avg", "exp_avg_sq"), out["cpu"], out["torch"], state):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda msg: f"{name}: {msg}")
    assert not torch.equal(a[:4097], before[:4097]), f"{name} did not change"
    assert torch.equal(a[4097:4160], before[4097:4160]), f"{name} changed in the gap between segments"
print(f"wheel smoke test OK: {lisa_fused.__file__}, _C CUDA={C.has_cuda()}, CPU ISA {C.cpu_kernel_isa()}, "
      f"torch {torch.__version__}, python {sys.version.split()[0]}")
