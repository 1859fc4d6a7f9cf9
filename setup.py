"""Build lisa_fused._C with pybind11: the CPU kernel always, the CUDA kernel when a CUDA toolkit is found.

No torch at build time: the extension takes raw pointers, so one binary serves every torch version.

Environment:
  CUDA_HOME                  CUDA toolkit root; wins over everything below (an error if it has no bin/nvcc)
  LISA_FUSED_CUDA_ARCHS      SM architectures, e.g. "80;90"; the highest also gets PTX. Default: 80 and 90,
                             plus 100 and 120 where the toolkit supports them (nvcc --list-gpu-arch)
  LISA_FUSED_SKIP_CUDA=1     build the CPU kernel only
  LISA_FUSED_SKIP_NATIVE=1   build no extension (the "torch" and "triton" backends still work)

Without CUDA_HOME the toolkit is chosen among the `nvcc` on PATH (resolved to the real toolkit when it is a
wrapper script), /usr/local/cuda and /usr/local/cuda-X.Y: the one whose version matches the CUDA of the
installed torch (torch/version.py, read without importing torch; visible with --no-build-isolation),
else the first found. The CUDA runtime is linked statically and needs a driver at least as new as the
toolkit; torch's CUDA version is one the user's driver already runs.
"""
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import ExecError

CSRC = Path("csrc")
# SASS for Ampere (sm_80; sm_86/89 run it too) and Hopper (sm_90), and for Blackwell (sm_100: B200/GB200,
# also run by sm_103; sm_120: RTX 50xx / RTX PRO, also run by sm_121) where the toolkit knows it (CUDA >= 12.8).
# The highest also ships as PTX, which the driver compiles for newer GPUs on their first launch.
BASE_CUDA_ARCHS = ("80", "90")
NEWER_CUDA_ARCHS = ("100", "120")
# --fmad=false: no multiply-add contraction by nvcc, ptxas or the driver's PTX JIT; every FMA of the kernels
# is an explicit fmaf, so a GPU rounds as the CPU kernel (-ffp-contract=off) and the reference do.
# -lineinfo: source lines for compute-sanitizer and profilers (the code itself is unchanged).
NVCC_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-lineinfo"]
# The fatbin compressed for size where nvcc can (CUDA >= 12.8): with -lineinfo, 4 SASS architectures and the
# PTX come to 89 MB uncompressed, 10.6 MB under nvcc's default compression, 7.2 MB with "size".
SIZE_FLAGS = ["--compress-mode=size"]
# -ffp-contract=off: the baseline and AVX2 copies of the CPU loop round identically (no FMA contraction).
# -fno-math-errno / -fno-trapping-math let GCC vectorize sqrt and the select-based fp16 conversions.
CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class Toolkit(NamedTuple):
    root: Path  # has bin/nvcc
    version: str | None  # "13.0", from `nvcc --version`
    why: str  # how it was chosen, printed by the build


def nvcc_facts(nvcc: str, run=subprocess.run) -> tuple[Path | None, str | None]:
    """(toolkit root, "X.Y" version) of an nvcc executable, which may be a wrapper script: the root is
    nvcc's own TOP from a dry run (the real toolkit), else two levels above the resolved path."""
    def output(*args):
        try:
            done = run([nvcc, *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return ""
        return (done.stdout or "") + (done.stderr or "")

    version = re.search(r"release (\d+\.\d+)", output("--version"))
    top = re.search(r"^#\$ TOP=(.+)$", output("--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull), re.M)
    root = Path(top.group(1).strip()).resolve() if top else Path(nvcc).resolve().parent.parent
    return (root if (root / "bin" / "nvcc").is_file() else None), (version.group(1) if version else None)


def torch_cuda_version() -> str | None:
    """torch.version.cuda of the installed torch ("12.8"), without importing torch; None for CPU builds
    or when torch is not installed (as in an isolated build environment)."""
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        version_py = Path(list(spec.submodule_search_locations)[0]) / "version.py"
        if version_py.is_file():
            m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*(None|['\"][^'\"]*['\"])", version_py.read_text(), re.M)
            if m:
                return None if m.group(1) == "None" else m.group(1).strip("'\"")
    try:
        local = importlib.metadata.version("torch").partition("+")[2]  # "cu128"
    except importlib.metadata.PackageNotFoundError:
        return None
    m = re.fullmatch(r"cu(\d+)(\d)", local)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def select_toolkit(candidates: list[Toolkit], want: str | None) -> Toolkit | None:
    """The candidate whose version matches `want` ("12.8": same major.minor, else same major), else the
    first one."""
    if not candidates:
        return None
    if want:
        for same in (lambda v: v == want, lambda v: v.split(".")[0] == want.split(".")[0]):
            for tk in candidates:
                if tk.version and same(tk.version):
                    return tk._replace(why=f"{tk.why}; matches torch's CUDA {want}")
        first = candidates[0]
        return first._replace(why=f"{first.why}; no toolkit matches torch's CUDA {want}, so the "
                                  f"extension needs a driver for CUDA {first.version}")
    return candidates[0]


def find_cuda_toolkit(environ=os.environ, which=shutil.which, facts=nvcc_facts,
                      torch_cuda=torch_cuda_version, search=("/usr/local/cuda", "/usr/local/cuda-*")) -> Toolkit | None:
    """The CUDA toolkit to build against, or None (see the module docstring for the order)."""
    if environ.get("LISA_FUSED_SKIP_CUDA", "") not in ("", "0"):
        return None
    explicit = environ.get("CUDA_HOME")
    if explicit:
        nvcc = Path(explicit) / "bin" / "nvcc"
        if not nvcc.is_file():
            raise RuntimeError(f"CUDA_HOME={explicit} has no bin/nvcc; fix it or set LISA_FUSED_SKIP_CUDA=1")
        return Toolkit(Path(explicit), facts(str(nvcc))[1], "CUDA_HOME")
    candidates, seen = [], set()
    nvcc_names = [(which("nvcc"), "nvcc on PATH")]
    for pattern in search:
        dirs = sorted(Path(pattern).parent.glob(Path(pattern).name), reverse=True,
                      key=lambda d: [int(x) for x in re.findall(r"\d+", d.name)])  # newest version first
        nvcc_names += [(str(d / "bin" / "nvcc"), str(d)) for d in dirs if (d / "bin" / "nvcc").is_file()]
    for nvcc, why in nvcc_names:
        if not nvcc:
            continue
        root, version = facts(nvcc)
        if root is not None and root.resolve() not in seen:
            seen.add(root.resolve())
            candidates.append(Toolkit(root, version, f"{why} -> {root} (CUDA {version})"))
    return select_toolkit(candidates, torch_cuda())


def toolkit_archs(nvcc: str, run=subprocess.run) -> set[str] | None:
    """The architectures `nvcc --list-gpu-arch` lists ({"75", "80", "90", "100", ...}), or None when it
    cannot say (an nvcc older than 11.x, or one that fails)."""
    try:
        done = run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = set(re.findall(r"compute_(\d+)", (done.stdout or "") + (done.stderr or "")))
    return found if getattr(done, "returncode", 0) == 0 and found else None


def default_cuda_archs(supported: set[str] | None) -> str:
    """BASE_CUDA_ARCHS plus the NEWER_CUDA_ARCHS in `supported` (toolkit_archs), e.g. "80;90;100;120"."""
    return ";".join([*BASE_CUDA_ARCHS, *(a for a in NEWER_CUDA_ARCHS if supported and a in supported)])


def arch_names(archs: str) -> list[str]:
    """ "80;9.0;sm_100" -> ["80", "90", "100"]; RuntimeError naming the expected form otherwise."""
    names = [a.replace(".", "") for a in re.split(r"[;,\s]+", archs.strip()) if a]
    names = [a[3:] if a.startswith("sm_") else a for a in names]
    if not names or not all(re.fullmatch(r"\d+[af]?", a) for a in names):
        raise RuntimeError(f"LISA_FUSED_CUDA_ARCHS={archs!r}: expected a list like '80;90'")
    return names


def gencode_flags(archs: str) -> list[str]:
    """ "80;90" -> SASS for sm_80 and sm_90, plus PTX for compute_90 (forward compatible), and
    -DLISA_FUSED_PTX_ARCH=90, which lisa_fused._C.cuda_archs() reports."""
    names = arch_names(archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in names]
    number = {a: int(re.match(r"\d+", a).group()) for a in names}
    highest = max(names, key=number.get)
    return flags + [f"-gencode=arch=compute_{highest},code=compute_{highest}", f"-DLISA_FUSED_PTX_ARCH={number[highest]}"]


def nvcc_options(nvcc: str, run=subprocess.run) -> str:
    """`nvcc --help`, to see which options this nvcc has ("" when it cannot say)."""
    try:
        done = run([nvcc, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout or "") + (done.stderr or "")


def nvcc_command(nvcc: str, archs: str, source: Path, obj: Path, options: str = "") -> list[str]:
    """The nvcc command line that compiles `source` to the object `obj` for `archs`; `options`: nvcc_options
    (SIZE_FLAGS are added where it lists --compress-mode)."""
    size = SIZE_FLAGS if "--compress-mode" in options else []
    return [nvcc, *NVCC_FLAGS, *size, "--threads=0", "-Xcompiler=-fPIC", "-DLISA_FUSED_WITH_CUDA", f"-I{CSRC}",
            *gencode_flags(archs), "-c", str(source), "-o", str(obj)]


class BuildExt(build_ext):
    """Compiles csrc/adamw_cuda.cu with nvcc (when a toolkit is found) and links it, with the static
    CUDA runtime, into lisa_fused._C: the wheel needs only the NVIDIA driver at run time."""

    def build_extension(self, ext):
        toolkit = find_cuda_toolkit()
        print(f"lisa_fused: CUDA toolkit: {toolkit.why if toolkit else 'none (CPU kernel only)'}", file=sys.stderr)
        if toolkit is not None:
            obj = self.compile_cuda(toolkit, CSRC / "adamw_cuda.cu")
            home = toolkit.root
            libdir = home / "lib64" if (home / "lib64").is_dir() else home / "lib"
            ext.extra_objects.append(str(obj))
            ext.define_macros.append(("LISA_FUSED_WITH_CUDA", "1"))
            ext.library_dirs.append(str(libdir))
            ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
        super().build_extension(ext)

    def compile_cuda(self, toolkit: Toolkit, source: Path) -> Path:
        nvcc = str(toolkit.root / "bin" / "nvcc")
        archs = os.environ.get("LISA_FUSED_CUDA_ARCHS") or default_cuda_archs(toolkit_archs(nvcc))
        print(f"lisa_fused: CUDA architectures: {archs} (+PTX for the highest)", file=sys.stderr)
        tag = re.sub(r"[^0-9a-z]+", "_", f"{archs}_cuda{toolkit.version}")
        # Kept in build/nvcc/ of the source tree, not build_temp: pip's editable installs build in a fresh
        # temporary directory each time, so a later editable install or `python -m build --wheel` of the
        # same sources (CI's second leg) reuses the object instead of running nvcc again (~4 min, 4 archs).
        obj = Path(__file__).resolve().parent / "build" / "nvcc" / f"{source.stem}_{tag}.o"
        obj.parent.mkdir(parents=True, exist_ok=True)
        inputs = [source, *CSRC.glob("*.h"), Path(__file__)]  # setup.py: NVCC_FLAGS
        if not self.force and obj.exists() and all(p.stat().st_mtime <= obj.stat().st_mtime for p in inputs):
            return obj  # up to date for these sources and architectures
        cmd = nvcc_command(nvcc, archs, source, obj, nvcc_options(nvcc))
        try:
            self.spawn(cmd)
        except ExecError as exc:
            raise RuntimeError(f"nvcc failed ({exc}); set LISA_FUSED_SKIP_CUDA=1 to build the CPU kernel only") from exc
        return obj


ext_modules = [] if env_flag("LISA_FUSED_SKIP_NATIVE") else [
    Pybind11Extension(
        "lisa_fused._C",
        sources=[str(CSRC / "bindings.cpp"), str(CSRC / "adamw_cpu.cpp")],
        include_dirs=[str(CSRC)],
        depends=[str(p) for p in sorted(CSRC.glob("*.h"))] + [str(CSRC / "adamw_cuda.cu")],
        cxx_std=17,
        extra_compile_args=CPU_FLAGS,
        extra_link_args=["-fopenmp"],
    )
]

if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its functions
    setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
