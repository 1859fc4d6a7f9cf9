"""The native build: lisa_fused._C imports, holds the CUDA kernel when a CUDA toolkit was there to build
it, and needs no libcudart at run time (the CUDA runtime is linked statically)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def nvcc_path() -> Path:
    """Where setup.py looks for nvcc (never the `nvcc` on PATH, which may be a wrapper)."""
    return Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "bin" / "nvcc"


@pytest.fixture(scope="module")
def C():
    if env_flag("LISA_FUSED_SKIP_NATIVE"):
        pytest.skip("LISA_FUSED_SKIP_NATIVE=1: built without the native extension")
    try:
        import lisa_fused._C as C
    except ImportError as exc:
        pytest.fail(f"lisa_fused._C does not import ({exc}); build it with `pip install -e .` "
                    f"(a plain `pip install .` puts it in site-packages, shadowed by a source checkout on sys.path)")
    return C


def test_native_module_imports(C):
    assert callable(C.adamw_cpu) and callable(C.adamw_cuda)


@pytest.mark.skipif(env_flag("LISA_FUSED_SKIP_CUDA"), reason="LISA_FUSED_SKIP_CUDA=1")
@pytest.mark.skipif(not nvcc_path().is_file(), reason=f"no CUDA toolkit ({nvcc_path()} missing)")
def test_built_with_cuda_when_nvcc_exists(C):
    assert C.has_cuda(), f"{nvcc_path()} exists but lisa_fused._C was built without its CUDA kernel"


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_no_dynamic_cudart(C):
    if not C.has_cuda():
        pytest.skip("built without CUDA")
    deps = subprocess.run(["ldd", C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in deps, deps
