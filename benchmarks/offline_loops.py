"""The main loop of a kernel compiled by offline_sm90.py, read from its SASS or PTX instruction list: its
longest path and the global accesses on it, each traced to the pointer it derives from.

- The main loop of a kernel is the loop (a backward branch and the code between its target and it) with
  a global store and the widest global access, then the fewest predicated (masked) global accesses (a
  kernel with an unmasked loop over aligned blocks and a masked one for the rest moves the same data in
  both), then the most bytes accessed per iteration.
- A loop path is the longest way from the loop head to a back edge, branches taken either way. SASS: by
  instructions issued; a block that CALLs out (the IEEE division / square-root slow paths, taken only for
  denormal or huge operands) ends no path. PTX: by global accesses, then instructions. Both count
  if-without-else blocks of divergent branches (lane 0 writes, even threads write a byte) as executed,
  as a warp whose lanes go both ways executes them; uniform branches (the lerp weight) take the longer
  side. An inner backward branch raises: the count would need a trip count. An indirect jump (a switch's
  jump table) may go to any block start after it.
- Provenance: each PTX global access is traced through its address registers to the kernel parameter
  (index, byte offset) it derives from; values loaded from memory end the trace (indices read from the
  chunk table are data, not pointers). An address that derives from no parameter is a pointer read from
  a table in memory (a segment pointer table): it is traced to the one 64-bit global load among its
  unscaled terms (not multiplied or shifted: those are indices), named (parameter index, byte offset,
  byte offset of the load within the table row: the constant part of its address). A generic (no state
  space) load or store on the loop path raises: its bytes would go uncounted, and it is slower than a
  global one.
"""
from __future__ import annotations

import re

from offline_sm90 import Ins, _access


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
            body = [(a, c) for c in code[ins.target:i + 1] if (a := _access(c)) and a[0] != "local"]
            accesses = [a for a, _ in body]
            if any(kind == "st" for kind, _ in accesses):
                masked = sum(c.guarded or c.text.startswith("@") for _, c in body)
                out.append(((max(n for _, n in accesses), -masked, sum(n for _, n in accesses)), ins.target, i))
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
    """The global accesses on the PTX main-loop path: [{"kind", "bytes", "param": (index, offset), or
    (index, offset, byte offset in the table row) for a pointer read from a table}] (see the module
    docstring). Raises when an address derives from no pointer parameter or table entry, or from two."""
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

    def table_entry(operand: str) -> tuple[int, int, int] | None:
        """(param index, offset, constant byte offset) of a load address: a table parameter plus a
        row index term plus constants (`[%rd + 16]`, add.s64 with an immediate)."""
        m = re.fullmatch(r"\[?\s*(%\w+)\s*(?:\+\s*(-?\d+))?\s*\]?", operand.strip())
        if not m:
            return None
        reg, const, seen = m.group(1), int(m.group(2) or 0), set()
        while reg not in seen and defs.get(reg):
            seen.add(reg)
            ins, srcs = defs[reg][0]
            if ins.op.startswith("ld.param") and re.search(r"\.[bus]64\b", ins.op):
                base = param_address(srcs[0])
                return None if base is None else (base[0], base[1], const)
            if ins.op.startswith(("mov", "cvta")) and srcs:
                reg = srcs[0]
            elif ins.op.startswith("add") and len(srcs) == 2 and re.fullmatch(r"-?\d+", srcs[1]):
                reg, const = srcs[0], const + int(srcs[1])
            elif ins.op.startswith("add") and len(srcs) == 2:  # base + row index: follow the side with a base
                sides = [r for r in srcs if r.startswith("%") and table_entry(f"[{r}]") is not None]
                if len(sides) != 1:
                    return None
                reg = sides[0]
            elif ins.op.startswith("mad") and len(srcs) == 3:  # row index * stride + base
                reg = srcs[2]
            else:
                return None
        return None

    def loaded_pointers(reg: str) -> set[tuple[int, int, int]]:
        """table_entry of each 64-bit global load among the unscaled terms of `reg`."""
        found, seen, stack = set(), set(), [reg]
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            for ins, srcs in defs.get(r, []):
                regs = [x for x in srcs if x.startswith("%")]
                m = re.match(r"ld\.global\.(?:\w+\.)*?(?:v(\d)\.)?[bus]64$", ins.op)
                if m:  # a vector load of two table entries: the k-th register is 8 k bytes further
                    entry = table_entry(srcs[0])
                    k = re.findall(r"%\w+", _operands(ins.text)[0]).index(r)
                    found.add(None if entry is None else (*entry[:2], entry[2] + 8 * k))
                elif ins.op.startswith(("add", "sub", "mov", "cvta")):
                    stack += regs[:1] if ins.op.startswith("sub") else regs
                elif ins.op.startswith("and") and len(srcs) == 2 and re.fullmatch(r"-\d+", srcs[1]):
                    stack += regs  # an alignment mask (addr & -16)
                elif ins.op.startswith("mad") and len(srcs) == 3:
                    stack += [srcs[2]] if srcs[2].startswith("%") else []
        return found - {None}

    path = loop_path(code, lambda ins: (int(_access(ins) is not None), 1))
    out = []
    for j in path:
        acc = _access(code[j])
        if acc is None:
            if re.match(r"(ld|st|red|atom)(\.(weak|relaxed|volatile|L1::\w+|L2::\w+|nc))*\.(v\d\.)?[bsuf]\d+", code[j].op):
                raise ValueError(f"generic memory access `{code[j].text}` on the main-loop path: its bytes would go "
                                 "uncounted (say which state space the pointer is in, e.g. __isGlobal)")
            continue
        ops = _operands(code[j].text)
        addr = next(o for o in ops if o.startswith("["))
        reg = re.findall(r"%\w+", addr)[0]
        found = sources(reg) - {None} or loaded_pointers(reg)
        if len(found) != 1:
            raise ValueError(f"address of `{code[j].text}` derives from pointer parameters {sorted(found)}")
        out.append({"kind": acc[0], "bytes": acc[1], "param": found.pop()})
    return out


# ------------------------------------------------------------------------------------------ contraction
_FP = r"(?:\.ftz)?(?:\.sat)?\.(?:f16|f16x2|bf16|bf16x2|f32|f64)"
_CONTRACTABLE_MUL = re.compile(rf"mul{_FP}$")
_CONTRACTABLE_ADD = re.compile(rf"(?:add|sub){_FP}$")


def contractable_pairs(code: list[Ins]) -> list[tuple[str, str]]:
    """The (mul, add) instruction pairs of a PTX function that ptxas or the driver's JIT may fuse into one
    FMA: a floating-point mul without a rounding modifier whose result an add or sub without one reads.
    PTX ISA, floating-point mul: "A mul instruction with no rounding modifier ... may be optimized
    aggressively by the code optimizer. In particular, mul/add sequences with no rounding modifiers may
    be optimized to use fused-multiply-add instructions on the target device"; an explicit modifier
    (mul.rn.f32, add.rn.f32: what nvcc --fmad=false and __fmul_rn / __fadd_rn emit) is "treated
    conservatively". Explicit fma.rn instructions are FMAs by intent and not listed."""
    products: dict[str, str] = {}
    for ins in code:
        if _CONTRACTABLE_MUL.match(ins.op):
            ops = _operands(ins.text)
            if ops:
                products[ops[0]] = ins.text
    pairs = []
    for ins in code:
        if _CONTRACTABLE_ADD.match(ins.op):
            for src in _operands(ins.text)[1:]:
                if src in products:
                    pairs.append((products[src], ins.text))
    return pairs
