"""Every kernel mode of benchmarks/kernel_cost.py compiled for sm_90 offline, as the dispatcher
(kernels/__init__.py) launches it: CUDA (csrc/adamw_cuda.cu, built once with nvcc, each mode an
instantiation picked by its template arguments) and Triton (kernels/triton_adamw.py for fp32 state without
grad_sumsq, kernels/triton_lean.py otherwise, compiled per mode with the GPU launch configuration).

Each kernel comes back as {"sass", "ptx", "params", "names", "regs", "spill", "elts_per_thread", "kernel"}:
SASS and PTX instruction lists (offline_sm90.py), PTX parameter symbols and the names of (parameter index,
byte offset) pairs (the CUDA lean kernel takes one struct, PackedArgs), and of the pointer-table entries
both backends read the segments' param / grad / lowp addresses from, (parameter index, byte offset, byte
offset in the row) (offline_loops.py), registers and spill-store bytes per thread, and the elements one
thread handles per iteration of the source loop (before unrolling).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import offline_sm90 as off

FORMATS = ("fp32", "bf16", "8bit", "4bit")
MASTERS = ("fp32", "fp32+bf16", "kahan", "sr")


@dataclass(frozen=True)
class Mode:
    moments: str          # one of FORMATS
    master: str           # "fp32" (fp32 model), "fp32+bf16" (fp32 master, bf16 grads, bf16 copy), "kahan", "sr"
    sumsq: bool = False   # grad_sumsq (the grad_norm sampler)
    scale: bool = False   # a GradScaler's grad_scale

    @property
    def name(self) -> str:
        return f"{self.moments}/{self.master}" + "+sumsq" * self.sumsq + "+scale" * self.scale

    @property
    def fp32_state(self) -> bool:  # the dispatcher's non-lean kernels
        return self.moments == "fp32" and self.master in ("fp32", "fp32+bf16") and not self.sumsq


MODES = ([Mode(f, m) for f in FORMATS for m in MASTERS] + [Mode(f, m, sumsq=True) for f in FORMATS for m in MASTERS]
         + [Mode(f, "fp32", scale=True) for f in FORMATS])


# ------------------------------------------------------------------------------------------ CUDA
# csrc/adamw_cuda.cu ParamMode of each master column (bf16 params where the param is 16-bit).
PARAM_MODE = {"fp32": 0, "fp32+bf16": 1, "kahan": 3, "sr": 5}


def cuda_key(mode: Mode) -> tuple:
    """The template arguments of the mode's kernel: adamw_packed_kernel<GD, LD, kScale> or
    adamw_lean_kernel<MF, GD, PM, kScale> (grad_sumsq is a runtime pointer: the same kernel)."""
    gd = 0 if mode.master == "fp32" else 1
    if mode.fp32_state:
        return ("packed", gd, 1 if mode.master == "fp32+bf16" else -1, int(mode.scale))
    return ("lean", FORMATS.index(mode.moments), gd, PARAM_MODE[mode.master], int(mode.scale))


def _template_args(name: str) -> tuple[str, tuple] | None:
    m = re.search(r"adamw_(packed|lean)_kernelI((?:L[ib]n?\d+E)+)E", name)
    if not m:
        return None
    args = tuple(int(n) * (-1 if neg else 1) for _, neg, n in re.findall(r"L([ib])(n?)(\d+)E", m.group(2)))
    return m.group(1), args


def nvcc_flags(setup_py: Path = Path(__file__).resolve().parents[1] / "setup.py") -> list[str]:
    """setup.py's NVCC_FLAGS (-O3, --fmad=false, ...), read from its source (importing it needs pybind11)."""
    for node in ast.parse(setup_py.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{setup_py} has no NVCC_FLAGS = [...] list; update benchmarks/kernel_builds.py")


def compile_cuda(csrc: Path, tmp: Path) -> subprocess.Popen:
    """Start nvcc on csrc/adamw_cuda.cu for sm_90 with setup.py's NVCC_FLAGS; -> Popen."""
    cmd = [off.nvidia_tool("nvcc"), *nvcc_flags(), "-DLISA_FUSED_WITH_CUDA", f"-I{csrc}",
           "-gencode", f"arch=compute_{off.ARCH},code=[sm_{off.ARCH},compute_{off.ARCH}]", "-fatbin",
           str(csrc / "adamw_cuda.cu"), "-o", str(tmp / "cuda.fatbin")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _packed_args_layout(csrc: Path) -> dict[int, str]:
    """{byte offset: field} of struct PackedArgs (csrc/adamw.h), the lean kernel's one parameter."""
    body = re.search(r"struct PackedArgs \{(.*?)\n\};", (csrc / "adamw.h").read_text(), re.S).group(1)
    sizes = {"uintptr_t": 8, "int64_t": 8, "int": 4, "uint32_t": 4, "float": 4, "Hyper": 16}
    layout, offset = {}, 0
    for typ, name in re.findall(r"^\s*(\w+)\s+(\w+)\s*(?:=|\{)", body, re.M):
        if typ not in sizes:
            raise RuntimeError(f"csrc/adamw.h PackedArgs.{name}: unknown field type {typ}; add its size")
        align = min(sizes[typ], 8) if typ != "Hyper" else 4
        offset = -(-offset // align) * align
        layout[offset] = name
        offset += sizes[typ]
    return layout


def _lean_vec(source: str) -> int:
    m = re.search(r"constexpr int kLeanVec = (\d+);", source)
    if not m:
        raise RuntimeError("csrc/adamw_cuda.cu: no `constexpr int kLeanVec = N;` (elements per thread of the lean "
                           "kernel); update benchmarks/kernel_builds.py")
    return int(m.group(1))


def cuda_kernels(csrc: Path, tmp: Path, proc: subprocess.Popen) -> dict[tuple, dict]:
    """{cuda_key: kernel} of every instantiation in the fatbin compile_cuda is building."""
    log = proc.communicate()[0]
    if proc.returncode:
        raise RuntimeError(f"nvcc failed on {csrc}/adamw_cuda.cu:\n{log[-3000:]}")
    fatbin = str(tmp / "cuda.fatbin")
    ptx = subprocess.run([off.nvidia_tool("cuobjdump"), "-ptx", fatbin], capture_output=True, text=True,
                         check=True).stdout
    (sass, usage), = off.disassemble(fatbin)
    ptxf = off.ptx_functions(ptx)
    source = (csrc / "adamw_cuda.cu").read_text()
    layout = {(0, o): f for o, f in _packed_args_layout(csrc).items()}
    packed_src = re.search(r"adamw_packed_kernel\((.*?)\)\s*\{", source, re.S).group(1)
    packed_names = {(i, 0): p.split()[-1] for i, p in enumerate(packed_src.split(","))}
    # The segment table (contract.SEG_*): the parameter (or PackedArgs field) that holds it, and the
    # columns of its rows each kernel reads a segment's own tensors' addresses from.
    from lisa_fused.kernels.contract import SEG_GRAD, SEG_LOWP, SEG_PARAM

    columns = ((SEG_PARAM, "param"), (SEG_GRAD, "grad"), (SEG_LOWP, "param_lowp"))
    for names in (packed_names, layout):
        segs = next(k for k, n in names.items() if n == "segs")
        names.update({(*segs, 8 * col): n for col, n in columns})
    out = {}
    for name, code in sass.items():
        if _template_args(name) is None:
            raise RuntimeError(f"unexpected kernel {name} in {csrc}/adamw_cuda.cu")
        kind, args = _template_args(name)
        ept = 16 // (4 if args[0] == 0 else 2) if kind == "packed" else _lean_vec(source)
        pcode, params = ptxf[name]
        out[(kind, *args)] = dict(sass=code, ptx=pcode, params=params, names=packed_names if kind == "packed" else layout,
                                  regs=usage[name]["REG"], spill=off.spill_store_bytes(code), kernel=name,
                                  elts_per_thread=ept)
    return out


# ------------------------------------------------------------------------------------------ Triton
def _triton_module(stem: str):
    copy = os.environ.get("LISA_FUSED_COST_TRITON")
    if copy and (Path(copy) / f"{stem}.py").is_file():  # a modified copy, e.g. to see the test fail
        spec = importlib.util.spec_from_file_location(f"lisa_fused.kernels._cost_{stem}", Path(copy) / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(f"lisa_fused.kernels.{stem}")


def _triton_compile(mode: Mode) -> dict:
    """Compile one mode's Triton kernel (in a worker process): asm plus what the count needs to read it."""
    from lisa_fused.kernels import quant

    half = mode.master != "fp32"
    # The segments' params, grads and lowps are addressed through the pointer table (segs_ptr, *i64): no
    # arguments of their own; their dtypes are the constexpr GRAD_KIND / LOWP (triton_adamw.GRAD_KIND).
    if mode.fp32_state:
        mod = _triton_module("triton_adamw")
        _, block, warps = mod._GPU_CONFIG
        fn = mod._adamw_segments_kernel
        lowp = mode.master == "fp32+bf16"
        spec = dict(pointers={}, constexprs=dict(GRAD_KIND=int(lowp), LOWP=int(lowp), HAS_SCALE=mode.scale),
                    layout=dict(BLOCK=block))
        sets = {}
    else:
        mod = _triton_module("triton_lean")
        _, block, warps = mod._GPU_CONFIG
        fn = mod._adamw_lean_kernel
        p16 = "*fp32" if mode.master.startswith("fp32") else "*i16"
        mom = {"fp32": "*fp32", "bf16": "*i16"}.get(mode.moments, "*u8")
        spec = dict(pointers=dict(m_ptr=mom, v_ptr=mom, comp_ptr="*i16" if mode.master == "kahan" else p16,
                                  codes_ptr="*i64"),
                    constexprs=dict(MOM=quant.FORMAT_CODE[mode.moments], MASTER={"kahan": 1, "sr": 2}.get(mode.master, 0),
                                    PARAM_BF16=not mode.master.startswith("fp32"), GRAD_KIND=int(half),
                                    LOWP=int(mode.master == "fp32+bf16"), HAS_SCALE=mode.scale, HAS_SUMSQ=mode.sumsq,
                                    SR=True, QB=quant.BLOCK.get(mode.moments, 256), BITS=quant.BITS.get(mode.moments, 8)),
                    layout=dict(TILE=block))
        sets = dict(int_scalars={"seed", "n_cols", "lerp_small"}, float_scalars=off.FLOAT_SCALARS)
    asm = off.compile_triton(fn, spec, warps, **sets)
    runtime = [p.name for p in fn.params if not p.is_constexpr]  # constexprs are not PTX parameters
    return dict(asm, runtime=runtime, elts_per_thread=block // (32 * warps),
                kernel=f"{fn.__name__} (BLOCK/TILE {block}, {warps} warps)")


def triton_kernels(modes: list[Mode]) -> list[dict]:
    """The kernel of each mode, compiled in two forked workers (CI has 2 cores), disassembled in one
    cuobjdump run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        compiled = list(pool.map(_triton_compile, modes))
    from lisa_fused.kernels.contract import SEG_GRAD, SEG_LOWP, SEG_PARAM

    out = []
    for c, (sass, usage) in zip(compiled, off.disassemble_cubins([c["cubin"] for c in compiled])):
        (name, code), = sass.items()
        (pcode, params), = off.ptx_functions(c["ptx"]).values()
        names = {(i, 0): n for i, n in enumerate(c["runtime"])}
        # the segments' own tensors: addresses read from the pointer table's columns (offline_loops.py)
        segs = c["runtime"].index("segs_ptr")
        names.update({(segs, 0, 8 * col): n for col, n in ((SEG_PARAM, "p_ptr"), (SEG_GRAD, "g_ptr"),
                                                           (SEG_LOWP, "low_ptr"))})
        out.append(dict(sass=code, ptx=pcode, params=params, names=names,
                        regs=usage[name]["REG"], spill=off.spill_store_bytes(code),
                        elts_per_thread=c["elts_per_thread"], kernel=c["kernel"]))
    return out
