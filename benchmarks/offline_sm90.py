"""The AdamW kernels compiled for sm_90 (H100/H200) on a machine without a GPU, and read back as SASS and
PTX instruction lists: shared by tests/test_ptx.py (Triton signatures, the real cubin's registers and
spills) and benchmarks/kernel_cost.py; the main-loop readers are in offline_loops.py.

- Triton: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` gives PTX and the cubin,
  built by Triton's own ptxas with Triton's flags (Triton ships ptxas, cuobjdump and nvdisasm in
  triton/backends/nvidia/bin), so the cubin is the one a launch would load.
- SASS: `cuobjdump -sass` of a cubin or fatbin; registers and stack from `cuobjdump -res-usage`; spills
  from the local-memory instructions (STL / LDL) of the SASS.
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ARCH = 90
# Runtime scalars of the fp32 Triton kernel (triton_adamw._adamw_segments_kernel) that are not fp32.
INT_SCALARS = {"lerp_small"}
FLOAT_SCALARS = {"lerp_w", "lerp_w_minus_1", "beta2", "one_minus_beta2", "eps"}


# ------------------------------------------------------------------------------------------ tools
def nvidia_tool(name: str) -> str | None:
    """Path of cuobjdump / nvdisasm / ptxas: Triton's bundled copy, else $CUDA_HOME/bin, else PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    return str(home) if home.is_file() else shutil.which(name)


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ Triton
def _signature(fn, mode: dict, int_scalars=INT_SCALARS, float_scalars=FLOAT_SCALARS) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compiler.ASTSource, as a launch on aligned tensors.
    mode: {"pointers": {name: "*i16"} (default *fp32; the chunk and pointer tables *i64), "constexprs": {...},
    "layout": {...}}. The segments' own params / grads / lowps are no arguments: their addresses come from
    the pointer table (segs_ptr), and the kernel decides their alignment at run time."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            values = {**mode["constexprs"], **mode["layout"]}
            if name in values:
                constexprs[name] = values[name]
            elif param.default is not inspect.Parameter.empty:  # a mode flag added later, off by default
                constexprs[name] = param.default
            else:
                raise KeyError(f"constexpr {name} of {fn.__name__} has no value in the caller's mode table")
        elif name.endswith("_ptr"):
            signature[name] = mode["pointers"].get(name, "*i64" if name in ("chunks_ptr", "segs_ptr") else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as at launch
        elif name in int_scalars:
            signature[name] = "i32"
        elif name in float_scalars:
            signature[name] = "fp32"
        else:
            raise KeyError(f"runtime argument {name} of {fn.__name__}: add its type to the caller's scalar sets")
    return signature, constexprs, attrs


def compile_triton(fn, mode: dict, num_warps: int, **scalar_sets) -> dict:
    """{"ptx": str, "cubin": bytes} of `fn` for sm_90 (no GPU needed; TRITON_INTERPRET must be unset)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = _signature(fn, mode, **scalar_sets)
    src = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                              options=dict(num_warps=num_warps, enable_fp_fusion=False))
    return {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"]}


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class Ins:
    op: str                 # opcode with modifiers: "LDG.E.128", "ld.global.v4.b32"
    text: str               # the whole instruction, predicate included
    target: int | None = None  # list index of a branch target
    ends: bool = False      # no fall-through (unconditional branch, exit, return)
    dead: bool = False      # a path through it is not counted (SASS CALL: slow path)
    guarded: bool = False   # has a guard predicate (@P0): a memory access that may not happen
    indirect: bool = False  # BRX/JMX (a switch's jump table): may go to any block start after it


def _sass_ins(text: str) -> Ins:
    pred = re.match(r"@!?U?P[T\d]\s+", text)
    body = text[pred.end():] if pred else text
    op = body.split()[0]
    ins = Ins(op, text, dead=op.startswith("CALL"), guarded=bool(pred))
    if op.startswith(("BRX", "JMX")):
        ins.indirect = ins.ends = True
    if op.startswith(("BRA", "EXIT", "RET")):  # BRA.DIV and `BRA !P1, ...` may fall through
        ins.ends = not (pred or op.startswith("BRA.DIV") or re.search(r"\bU?P\d\s*,", body))
    return ins


def _sass_section(text: str) -> dict[str, list[Ins]]:
    funcs = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        rows = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
        index = {a: k for k, (a, _) in enumerate(rows)}
        code = []
        for _, line in rows:
            ins = _sass_ins(line)
            if ins.op.startswith("BRA") and not ins.op.startswith("BRA.DIV"):  # BRA.DIV: only when diverged
                ins.target = index[int(re.findall(r"0x[0-9a-f]+", line)[-1], 16)]
            code.append(ins)
        funcs[name] = code
    return funcs


def _usage_section(text: str) -> dict[str, dict[str, int]]:
    return {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(2))}
            for m in re.finditer(r"Function (\S+):\s*\n\s*(.*)", text)}


def _cuobjdump(flag: str, binary: str) -> list[str]:
    """cuobjdump's output, one string per ELF image of a fatbin (one for a cubin)."""
    out = subprocess.run([nvidia_tool("cuobjdump"), flag, binary], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n?Fatbin elf code:", out)
    return parts[1:] if len(parts) > 1 else parts


def disassemble(binary: str) -> list[tuple[dict[str, list[Ins]], dict[str, dict[str, int]]]]:
    """Per ELF image of a cubin or fatbin: ({kernel: SASS instructions, branch targets as list indices},
    {kernel: {"REG", "STACK", "SHARED", "LOCAL", ...} from cuobjdump -res-usage})."""
    return list(zip((_sass_section(s) for s in _cuobjdump("-sass", binary)),
                    (_usage_section(u) for u in _cuobjdump("-res-usage", binary)), strict=True))


def disassemble_cubins(cubins: list[bytes]) -> list[tuple[dict, dict]]:
    """disassemble() of each cubin, bundled into one fatbin first where `fatbinary` is found (cuobjdump's
    start-up, ~0.3 s, then runs once instead of once per cubin)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"k{i}.cubin" for i in range(len(cubins))]
        for path, data in zip(paths, cubins):
            path.write_bytes(data)
        fatbinary = nvidia_tool("fatbinary")
        if fatbinary is None:
            return [disassemble(str(p))[0] for p in paths]
        bundle = Path(tmp) / "all.fatbin"
        subprocess.run([fatbinary, "--64", f"--create={bundle}",
                        *[f"--image3=kind=elf,sm={ARCH},file={p}" for p in paths]], check=True, capture_output=True)
        return disassemble(str(bundle))


def ptx_functions(ptx: str) -> dict[str, tuple[list[Ins], list[str]]]:
    """{entry name: (instructions, parameter symbols in order)} of a PTX module."""
    funcs, lines, k = {}, ptx.splitlines(), 0
    while k < len(lines):
        m = re.search(r"\.entry\s+(\w+)\s*\(", lines[k])
        k += 1
        if not m:
            continue
        params = []
        while not lines[k].strip().startswith(")"):
            params += re.findall(r"(\w+_param_\d+)", lines[k])
            k += 1
        while lines[k].strip() != "{":
            k += 1
        code, labels, fixups, depth = [], {}, [], 0
        for k in range(k, len(lines)):
            line = lines[k].split("//")[0].strip()
            depth += (line == "{") - (line == "}")
            if depth == 0:
                break
            if not line or line.startswith(".") or line in "{}":
                continue
            if re.fullmatch(r"\$[\w.]+:", line):
                labels[line[:-1]] = len(code)
                continue
            text = line.rstrip(";").strip()
            pred = re.match(r"@!?%\w+\s+", text)
            op = text[pred.end():].split()[0] if pred else text.split()[0]
            ins = Ins(op, text)
            if op.startswith("bra") or op in ("ret", "exit", "trap"):
                ins.ends = not pred
            if op.startswith("bra"):
                fixups.append((len(code), text.split()[-1]))
            code.append(ins)
        for j, label in fixups:
            code[j].target = labels[label]
        funcs[m.group(1)] = (code, params)
    return funcs


# ------------------------------------------------------------------------------------------ accesses
def _access(ins: Ins) -> tuple[str, int] | None:
    """("ld" | "st" | "atom" | "local", bytes) of a global or local memory instruction, else None."""
    op = ins.op
    if op.startswith(("LDG", "STG", "RED", "ATOMG", "LDL", "STL")):
        kind = {"LDG": "ld", "STG": "st", "RED": "atom", "ATO": "atom", "LDL": "local", "STL": "local"}[op[:3]]
        parts = op.split(".")
        bits = next((int(re.sub(r"\D", "", p)) for p in parts[1:] if re.fullmatch(r"(128|64|[US](8|16))", p)), 32)
        return kind, bits // 8
    m = re.match(r"(ld|st|red|atom)\.(global|local)\.", op)
    if m:
        kind = "local" if m.group(2) == "local" else {"red": "atom"}.get(m.group(1), m.group(1))
        vec = re.search(r"\.v(\d)", op)
        bits = int(re.findall(r"\.[bsuf](8|16|32|64)\b", op)[-1])
        return kind, bits // 8 * (int(vec.group(1)) if vec else 1)
    return None


def spill_store_bytes(code: list[Ins]) -> int:
    """Bytes of STL (local-memory stores: spills, for kernels without local arrays) in a kernel, per thread;
    equals ptxas' "bytes spill stores" for the compiled cubin."""
    return sum(n for kind, n in (a for a in map(_access, [i for i in code if i.op.startswith("STL")]) if a))


def cubin_resources(cubin: bytes) -> dict:
    """{"registers", "stack", "spill_stores", "spill_loads"} of the one kernel in a cubin, per thread: what
    a launch of it gets (registers and stack frame from cuobjdump -res-usage, spill bytes from its STL /
    LDL instructions: these kernels have no local arrays, so all local memory is spills)."""
    (sass, usage), = disassemble_cubins([cubin])
    (name, code), = sass.items()
    spills = {"STL": 0, "LDL": 0}
    for ins in code:
        acc = _access(ins)
        if acc and acc[0] == "local":
            spills[ins.op[:3]] += acc[1]
    return dict(registers=usage[name]["REG"], stack=usage[name].get("STACK", 0), spill_stores=spills["STL"],
                spill_loads=spills["LDL"])
