"""The native build: lisa_fused._C imports, holds the CUDA kernel when a CUDA toolkit was there to build
it, and needs no libcudart at run time (the CUDA runtime is linked statically); setup.py's choice of
toolkit (CUDA_HOME, the nvcc on PATH behind a wrapper, the one matching torch's CUDA) as pure functions."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def load_setup():
    """setup.py as a module (its setup() call runs only as __main__); needs pybind11 and setuptools."""
    pytest.importorskip("pybind11", reason="setup.py imports pybind11 (pip install pybind11)")
    spec = importlib.util.spec_from_file_location("lisa_fused_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup_py():
    return load_setup()


def build_toolkit():
    """The toolkit setup.py would pick in this environment (None: CPU kernel only)."""
    if env_flag("LISA_FUSED_SKIP_CUDA") or importlib.util.find_spec("pybind11") is None:
        return None
    return load_setup().find_cuda_toolkit()


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


def test_built_with_cuda_when_nvcc_exists(C):
    toolkit = build_toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit for setup.py (or LISA_FUSED_SKIP_CUDA=1, or no pybind11 to ask it)")
    assert C.has_cuda(), f"{toolkit.why}, but lisa_fused._C was built without its CUDA kernel"


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_no_dynamic_cudart(C):
    if not C.has_cuda():
        pytest.skip("built without CUDA")
    deps = subprocess.run(["ldd", C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in deps, deps


# ------------------------------------------------------------------------------ toolkit selection
def fake_toolkit(base: Path, name: str) -> Path:
    root = base / name
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return root


def test_nvcc_facts_sees_through_a_wrapper(setup_py, tmp_path):
    real = fake_toolkit(tmp_path, "cuda-12.8")
    wrapper = tmp_path / "wrapper" / "nvcc"  # e.g. /usr/local/bin/nvcc: exec /usr/local/cuda-12.8/bin/nvcc "$@"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\n")

    def run(cmd, **_):
        out = {"--version": "Cuda compilation tools, release 12.8, V12.8.93",
               "--dryrun": f"#$ _HERE_={real}/bin\n#$ TOP={real}/bin/..\n#$ CICC_PATH={real}/nvvm/bin"}[cmd[1]]
        return types.SimpleNamespace(stdout="", stderr=out)

    assert setup_py.nvcc_facts(str(wrapper), run=run) == (real.resolve(), "12.8")

    def silent(cmd, **_):  # an nvcc that prints no TOP: the toolkit two levels above the resolved path
        return types.SimpleNamespace(stdout="release 13.0," if cmd[1] == "--version" else "", stderr="")

    assert setup_py.nvcc_facts(str(real / "bin" / "nvcc"), run=silent) == (real.resolve(), "13.0")
    assert setup_py.nvcc_facts(str(wrapper), run=silent) == (None, "13.0")  # no toolkit around the wrapper


def test_torch_cuda_version_without_importing_torch(setup_py, tmp_path, monkeypatch):
    pkg = tmp_path / "torch"
    pkg.mkdir()
    spec = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(setup_py.importlib.util, "find_spec", lambda name: spec if name == "torch" else None)
    (pkg / "version.py").write_text("__version__ = '2.11.0+cu128'\ncuda: Optional[str] = '12.8'\nhip = None\n")
    assert setup_py.torch_cuda_version() == "12.8"
    (pkg / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    assert setup_py.torch_cuda_version() is None
    (pkg / "version.py").unlink()  # no version.py: the wheel's local version tag
    monkeypatch.setattr(setup_py.importlib.metadata, "version", lambda name: "2.11.0+cu126")
    assert setup_py.torch_cuda_version() == "12.6"


def test_toolkit_choice(setup_py, tmp_path):
    cu13, cu128 = fake_toolkit(tmp_path, "cuda-13.0"), fake_toolkit(tmp_path, "cuda-12.8")
    versions = {cu13: "13.0", cu128: "12.8"}

    def facts(nvcc):
        root = Path(nvcc).parent.parent
        return root, versions[root]

    def find(environ=None, torch_cuda=None, which=lambda name: str(cu13 / "bin" / "nvcc")):
        return setup_py.find_cuda_toolkit(environ=environ or {}, which=which, facts=facts,
                                          torch_cuda=lambda: torch_cuda, search=(str(tmp_path / "cuda-*"),))

    assert find().root == cu13 and "nvcc on PATH" in find().why  # no torch CUDA: PATH first
    assert find(torch_cuda="12.8").root == cu128  # the toolkit matching torch wins over PATH
    assert find(torch_cuda="12.6").root == cu128  # same major
    other = find(torch_cuda="11.8")
    assert other.root == cu13 and "no toolkit matches torch's CUDA 11.8" in other.why
    assert find(which=lambda name: None).root == cu13  # no PATH nvcc: newest under the search pattern
    assert find({"CUDA_HOME": str(cu128)}).root == cu128  # CUDA_HOME wins
    assert find({"CUDA_HOME": str(cu128)}, torch_cuda="13.0").why == "CUDA_HOME"
    assert find({"LISA_FUSED_SKIP_CUDA": "1"}) is None
    with pytest.raises(RuntimeError, match=f"CUDA_HOME={tmp_path / 'nope'} has no bin/nvcc.*LISA_FUSED_SKIP_CUDA"):
        find({"CUDA_HOME": str(tmp_path / "nope")})
    assert setup_py.find_cuda_toolkit(environ={}, which=lambda name: None, facts=facts, torch_cuda=lambda: None,
                                      search=(str(tmp_path / "none-*"),)) is None


# ------------------------------------------------------------------------------ nvcc flags, architectures
def test_nvcc_flags_forbid_contraction_and_keep_line_info(setup_py):
    """--fmad=false: no mul+add contracted into an FMA by nvcc, ptxas or the driver's JIT (every FMA of the
    kernels is an explicit fmaf); -lineinfo for compute-sanitizer. The offline sm_90 count compiles with the
    same flags (benchmarks/kernel_builds.py reads them from setup.py)."""
    import sys

    assert "--fmad=false" in setup_py.NVCC_FLAGS and "-lineinfo" in setup_py.NVCC_FLAGS
    cmd = setup_py.nvcc_command("nvcc", "80;90", Path("csrc/adamw_cuda.cu"), Path("x.o"))
    assert cmd[1:1 + len(setup_py.NVCC_FLAGS)] == setup_py.NVCC_FLAGS and "--compress-mode=size" not in cmd
    new = setup_py.nvcc_command("nvcc", "80;90", Path("csrc/adamw_cuda.cu"), Path("x.o"),
                                "--compress-mode [default,size,speed,balance,none]")
    assert "--compress-mode=size" in new  # only where nvcc has the option (CUDA >= 12.8)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernel_builds
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert kernel_builds.nvcc_flags() == setup_py.NVCC_FLAGS


def test_default_architectures_follow_the_toolkit(setup_py):
    listed = "compute_75\ncompute_80\ncompute_86\ncompute_90\ncompute_100\ncompute_103\ncompute_110\ncompute_120\n"

    def run(cmd, **_):
        assert cmd[1:] == ["--list-gpu-arch"]
        return types.SimpleNamespace(stdout=listed, stderr="", returncode=0)

    supported = setup_py.toolkit_archs("nvcc", run=run)
    assert supported == {"75", "80", "86", "90", "100", "103", "110", "120"}
    assert setup_py.default_cuda_archs(supported) == "80;90;100;120"  # CUDA >= 12.8
    assert setup_py.default_cuda_archs({"75", "80", "86", "90"}) == "80;90"  # CUDA 12.4: no Blackwell
    assert setup_py.default_cuda_archs(None) == "80;90"  # nvcc cannot say

    def failing(cmd, **_):
        return types.SimpleNamespace(stdout="", stderr="nvcc fatal : Unknown option '--list-gpu-arch'", returncode=1)

    assert setup_py.toolkit_archs("nvcc", run=failing) is None
    flags = setup_py.gencode_flags("80;90;100;120")
    assert "-gencode=arch=compute_120,code=compute_120" in flags and "-DLISA_FUSED_PTX_ARCH=120" in flags
    assert [f for f in flags if "code=sm_" in f] == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (80, 90, 100, 120)]
    with pytest.raises(RuntimeError, match="expected a list like '80;90'"):
        setup_py.gencode_flags("sm80;hopper")


def test_built_architectures_are_reported(C):
    """lisa_fused._C.cuda_archs(): what backend="auto" checks a GPU's compute capability against
    (kernels/native.py arch_reason); the PTX is the highest architecture's."""
    if not C.has_cuda():
        assert C.cuda_archs() is None
        return
    archs = C.cuda_archs()
    assert archs["sass"] and archs["ptx"] == max(archs["sass"]), archs
    if not os.environ.get("LISA_FUSED_CUDA_ARCHS"):
        toolkit = build_toolkit()
        if toolkit is not None:
            want = load_setup().default_cuda_archs(load_setup().toolkit_archs(str(toolkit.root / "bin" / "nvcc")))
            assert archs["sass"] == [int(a) for a in want.split(";")], (archs, want)
