"""What benchmarks/gpu_check.sh checks before it spends GPU time: nothing here runs a kernel.

- the NVIDIA driver's CUDA version (cuDriverGetVersion via libcuda) against the CUDA runtime that the
  extension links statically: the nvcc that will build it, and the installed lisa_fused._C (its own
  runtime's verdict, `cuda_unavailable_reason`); a too-old driver makes backend "cuda" unusable;
- `pip install --no-build-isolation --no-deps .` needs setuptools>=64, wheel and pybind11 importable;
- torch's own CUDA build against the driver.

Prints one line per check and a JSON summary to --json; exits 1 when a check that the GPU run needs
fails (with --cpu a missing driver or GPU is reported, not failed).

    python benchmarks/gpu_precheck.py [--cpu] [--json PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports, e.g. (13, 0); None without a driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return None
    return v.value // 1000, (v.value % 1000) // 10


def nvidia_smi_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20)
    return r.stdout.strip() or None


def nvcc_version() -> tuple[str, tuple[int, int]] | None:
    """(path, (major, minor)) of the nvcc setup.py would use: CUDA_HOME's, else PATH's, else /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME")
    candidates = ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "",
                                                                          "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.exists(path):
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"release (\d+)\.(\d+)", out)
            if m:
                return path, (int(m.group(1)), int(m.group(2)))
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="rehearsal: no driver or GPU is not a failure")
    ap.add_argument("--json", help="write the findings here")
    args = ap.parse_args()
    found, failures = {}, []

    def check(name, ok, detail, needed=True):
        print(f"{'ok  ' if ok else ('FAIL' if needed else 'note')} {name}: {detail}")
        found[name] = {"ok": bool(ok), "detail": detail}
        if not ok and needed:
            failures.append(name)

    def version(pkg):
        try:
            return tuple(int(x) for x in re.findall(r"\d+", md.version(pkg))[:3])
        except md.PackageNotFoundError:
            return None

    for pkg, minimum in (("setuptools", (64,)), ("pybind11", (2, 12))):
        v = version(pkg)
        check(pkg, v is not None and v >= minimum, f"{v} (--no-build-isolation needs >= {minimum})" if v else
              "not installed: `pip install --no-build-isolation` cannot build lisa_fused")
    st = version("setuptools") or ()
    # setuptools >= 70.1 carries bdist_wheel itself; older ones need the wheel package
    check("wheel", version("wheel") is not None or st >= (70, 1),
          f"wheel {version('wheel')}" if version("wheel") else
          f"wheel not installed; setuptools {st} {'has' if st >= (70, 1) else 'lacks'} its own bdist_wheel")

    drv = driver_cuda_version()
    found["nvidia_smi"] = nvidia_smi_driver()
    gpu_needed = not args.cpu
    check("driver", drv is not None, f"supports CUDA {drv[0]}.{drv[1]} ({found['nvidia_smi']})" if drv
          else "no NVIDIA driver (libcuda.so.1 not loadable)", needed=gpu_needed)

    import torch

    tv = torch.version.cuda
    check("torch", torch.cuda.is_available() or not gpu_needed,
          f"{torch.__version__}, built for CUDA {tv}, cuda available: {torch.cuda.is_available()}", needed=gpu_needed)
    if drv and tv:
        t = tuple(int(x) for x in tv.split(".")[:2])
        check("driver>=torch's CUDA", drv >= t or drv[0] == t[0],  # same major: minor compatibility
              f"driver CUDA {drv[0]}.{drv[1]} vs torch's {tv}")

    nv = nvcc_version()
    check("nvcc", nv is not None, f"{nv[0]}: CUDA {nv[1][0]}.{nv[1][1]}" if nv else
          "no nvcc (CUDA_HOME, PATH, /usr/local/cuda): the extension builds without its CUDA kernel",
          needed=gpu_needed)
    if nv and drv:
        # the extension links cudart statically: its kernels need a driver at least that new (13.x: >= 580)
        check("driver>=nvcc runtime", drv >= nv[1],
              f"driver supports CUDA {drv[0]}.{drv[1]}, lisa_fused._C will link CUDA {nv[1][0]}.{nv[1][1]}"
              + ("" if drv >= nv[1] else ": backend 'cuda' will be unavailable; build with an older toolkit "
                 "(CUDA_HOME) or update the driver"))

    try:
        import lisa_fused._C as C

        reason = C.cuda_unavailable_reason() if C.has_cuda() else "built without CUDA"
        check("installed _C", reason is None,
              f"{C.__file__}: CUDA kernel usable" if reason is None else f"{C.__file__}: {reason}",
              needed=False)  # before the install stage this is whatever was there
    except ImportError as e:
        found["installed _C"] = {"ok": False, "detail": f"not importable yet ({e})"}
        print(f"note installed _C: not importable yet ({e})")

    found["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(found, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
