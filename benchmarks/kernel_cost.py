"""GPU cost per element without a GPU: every kernel mode compiled for sm_90 here, its main loop read from
the SASS, and the predicted bound on an H200 (memory or instruction issue), next to torch's fused AdamW.

    python benchmarks/kernel_cost.py [--write benchmarks/results/kernel_cost_sm90.md] [--json]
                                     [--clock-ghz 1.98] [--bandwidth-tbs 4.3]

Modes: moments fp32 / bf16 / 8bit / 4bit x master "fp32" (fp32 model), "fp32+bf16" (bf16 model: fp32
master, bf16 grads, bf16 copy written back), "kahan" and "sr" (bf16 params and grads); each also with
grad_sumsq (the grad_norm sampler, "+sumsq"), and the fp32 model with a GradScaler's grad_scale ("+scale").
Backends: CUDA (csrc/adamw_cuda.cu) and Triton (kernels/triton_adamw.py for fp32 state without sumsq,
kernels/triton_lean.py otherwise), the kernels the dispatcher (kernels/__init__.py) launches.

How it counts (per element of the packed buffer, steady state: a full chunk, every element valid):
- bytes/elt: DRAM bytes from the formats (contract.py, quant.py): each stream read and/or written once:
  grad, param (fp32 master 4+4, bf16 2+2), param_lowp 2, compensation 2+2, moments (fp32 4+4, bf16 2+2,
  8bit codes 1+1, 4bit 0.5+0.5) and the block scales 4/BLOCK read + 4/BLOCK written per moment.
- cross-check: the global accesses on the main-loop path of the PTX, each traced to the kernel parameter
  its address derives from (offline_sm90.py), in bytes per element per stream. Streams each element owns
  (param, grad, moments, param_lowp, compensation) must be accessed exactly as the formats say; a 4-bit
  code byte is loaded by both of its elements (x2) and stored by one thread per pair in Triton, by the
  even thread's whole path in CUDA (x2). Scales must be read and written iff quantized (every element
  loads its block's scale; one lane per block stores it); the code table may be read (Triton: global
  gathers from L1; CUDA: shared memory); grad_scale read iff used; no other stream. The SASS path must
  move the PTX path's bytes, less at most the code-table gathers (ptxas merges repeated ones). Local
  memory (spills) is reported, not counted as DRAM bytes.
- instr/elt: SASS warp instructions on the main-loop path (offline_sm90.py: the longest path head to back
  edge, divergent if-blocks counted as executed, IEEE div/sqrt slow-path calls not) over the elements one
  warp handles per iteration: CUDA fp32 kernel 32 * (16 / grad bytes), CUDA lean 32, Triton
  BLOCK / num_warps or TILE / num_warps. Barriers, shuffles and table gathers count one issue each.
- The CUDA lean kernel reads master mode, lowp dtype, grad_scale and grad_sumsq at run time. Each mode is
  compiled twice: in a copy of csrc/adamw_cuda.cu whose lean kernel fixes those fields to the mode's
  constants at entry (one lambda; nothing else changes): the bytes cross-check and "instr/elt pinned"
  (what a kernel templated on the mode would issue); and as shipped: instr/elt is its longest loop path
  whose accesses per element are the pinned copy's (a guarded access taken or not; a switch's jump table
  may go to any block start after it), i.e. the mode's path with its runtime tests; modes that differ only
  in arithmetic (grad_scale on or off) get the longer one.

H200 assumptions (/work/.library/device/KINDS.md and H200.md): 4.3e12 B/s, the device-to-device copy
measured there (bytes read + written; the datasheet says 4.8e12); 132 SMs (PyTorch's count there); SM
clock 1.98 GHz (nvidia-smi read 1980 MHz under load there); 4 warp schedulers per SM, each issuing one
warp instruction per cycle (sm_70..sm_90: NVIDIA, forums.developer.nvidia.com/t/315200, "each SM has 4
SM sub-partitions ... each has a warp scheduler"; Nsight Compute's issue-slot model). Issue rate
= 132 * 4 * 1.98e9 = 1.045e12 warp instructions/s. The issue bound is optimistic: it ignores dependency
stalls and pipes narrower than a warp (MUFU 16 lanes/SM-cycle, INT32 half rate on sm_90), which make a
warp instruction occupy its pipe for 2+ cycles. ratio = issue time / byte time: < 0.7 memory-bound,
0.7-1 close, >= 1 issue-bound. Nothing here ran on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_sm90 as off  # noqa: E402

BANDWIDTH, SMS, CLOCK, SCHEDULERS, CLOSE = 4.3e12, 132, 1.98e9, 4, 0.7
MASTERS = ("fp32", "fp32+bf16", "kahan", "sr")
OWNED = ("param", "grad", "exp_avg", "exp_avg_sq", "param_lowp", "compensation")
ALIASES = {"p": "param", "g": "grad", "m": "exp_avg", "v": "exp_avg_sq", "low": "param_lowp", "comp": "compensation",
           "ms": "exp_avg_scale", "vs": "exp_avg_sq_scale", "qt": "qtable", "qtable": "qtable", "gscale": "grad_scale",
           "scale": "grad_scale", "sumsq": "grad_sumsq"}


@dataclass(frozen=True)
class Mode:
    moments: str          # "fp32" | "bf16" | "8bit" | "4bit"
    master: str           # one of MASTERS
    sumsq: bool = False
    scale: bool = False

    @property
    def name(self) -> str:
        return f"{self.moments}/{self.master}" + "+sumsq" * self.sumsq + "+scale" * self.scale

    @property
    def fp32_state(self) -> bool:  # the dispatcher's non-lean kernels
        return self.moments == "fp32" and self.master in ("fp32", "fp32+bf16") and not self.sumsq


FORMATS = ("fp32", "bf16", "8bit", "4bit")
MODES = ([Mode(f, m) for f in FORMATS for m in MASTERS] + [Mode(f, m, sumsq=True) for f in FORMATS for m in MASTERS]
         + [Mode(f, "fp32", scale=True) for f in FORMATS])


def stream_bytes(mode: Mode) -> dict[str, tuple[float, float]]:
    """DRAM (read, written) bytes per element per stream, from the formats (contract.py, quant.py)."""
    from lisa_fused.kernels import quant

    half = mode.master != "fp32"
    s = {"grad": (2.0 if half else 4.0, 0.0), "param": (4.0, 4.0) if mode.master.startswith("fp32") else (2.0, 2.0)}
    if mode.master == "fp32+bf16":
        s["param_lowp"] = (0.0, 2.0)
    if mode.master == "kahan":
        s["compensation"] = (2.0, 2.0)
    code = {"fp32": 4.0, "bf16": 2.0, "8bit": 1.0, "4bit": 0.5}[mode.moments]
    for name in ("exp_avg", "exp_avg_sq"):
        s[name] = (code, code)
        if mode.moments in quant.BLOCK:
            s[name + "_scale"] = (4.0 / quant.BLOCK[mode.moments],) * 2
    return s


# ------------------------------------------------------------------------------------------ CUDA
_LEAN_HEAD = re.compile(r"template <int MF, int GD>(\s*__global__\s+void\s+__launch_bounds__\(kThreads\)\s*"
                        r"adamw_lean_kernel)\(const PackedArgs a\)\s*\{")
_PIN = """template <int MF, int GD, int PinMaster = -1, int PinLowp = -1, bool PinScale = false, bool PinSumsq = false>\\1(
    const PackedArgs a_shipped) {
  const PackedArgs a = [&] {  // benchmarks/kernel_cost.py: PinMaster >= 0 fixes the runtime mode fields
    PackedArgs x = a_shipped;
    if (PinMaster >= 0) {
      x.master = PinMaster;
      x.lowp_dtype = PinLowp;
      x.param_dtype = PinMaster == kMasterFp32 ? kFloat32 : kBFloat16;
      x.n_cols = kNumColsLean;
      if (!PinScale) x.grad_scale = 0;
      if (!PinSumsq) x.grad_sumsq = 0;
    }
    return x;
  }();"""


def _cuda_key(mode: Mode) -> tuple:
    gd = 0 if mode.master == "fp32" else 1
    if mode.fp32_state:
        return ("packed", gd, 1 if mode.master == "fp32+bf16" else -1, int(mode.scale))
    master = {"fp32": 0, "fp32+bf16": 0, "kahan": 1, "sr": 2}[mode.master]
    return ("lean", FORMATS.index(mode.moments), gd, master, 1 if mode.master == "fp32+bf16" else -1,
            int(mode.scale), int(mode.sumsq))


def _template_args(name: str) -> tuple[str, tuple] | None:
    m = re.search(r"adamw_(packed|lean)_kernelI((?:L[ib]n?\d+E)+)E", name)
    if not m:
        return None
    args = tuple(int(n) * (-1 if neg else 1) for _, neg, n in re.findall(r"L([ib])(n?)(\d+)E", m.group(2)))
    return m.group(1), args


def compile_cuda(csrc: Path, tmp: Path) -> subprocess.Popen:
    """Start nvcc on a copy of csrc/adamw_cuda.cu with the pinned lean instantiations; -> Popen."""
    text = (csrc / "adamw_cuda.cu").read_text()
    text, n = _LEAN_HEAD.subn(_PIN, text)
    if n != 1:
        raise RuntimeError(f"{csrc / 'adamw_cuda.cu'}: expected one `template <int MF, int GD> __global__ void "
                           f"__launch_bounds__(kThreads) adamw_lean_kernel(const PackedArgs a) {{`, found {n}; "
                           f"update _LEAN_HEAD in benchmarks/kernel_cost.py")
    pins = sorted({_cuda_key(m) for m in MODES if not m.fp32_state})
    text += "\nnamespace lisa_fused {\nnamespace {\n" + "".join(
        f"template __global__ void adamw_lean_kernel<{', '.join(str(a) for a in k[1:5])}, "
        f"{'true' if k[5] else 'false'}, {'true' if k[6] else 'false'}>(const PackedArgs);\n" for k in pins) + "}\n}\n"
    (tmp / "adamw_cuda_pinned.cu").write_text(text)
    nvcc = off.nvidia_tool("nvcc")
    cmd = [nvcc, "-std=c++17", "-O3", "-DLISA_FUSED_WITH_CUDA", f"-I{csrc}",  # setup.py's device flags
           "-gencode", f"arch=compute_{off.ARCH},code=[sm_{off.ARCH},compute_{off.ARCH}]", "-fatbin",
           str(tmp / "adamw_cuda_pinned.cu"), "-o", str(tmp / "cuda.fatbin")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _packed_args_layout(csrc: Path) -> dict[int, str]:
    """{byte offset: field} of struct PackedArgs (csrc/adamw.h), the lean kernel's one parameter."""
    body = re.search(r"struct PackedArgs \{(.*?)\n\};", (csrc / "adamw.h").read_text(), re.S).group(1)
    sizes = {"uintptr_t": 8, "int64_t": 8, "int": 4, "uint32_t": 4, "float": 4, "Hyper": 16}
    layout, off_ = {}, 0
    for typ, name in re.findall(r"^\s*(\w+)\s+(\w+)\s*(?:=|\{)", body, re.M):
        if typ not in sizes:
            raise RuntimeError(f"csrc/adamw.h PackedArgs.{name}: unknown field type {typ}; add its size")
        align = min(sizes[typ], 8) if typ != "Hyper" else 4
        off_ = -(-off_ // align) * align
        layout[off_] = name
        off_ += sizes[typ]
    return layout


def cuda_kernels(csrc: Path, tmp: Path, proc: subprocess.Popen) -> dict[tuple, dict]:
    """{_cuda_key or ("shipped", MF, GD): {"sass", "ptx", "params", "regs", "spill", "names"}}."""
    log = proc.communicate()[0]
    if proc.returncode:
        raise RuntimeError(f"nvcc failed on the pinned copy of {csrc}/adamw_cuda.cu:\n{log[-3000:]}")
    fatbin = str(tmp / "cuda.fatbin")
    ptx = subprocess.run([off.nvidia_tool("cuobjdump"), "-ptx", fatbin], capture_output=True, text=True,
                         check=True).stdout
    (sass, usage), = off.disassemble(fatbin)
    ptxf = off.ptx_functions(ptx)
    layout = _packed_args_layout(csrc)
    out = {}
    for name, code in sass.items():
        if _template_args(name) is None:
            raise RuntimeError(f"unexpected kernel {name} in the pinned copy of {csrc}/adamw_cuda.cu")
        kind, args = _template_args(name)
        if kind == "packed":
            key = ("packed", *args)
            src = re.search(r"adamw_packed_kernel\((.*?)\)\s*\{", (csrc / "adamw_cuda.cu").read_text(), re.S).group(1)
            names = {(i, 0): p.split()[-1] for i, p in enumerate(src.split(","))}
        else:
            key = ("lean", *args) if args[2] >= 0 else ("shipped", *args[:2])  # PinMaster -1: as shipped
            names = {(0, o): f for o, f in layout.items()}
        pcode, params = ptxf[name]
        out[key] = dict(sass=code, ptx=pcode, params=params, names=names, regs=usage[name]["REG"],
                        spill=off.spill_store_bytes(code), kernel=name)
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
    """Compile one mode's Triton kernel (in a worker process): asm plus what analyse needs to read it."""
    from lisa_fused.kernels import contract, quant

    half = mode.master != "fp32"
    if mode.fp32_state:
        mod = _triton_module("triton_adamw")
        _, block, warps = mod._GPU_CONFIG
        fn = mod._adamw_packed_kernel
        lowp = mode.master == "fp32+bf16"
        spec = dict(pointers=dict(g_ptr="*i16", low_ptr="*bf16") if lowp else {},
                    constexprs=dict(GRAD_BF16=lowp, HAS_LOWP=lowp, LOWP_BF16=lowp, HAS_SCALE=mode.scale),
                    layout=dict(ALIGNMENT=contract.ALIGN, BLOCK=block))
        sets = {}
    else:
        mod = _triton_module("triton_lean")
        _, block, warps = mod._GPU_CONFIG
        fn = mod._adamw_lean_kernel
        p16 = "*fp32" if mode.master.startswith("fp32") else "*i16"
        mom = {"fp32": "*fp32", "bf16": "*i16"}.get(mode.moments, "*u8")
        spec = dict(pointers=dict(p_ptr=p16, g_ptr="*i16" if half else "*fp32", m_ptr=mom, v_ptr=mom,
                                  low_ptr="*i16" if mode.master == "fp32+bf16" else p16,
                                  comp_ptr="*i16" if mode.master == "kahan" else p16),
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
    """Per mode {"sass", "ptx", "params", "names", "regs", "spill", "elts_per_thread", "kernel"}; compiled
    in two forked workers (CI has 2 cores), disassembled in one cuobjdump run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        compiled = list(pool.map(_triton_compile, modes))
    out = []
    for c, (sass, usage) in zip(compiled, off.disassemble_cubins([c["cubin"] for c in compiled])):
        (name, code), = sass.items()
        (pcode, params), = off.ptx_functions(c["ptx"]).values()
        out.append(dict(sass=code, ptx=pcode, params=params, names={(i, 0): n for i, n in enumerate(c["runtime"])},
                        regs=usage[name]["REG"], spill=off.spill_store_bytes(code),
                        elts_per_thread=c["elts_per_thread"], kernel=c["kernel"]))
    return out


# ------------------------------------------------------------------------------------------ counting
def _stream(k: dict, param: tuple[int, int]) -> str:
    name = k["names"].get(param, f"parameter {param}")
    return ALIASES.get(re.sub(r"_ptr$", "", name), name)


def analyse(mode: Mode, backend: str, k: dict, bandwidth: float, issue_rate: float, shipped: dict | None = None) -> dict:
    """One table row: bytes and instructions per element, the two bounds, and the cross-check's errors.
    k: the mode's kernel (for CUDA lean: the pinned copy); shipped: the CUDA lean kernel as shipped, whose
    longest loop path with the pinned copy's accesses per element gives instr/elt, regs and spills."""
    want = stream_bytes(mode)
    loop = off.sass_loop(k["sass"])
    ptx = off.ptx_loop_accesses(k["ptx"], k["params"])
    errors = []
    # Elements per thread and iteration: the source's, times the compiler's unroll, read off the grad
    # stream (each element loads its grad once; a doubled grad load shows as every other stream short).
    grad = sum(a["bytes"] for a in ptx if a["kind"] == "ld" and _stream(k, a["param"]) == "grad")
    unroll = grad / (want["grad"][0] * k["elts_per_thread"])
    if unroll < 1 or unroll != int(unroll):
        errors.append(f"grad: {grad} B loaded per thread and iteration, not a whole multiple of "
                      f"{k['elts_per_thread']} elements x {want['grad'][0]:g} B")
    ept = k["elts_per_thread"] * max(1, int(unroll))
    seen: dict[str, list[float]] = {}
    for a in ptx:
        per = seen.setdefault(_stream(k, a["param"]), [0.0, 0.0])
        if a["kind"] == "atom":
            errors.append(f"{_stream(k, a['param'])}: atomic in the main loop")
        per[a["kind"] == "st"] += a["bytes"] / ept
    quantized = "exp_avg_scale" in want
    for name, (r, w) in want.items():
        got = seen.get(name, [0.0, 0.0])
        if name in OWNED:
            mult = (2, 2 if backend == "cuda" else 1) if mode.moments == "4bit" and name.startswith("exp_avg") else (1, 1)
            if abs(got[0] - r * mult[0]) > 1e-9 or abs(got[1] - w * mult[1]) > 1e-9:
                shared = " (per thread: a 4-bit byte serves two elements)" if mult != (1, 1) else ""
                errors.append(f"{name}: loads {got[0]:g} B/elt, stores {got[1]:g} B/elt on the loop path; the "
                              f"formats say {r * mult[0]:g} and {w * mult[1]:g}{shared}")
        elif not (got[0] > 0 and got[1] > 0):
            errors.append(f"{name}: block scales must be read and written in the loop, got {got}")
    for name, (ld, st) in seen.items():
        allowed = (name in want or (name == "qtable" and quantized and st == 0)
                   or (name == "grad_scale" and mode.scale and st == 0))
        if not allowed:
            errors.append(f"{name}: {ld:g} B/elt loaded, {st:g} stored in the main loop; the formats move none")
    glob = [n for kind, n in loop["accesses"] if kind != "local"]
    ptx_bytes = sum(a["bytes"] for a in ptx)
    gathers = sum(a["bytes"] for a in ptx if _stream(k, a["param"]) == "qtable")
    if not ptx_bytes - gathers <= sum(glob) <= ptx_bytes:  # ptxas may merge or hoist code-table gathers only
        errors.append(f"SASS path: {len(glob)} global accesses, {sum(glob)} B; PTX path: {len(ptx)}, {ptx_bytes} B "
                      f"({gathers} B of them code-table gathers)")
    bytes_ = sum(r + w for r, w in want.values())
    instr = pinned = loop["instructions"] / (32 * ept)
    regs, spill = k["regs"], k["spill"]
    if shipped is not None:
        per_elt = Counter({a: n // ept for a, n in Counter(a for a in loop["accesses"] if a[0] != "local").items()})
        matched = off.sass_loop_matching(shipped["sass"], per_elt)
        if matched is None or any(n % ept for n in Counter(loop["accesses"]).values()):
            errors.append(f"no main-loop path of the shipped {shipped['kernel']} has the pinned copy's accesses "
                          f"per element {dict(per_elt)}")
        else:
            instr, regs, spill = matched / 32, shipped["regs"], shipped["spill"]
    byte_ns, issue_ns = bytes_ * 1e15 / bandwidth, instr * 1e15 / issue_rate
    ratio = issue_ns / byte_ns
    local = [n for kind, n in loop["accesses"] if kind == "local"]
    return dict(mode=mode.name, backend=backend, bytes=bytes_, instr=instr, instr_pinned=pinned, regs=regs,
                spill=spill, loop_local=sum(local) / ept, byte_ns=byte_ns, issue_ns=issue_ns, ratio=ratio,
                loop_instructions=loop["instructions"], elts_per_warp=32 * ept, access_bytes=sum(glob) / ept,
                kernel=k["kernel"], errors=errors,
                verdict="issue-bound" if ratio >= 1 else "close" if ratio > CLOSE else "memory-bound")


def run(csrc: Path, bandwidth: float, clock: float) -> dict:
    """Compile every mode for both backends and count; -> {"rows": [analyse(...)], "meta": {...}}."""
    import triton

    issue_rate = SMS * SCHEDULERS * clock
    with tempfile.TemporaryDirectory() as tmp:
        nvcc = compile_cuda(csrc, Path(tmp))  # runs while Triton compiles
        triton_rows = [analyse(m, "triton", k, bandwidth, issue_rate) for m, k in zip(MODES, triton_kernels(MODES))]
        cuda = cuda_kernels(csrc, Path(tmp), nvcc)
    rows = []
    for m in MODES:
        key = _cuda_key(m)
        k = dict(cuda[key], elts_per_thread=16 // (4 if m.master == "fp32" else 2) if m.fp32_state else 1)
        shipped = None if m.fp32_state else cuda[("shipped", *key[1:3])]
        rows.append(analyse(m, "cuda", k, bandwidth, issue_rate, shipped))
    from triton.backends.nvidia.compiler import get_ptxas

    nvcc_path, ptxas = off.nvidia_tool("nvcc"), get_ptxas(off.ARCH).path
    meta = dict(date=datetime.date.today().isoformat(), triton=triton.__version__,
                nvcc=off.tool_version(nvcc_path), triton_ptxas=off.tool_version(ptxas),
                cuobjdump=off.tool_version(off.nvidia_tool("cuobjdump")), bandwidth=bandwidth, clock=clock, sms=SMS,
                schedulers=SCHEDULERS, issue_rate=issue_rate)
    return dict(rows=rows + triton_rows, meta=meta)


def markdown(result: dict) -> str:
    """The results file: tools, assumptions, one row per (mode, backend) and torch's fused AdamW."""
    m = result["meta"]
    lines = ["# Predicted cost per element of every kernel mode on an H200 (sm_90), counted offline", "",
             f"{m['date']}; nvcc {m['nvcc']}, Triton {m['triton']} (its ptxas {m['triton_ptxas']}), cuobjdump "
             f"{m['cuobjdump']}. Bandwidth {m['bandwidth'] / 1e12:g} TB/s (the device-to-device copy measured on an "
             f"H200 here, KINDS.md), issue rate {m['sms']} SMs x {m['schedulers']} schedulers x {m['clock'] / 1e9:g} GHz "
             f"= {m['issue_rate'] / 1e12:.3f}e12 warp instructions/s. How it counts: the docstring of "
             "benchmarks/kernel_cost.py. Nothing ran on a GPU: these are predictions from the compiled code.", "",
             "- instr/elt: SASS warp instructions per element on the main-loop path; CUDA lean modes: the shipped "
             "kernel's longest path with the mode's accesses (its runtime mode branches included); "
             "'pinned': the same kernel with the mode fixed at compile time (what a templated kernel would issue).",
             "- spills: bytes of local-memory stores (STL) per thread in the kernel; in loop: LDL/STL bytes per "
             "element on the loop path. SASS ld+st: global access bytes per element per thread (block-scale "
             "broadcasts and code-table gathers count here, not in bytes/elt).", "",
             "| mode | backend | bytes/elt | instr/elt | regs | spills B (in loop B/elt) | byte-bound ns/Melt | "
             "issue-bound ns/Melt | ratio | verdict | instr/elt pinned | pinned loop instr / elts per warp | SASS ld+st B/elt |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| torch fused AdamW (reference) | torch | 28 | - | - | - | {28e15 / m['bandwidth']:.0f} | - | - | "
             "p,g,m,v read + p,m,v written = 7 x 4 B | - | - | - |"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['backend']} | {r['bytes']:.4g} | {r['instr']:.3g} | {r['regs']} | "
                     f"{r['spill']} ({r['loop_local']:.3g}) | {r['byte_ns']:.0f} | {r['issue_ns']:.0f} | "
                     f"{r['ratio']:.2f} | {r['verdict']} | {r['instr_pinned']:.3g} | {r['loop_instructions']} / "
                     f"{r['elts_per_warp']} | {r['access_bytes']:.3g} |")
    lines += ["", "Summary (ratio = issue-bound / byte-bound time):"]
    for backend in ("cuda", "triton"):
        rs = [r for r in result["rows"] if r["backend"] == backend]
        counts = Counter(r["verdict"] for r in rs)
        worst = sorted(rs, key=lambda r: -r["ratio"])
        lines.append(f"- {backend}: {counts['memory-bound']} memory-bound, {counts['close']} close (ratio "
                     f"{CLOSE}-1), {counts['issue-bound']} issue-bound of {len(rs)}; issue-bound: "
                     + (", ".join(f"{r['mode']} {r['ratio']:.2f}" for r in worst if r["verdict"] == "issue-bound")
                        or "none"))
    bad = [f"- {r['backend']} {r['mode']}: {'; '.join(r['errors'])}" for r in result["rows"] if r["errors"]]
    return "\n".join(lines + (["", "Cross-check failures:", *bad] if bad else [])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line (last line)")
    ap.add_argument("--write", type=Path, help="write the markdown table here")
    ap.add_argument("--clock-ghz", type=float, default=CLOCK / 1e9, help="SM clock for the issue rate (1.98)")
    ap.add_argument("--bandwidth-tbs", type=float, default=BANDWIDTH / 1e12, help="DRAM bandwidth (4.3)")
    ap.add_argument("--csrc", type=Path, default=Path(os.environ.get("LISA_FUSED_COST_CSRC", ROOT / "csrc")),
                    help="the csrc/ to compile (default: this checkout's; env LISA_FUSED_COST_CSRC)")
    args = ap.parse_args(argv)
    result = run(args.csrc, args.bandwidth_tbs * 1e12, args.clock_ghz * 1e9)
    text = markdown(result)
    if args.write:
        args.write.write_text(text)
    print(json.dumps(result) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
