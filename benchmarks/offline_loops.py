"""The main loop of a kernel compiled by offline_sm90.py, read from its SASS or PTX instruction list: its
longest path and the global accesses on it, each traced to the pointer it derives from.

- The main loop of a kernel is the loop (a backward branch and the code between its target and it) with
  a global store and the widest global access, then the most bytes accessed per iteration.
- A loop path is the longest way from the loop head to a back edge, branches taken either way. SASS: by
  instructions issued; a block that CALLs out (the IEEE division / square-root slow paths, taken only for
  denormal or huge operands) ends no path. PTX: by global accesses, then instructions. Both count
  if-without-else blocks of divergent branches (lane 0 writes, even threads write a byte) as executed,
  as a warp whose lanes go both ways executes them; uniform branches (the lerp weight) take the longer
  side. An inner backward branch raises: the count would need a trip count. An indirect jump (a switch's
  jump table) may go to any block start after it.
- Provenance: each PTX global access is traced through its address registers to the kernel parameter
  (index, byte offset) it derives from; values loaded from memory end the trace (indices read from the
  chunk table are data, not pointers), except the pointer columns of a pointer table (the segment table:
  per segment the addresses of its own param, grad and lowp tensors): a 64-bit global load at byte
  displacement d of a row of table parameter T is the pointer (T, d). A generic (no state space) load or
  store on the loop path raises: its bytes would go uncounted, and it is slower than a global one.
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


def ptx_loop_accesses(code: list[Ins], params: list[str], tables: dict | None = None) -> list[dict]:
    """The global accesses on the PTX main-loop path: [{"kind", "bytes", "param": (index, offset)}]
    (see the module docstring); `tables`: {(index, offset) of a pointer-table parameter: {byte
    displacements of its pointer columns}}, whose pointers come back as "param": ((index, offset), d).
    Raises when an address derives from no pointer or from two, or on a generic access."""
    tables = tables or {}
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

    def table_pointer(ins: Ins, srcs: list[str]):
        """((table, d)) when `ins` loads a 64-bit pointer column d of a row of a pointer table, else None."""
        if not tables or not (ins.op.startswith("ld.global") and re.search(r"\.[bus]64\b", ins.op)):
            return None
        m = re.fullmatch(r"\[\s*(%\w+)\s*(?:\+\s*(-?\d+))?\s*\]", srcs[0].strip())
        if not m:
            return None
        base = sources(m.group(1)) - {None}
        if len(base) == 1 and (t := base.pop()) in tables and int(m.group(2) or 0) in tables[t]:
            return t, int(m.group(2) or 0)
        return None

    def sources(reg: str) -> set[tuple]:
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
                    pointer = table_pointer(ins, srcs)
                    if pointer is not None:
                        found.add(pointer)
                    continue  # any other loaded value is data, not a pointer
                else:
                    stack += [s for src in srcs for s in re.findall(r"%\w+", src)]
        return found

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
        found = sources(re.findall(r"%\w+", addr)[0]) - {None}
        if len(found) != 1:
            raise ValueError(f"address of `{code[j].text}` derives from pointer parameters {sorted(found)}")
        out.append({"kind": acc[0], "bytes": acc[1], "param": found.pop()})
    return out
