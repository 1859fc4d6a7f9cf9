"""The AdamW kernels compiled for sm_90 (H100/H200) on a machine without a GPU, and their main loop read
back: shared by tests/test_ptx.py (Triton signatures, ptxas report) and benchmarks/kernel_cost.py.

- Triton: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` gives PTX and the cubin
  (Triton ships ptxas, cuobjdump and nvdisasm in triton/backends/nvidia/bin).
- SASS: `cuobjdump -sass` of a cubin or fatbin; registers and local memory from `cuobjdump -res-usage`.
- The main loop of a kernel is the loop (a backward branch and the code between its target and it) with
  a global store and the widest global access, then the most bytes accessed per iteration.
- A loop path is the longest way from the loop head to a back edge, branches taken either way. SASS: by
  instructions issued; a block that CALLs out (the IEEE division / square-root slow paths, taken only for
  denormal or huge operands) ends no path. PTX: by global accesses, then instructions. Both count
  if-without-else blocks of divergent branches (lane 0 writes, even threads write a byte) as executed,
  as a warp whose lanes go both ways executes them; uniform branches (the lerp weight) take the longer
  side. An inner backward branch raises: the count would need a trip count. sass_loop_matching: the
  longest path with given accesses, for a kernel that picks modes at run time (a guarded access taken
  or not; an indirect jump, a switch's jump table, may go to any block start after it).
- Provenance: each PTX global access is traced through its address registers to the kernel parameter
  (index, byte offset) it derives from; values loaded from memory end the trace (indices read from the
  chunk table are data, not pointers).
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ARCH = 90
# Runtime scalars of the fp32 Triton kernel (triton_adamw._adamw_packed_kernel) that are not fp32.
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
    mode: {"pointers": {name: "*i16"} (default *fp32, chunks *i64), "constexprs": {...}, "layout": {...}}."""
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
            signature[name] = mode["pointers"].get(name, "*i64" if name in ("chunks_ptr", "bounds_ptr") else "*fp32")
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


def _ptxas_report(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([get_ptxas(ARCH).path, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(registers=int(re.search(r"Used (\d+) registers", text).group(1)),
                spill_bytes=int(spills.group(1)) + int(spills.group(2)), ptxas=text.strip())


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


# ------------------------------------------------------------------------------------------ loops
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


def _successors(code: list[Ins], j: int, head: int, back: int) -> list[int | None]:
    """Where control may go from instruction j inside the loop [head, back]: None closes the path (a
    back edge); exits from the loop are left out. Raises on an inner loop."""
    ins, out = code[j], []
    if ins.indirect:
        out += [x for x in range(j + 1, back + 1) if code[x - 1].ends or any(c.target == x for c in code)]
    if ins.target == head:
        out.append(None)
    elif ins.target is not None and head < ins.target < j:
        raise ValueError(f"inner loop at `{ins.text}`: instruction counts would need its trip count")
    elif ins.target is not None and j < ins.target <= back:
        out.append(ins.target)
    if not ins.ends and j + 1 <= back:
        out.append(j + 1)
    return [] if ins.dead else out


def _longest(code: list[Ins], head: int, back: int, score) -> list[int] | None:
    """The highest-scoring path head -> a back edge to head within [head, back], or None if none."""
    zero = tuple(0 for _ in score(code[head]))
    best: dict[int, tuple | None] = {None: zero}
    nxt: dict[int, int | None] = {}
    for j in range(back, head - 1, -1):
        options = [(best[t], t) for t in _successors(code, j, head, back) if best.get(t) is not None]
        if not options:
            best[j] = nxt[j] = None
            continue
        tail, nxt[j] = max(options, key=lambda o: o[0])
        best[j] = tuple(x + y for x, y in zip(score(code[j]), tail))
    if best[head] is None:
        return None
    path, j = [], head
    while j is not None:
        path.append(j)
        j = nxt[j]
    return path


def _candidates(code: list[Ins]) -> list[tuple[tuple, int, int]]:
    """Loops with a global store, best main-loop candidate first: (key, head, back edge)."""
    out = []
    for i, ins in enumerate(code):
        if ins.target is not None and ins.target <= i:
            accesses = [a for a in map(_access, code[ins.target:i + 1]) if a and a[0] != "local"]
            if any(kind == "st" for kind, _ in accesses):
                out.append(((max(n for _, n in accesses), sum(n for _, n in accesses)), ins.target, i))
    return sorted(out, reverse=True)


def main_loop(code: list[Ins]) -> tuple[int, int]:
    """(head, back edge) of the main loop: the best of _candidates whose head reaches its back edge."""
    for _, head, back in _candidates(code):
        if code[head].ends and code[head].target is None:
            continue  # a branch back to a shared `ret` / EXIT block, not a loop
        if _longest(code, head, back, lambda ins: (1,)) is not None:
            return head, back
    raise ValueError("no loop with a global store whose head reaches its back edge")


def loop_path(code: list[Ins], score) -> list[int]:
    """Indices of the highest-scoring path through the main loop (see the module docstring).
    score(ins) -> tuple, summed along the path and compared lexicographically."""
    return _longest(code, *main_loop(code), score)


def sass_loop_matching(code: list[Ins], accesses: Counter) -> int | None:
    """Instructions on the longest main-loop path whose global accesses ((kind, bytes) counts, local
    excluded) are exactly `accesses`, or None; a guarded (@P) access counts as taken or not. For a kernel
    that picks modes with uniform runtime branches and predicates: the path a mode with those accesses
    takes (the longest, where modes differ only in arithmetic)."""
    head, back = main_loop(code)
    want = tuple(sorted(accesses.items()))
    best: dict[int | None, dict[tuple, int]] = {None: {(): 0}}
    for j in range(back, head - 1, -1):
        ins = code[j]
        tails = [best[t] for t in _successors(code, j, head, back)]
        acc = _access(ins)
        merged: dict[tuple, int] = {}
        for tail in tails:
            for sig, n in tail.items():
                variants = [sig] if not acc or acc[0] == "local" or ins.guarded else []
                if acc and acc[0] != "local":  # a guarded access may or may not happen in a given mode
                    c = Counter(dict(sig))
                    c[acc] += 1
                    if not c - accesses:  # more of some access than wanted: no completion can match
                        variants.append(tuple(sorted(c.items())))
                for v in variants:
                    merged[v] = max(merged.get(v, -1), n + 1)
        best[j] = merged
    return best[head].get(want)


def spill_store_bytes(code: list[Ins]) -> int:
    """Bytes of STL (local-memory stores: spills, for kernels without local arrays) in a kernel, per thread;
    equals ptxas' "bytes spill stores" for the compiled cubin."""
    return sum(n for kind, n in (a for a in map(_access, [i for i in code if i.op.startswith("STL")]) if a))


def sass_loop(code: list[Ins]) -> dict:
    """{"instructions": n, "accesses": [(kind, bytes)]} of the SASS main-loop path."""
    path = loop_path(code, lambda ins: (1,))
    return {"instructions": len(path), "accesses": [a for a in (_access(code[j]) for j in path) if a]}


# ------------------------------------------------------------------------------------------ provenance
def _operands(text: str) -> list[str]:
    """Operands of a PTX instruction, split at the commas outside [] and {}."""
    body = re.sub(r"^@!?%\w+\s+", "", text).split(None, 1)
    out, depth, cur = [], 0, ""
    for ch in body[1] if len(body) > 1 else "":
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def ptx_loop_accesses(code: list[Ins], params: list[str]) -> list[dict]:
    """The global accesses on the PTX main-loop path: [{"kind", "bytes", "param": (index, offset)}]
    (see the module docstring). Raises when an address derives from no pointer parameter or from two."""
    defs: dict[str, list[tuple[Ins, list[str]]]] = {}
    for ins in code:
        ops = _operands(ins.text)
        if not ops or ins.op.startswith(("st.", "bar", "bra", "red.", "ret", "fence", "membar", "prefetch")):
            continue
        for reg in re.findall(r"%\w+", ops[0]):
            defs.setdefault(reg, []).append((ins, ops[1:]))

    def param_address(operand: str) -> tuple[int, int] | None:
        """(param index, offset) of a param-space address: `sym+8`, `%rd1+-88` with %rd1 = &param + k."""
        m = re.fullmatch(r"\[?\s*([%\w$]+)\s*(?:\+\s*(-?\d+))?\s*\]?", operand.strip())
        if not m:
            return None
        base, off = m.group(1), int(m.group(2) or 0)
        if base in params:
            return params.index(base), off
        for ins, srcs in defs.get(base, []):
            if ins.op.startswith("mov") and srcs and srcs[0] in params:
                return params.index(srcs[0]), off
            if ins.op.startswith("add") and len(srcs) == 2 and re.fullmatch(r"-?\d+", srcs[1]):
                inner = param_address(srcs[0])
                if inner:
                    return inner[0], inner[1] + int(srcs[1]) + off
        return None

    def sources(reg: str) -> set[tuple[int, int]]:
        found, seen, stack = set(), set(), [reg]
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            for ins, srcs in defs.get(r, []):
                if ins.op.startswith("ld.param"):
                    if re.search(r"\.[bus]64\b", ins.op):
                        found.add(param_address(srcs[0]))
                elif ins.op.startswith(("ld.", "atom.")):
                    continue  # a loaded value is data, not a pointer
                else:
                    stack += [s for src in srcs for s in re.findall(r"%\w+", src)]
        return found

    path = loop_path(code, lambda ins: (int(_access(ins) is not None), 1))
    out = []
    for j in path:
        acc = _access(code[j])
        if acc is None:
            continue
        ops = _operands(code[j].text)
        addr = next(o for o in ops if o.startswith("["))
        found = sources(re.findall(r"%\w+", addr)[0]) - {None}
        if len(found) != 1:
            raise ValueError(f"address of `{code[j].text}` derives from pointer parameters {sorted(found)}")
        out.append({"kind": acc[0], "bytes": acc[1], "param": found.pop()})
    return out
