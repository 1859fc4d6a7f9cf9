"""Build lisa_fused._C with pybind11: the CPU kernel always, the CUDA kernel when a CUDA toolkit is found.

No torch at build time: the extension takes raw pointers, so one binary serves every torch version.

Environment:
  CUDA_HOME                  CUDA toolkit root (default /usr/local/cuda); nvcc is $CUDA_HOME/bin/nvcc
  LISA_FUSED_CUDA_ARCHS      SM architectures, e.g. "80;90" (the default); the highest also gets PTX
  LISA_FUSED_SKIP_CUDA=1     build the CPU kernel only
  LISA_FUSED_SKIP_NATIVE=1   build no extension (the "torch" and "triton" backends still work)
"""
import os
import re
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import ExecError

CSRC = Path("csrc")
DEFAULT_CUDA_ARCHS = "80;90"
# -ffp-contract=off: the baseline and AVX2 copies of the CPU loop round identically (no FMA contraction).
# -fno-math-errno / -fno-trapping-math let GCC vectorize sqrt and the select-based fp16 conversions.
CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def cuda_home() -> Path | None:
    """The CUDA toolkit to build against, or None. Not derived from `which nvcc` (may be a wrapper)."""
    if env_flag("LISA_FUSED_SKIP_CUDA"):
        return None
    explicit = os.environ.get("CUDA_HOME")
    home = Path(explicit or "/usr/local/cuda")
    if (home / "bin" / "nvcc").is_file():
        return home
    if explicit:
        raise RuntimeError(f"CUDA_HOME={explicit} has no bin/nvcc; fix it or set LISA_FUSED_SKIP_CUDA=1")
    return None


def gencode_flags(archs: str) -> list[str]:
    """ "80;90" -> SASS for sm_80 and sm_90, plus PTX for compute_90 (forward compatible)."""
    names = [a.replace(".", "") for a in re.split(r"[;,\s]+", archs.strip()) if a]
    names = [a[3:] if a.startswith("sm_") else a for a in names]
    if not names or not all(re.fullmatch(r"\d+[af]?", a) for a in names):
        raise RuntimeError(f"LISA_FUSED_CUDA_ARCHS={archs!r}: expected a list like '80;90'")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in names]
    highest = max(names, key=lambda a: int(re.match(r"\d+", a).group()))
    return flags + [f"-gencode=arch=compute_{highest},code=compute_{highest}"]


class BuildExt(build_ext):
    """Compiles csrc/adamw_cuda.cu with nvcc (when a toolkit is found) and links it, with the static
    CUDA runtime, into lisa_fused._C: the wheel needs only the NVIDIA driver at run time."""

    def build_extension(self, ext):
        home = cuda_home()
        if home is not None:
            obj = self.compile_cuda(home, CSRC / "adamw_cuda.cu")
            libdir = home / "lib64" if (home / "lib64").is_dir() else home / "lib"
            ext.extra_objects.append(str(obj))
            ext.define_macros.append(("LISA_FUSED_WITH_CUDA", "1"))
            ext.library_dirs.append(str(libdir))
            ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
        super().build_extension(ext)

    def compile_cuda(self, home: Path, source: Path) -> Path:
        archs = os.environ.get("LISA_FUSED_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        obj = Path(self.build_temp) / f"{source.stem}_{re.sub(r'[^0-9a-z]+', '_', archs)}.o"
        obj.parent.mkdir(parents=True, exist_ok=True)
        inputs = [source, *CSRC.glob("*.h")]
        if not self.force and obj.exists() and all(p.stat().st_mtime <= obj.stat().st_mtime for p in inputs):
            return obj  # up to date for these sources and architectures
        cmd = [str(home / "bin" / "nvcc"), "-std=c++17", "-O3", "--threads=0", "-Xcompiler=-fPIC",
               "-DLISA_FUSED_WITH_CUDA", f"-I{CSRC}", *gencode_flags(archs), "-c", str(source), "-o", str(obj)]
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

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
