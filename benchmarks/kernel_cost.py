"""GPU cost per element without a GPU: every kernel mode compiled for sm_90 here, its main loop read from
the SASS, and the predicted bound on an H200 (memory or instruction issue), next to torch's fused AdamW.

    python benchmarks/kernel_cost.py [--write benchmarks/results/kernel_cost_sm90.md] [--baseline FILE]
                                     [--json] [--clock-ghz 1.98] [--bandwidth-tbs 4.3]

Modes: moments fp32 / bf16 / 8bit / 4bit x master "fp32" (fp32 model), "fp32+bf16" (bf16 model: fp32
master, bf16 grads, bf16 copy written back), "kahan" and "sr" (bf16 params and grads); each also with
grad_sumsq (the grad_norm sampler, "+sumsq"), and the fp32 model with a GradScaler's grad_scale ("+scale").
Backends: CUDA (csrc/adamw_cuda.cu) and Triton (kernels/triton_adamw.py for fp32 state without sumsq,
kernels/triton_lean.py otherwise), the kernels the dispatcher (kernels/__init__.py) launches; how they are
compiled and which instantiation serves which mode: benchmarks/kernel_builds.py.

How it counts (per element of the packed buffer, steady state: a full chunk, every element valid):
- bytes/elt: DRAM bytes from the formats (contract.py, quant.py): each stream read and/or written once:
  grad, param (fp32 master 4+4, bf16 2+2), param_lowp 2, compensation 2+2, moments (fp32 4+4, bf16 2+2,
  8bit codes 1+1, 4bit 0.5+0.5) and the block scales 4/BLOCK read + 4/BLOCK written per moment.
- cross-check: the global accesses on the main-loop path of the PTX, each traced to the kernel parameter
  its address derives from (offline_loops.py), in bytes per element per stream. Streams each element owns
  (param, grad, moments, param_lowp, compensation) must be accessed exactly as the formats say (a 4-bit
  code byte loaded and stored once for its two elements). Scales must be read and written iff quantized;
  the code tables may be read (Triton: global gathers from L1; CUDA: shared memory); grad_scale read iff
  used; no other stream. The SASS path must move the PTX path's bytes, less at most the code-table
  gathers (ptxas merges repeated ones). Local memory (spills) is reported, not counted as DRAM bytes.
- instr/elt: SASS warp instructions on the main-loop path (offline_loops.py: the longest path head to back
  edge, divergent if-blocks counted as executed, IEEE div/sqrt slow-path calls not) over the elements one
  warp handles per iteration: 32 x the source's elements per thread (CUDA fp32 kernel 16 / grad bytes,
  CUDA lean kLeanVec, Triton BLOCK or TILE / (32 num_warps)) x the compiler's unroll (read off the grad
  loads). Barriers, shuffles and table gathers count one issue each. Work outside the main loop is not
  counted: the chunk's prologue, where the CUDA lean kernel builds its code tables (8-bit: 5702 entries
  over 256 threads at ~40 instructions each, i.e. ~0.1 warp instruction per element of a full 64K-element
  chunk, more for short segments). grad_sumsq is a runtime pointer in CUDA (the loop always sums g * g;
  "+sumsq" rows are the same kernel) and a constexpr in Triton.
- before: instr/elt and ratio of the same mode in a previous results file (--baseline; default: the
  file --write replaces), so a change shows per mode.

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
import json
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_loops as loops  # noqa: E402
import offline_sm90 as off  # noqa: E402
from kernel_builds import FORMATS, MASTERS, MODES, Mode, compile_cuda, cuda_key, cuda_kernels, triton_kernels  # noqa: E402,F401

BANDWIDTH, SMS, CLOCK, SCHEDULERS, CLOSE = 4.3e12, 132, 1.98e9, 4, 0.7
OWNED = ("param", "grad", "exp_avg", "exp_avg_sq", "param_lowp", "compensation")
ALIASES = {"p": "param", "g": "grad", "m": "exp_avg", "v": "exp_avg_sq", "low": "param_lowp", "comp": "compensation",
           "ms": "exp_avg_scale", "vs": "exp_avg_sq_scale", "qt": "qtable", "qtable": "qtable", "codes": "qtable",
           "gscale": "grad_scale", "scale": "grad_scale", "sumsq": "grad_sumsq"}


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


# ------------------------------------------------------------------------------------------ counting
def _stream(k: dict, param: tuple[int, int]) -> str:
    name = k["names"].get(param, f"parameter {param}")
    return ALIASES.get(re.sub(r"_ptr$", "", name), name)


def analyse(mode: Mode, backend: str, k: dict, bandwidth: float, issue_rate: float) -> dict:
    """One table row: bytes and instructions per element, the two bounds, and the cross-check's errors."""
    want = stream_bytes(mode)
    loop = loops.sass_loop(k["sass"])
    ptx = loops.ptx_loop_accesses(k["ptx"], k["params"])
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
            if abs(got[0] - r) > 1e-9 or abs(got[1] - w) > 1e-9:
                errors.append(f"{name}: loads {got[0]:g} B/elt, stores {got[1]:g} B/elt on the loop path; the "
                              f"formats say {r:g} and {w:g}")
        elif not (got[0] > 0 and got[1] > 0):
            errors.append(f"{name}: block scales must be read and written in the loop, got {got}")
    for name, (ld, st) in seen.items():
        allowed = (name in want or (name == "qtable" and quantized and st == 0)
                   or (name == "grad_scale" and mode.scale and st == 0))
        if not allowed:
            errors.append(f"{name}: {ld:g} B/elt loaded, {st:g} stored in the main loop; the formats move none")
    # access widths: each stream of >= 2 B per element, read or written, in 16-byte vectors (the aligned
    # path's 128-bit loads and stores; code bytes are narrower by design: 8 or 4 B per thread)
    narrow = sorted({(_stream(k, a["param"]), a["bytes"]) for a in ptx if a["kind"] in ("ld", "st")
                     and _stream(k, a["param"]) in OWNED and max(want.get(_stream(k, a["param"]), (0, 0))) >= 2
                     and a["bytes"] < 16})
    glob = [n for kind, n in loop["accesses"] if kind != "local"]
    ptx_bytes = sum(a["bytes"] for a in ptx)
    gathers = sum(a["bytes"] for a in ptx if _stream(k, a["param"]) == "qtable")
    if not ptx_bytes - gathers <= sum(glob) <= ptx_bytes:  # ptxas may merge or hoist code-table gathers only
        errors.append(f"SASS path: {len(glob)} global accesses, {sum(glob)} B; PTX path: {len(ptx)}, {ptx_bytes} B "
                      f"({gathers} B of them code-table gathers)")
    bytes_ = sum(r + w for r, w in want.values())
    instr = loop["instructions"] / (32 * ept)
    byte_ns, issue_ns = bytes_ * 1e15 / bandwidth, instr * 1e15 / issue_rate
    ratio = issue_ns / byte_ns
    local = [n for kind, n in loop["accesses"] if kind == "local"]
    return dict(mode=mode.name, backend=backend, bytes=bytes_, instr=instr, regs=k["regs"], spill=k["spill"],
                loop_local=sum(local) / ept, byte_ns=byte_ns, issue_ns=issue_ns, ratio=ratio,
                loop_instructions=loop["instructions"], elts_per_warp=32 * ept, access_bytes=sum(glob) / ept,
                kernel=k["kernel"], errors=errors, verdict=verdict(ratio),
                contractable=len(loops.contractable_pairs(k["ptx"])), narrow=[f"{n} {b} B" for n, b in narrow])


def instantiation(k: dict) -> dict:
    """What the guards check of every CUDA instantiation, table mode or not: registers, spill-store bytes
    (whole kernel) and local-memory bytes per thread on its main-loop path, and the PTX's contractable
    mul+add pairs (offline_loops.contractable_pairs; a few, as text)."""
    pairs = loops.contractable_pairs(k["ptx"])
    local = sum(n for kind, n in loops.sass_loop(k["sass"])["accesses"] if kind == "local")
    return dict(regs=k["regs"], spill=k["spill"], loop_local=local, contractable=len(pairs),
                pairs=[" ; ".join(p) for p in pairs[:3]])


def verdict(ratio: float) -> str:
    return "issue-bound" if ratio >= 1 else "close" if ratio > CLOSE else "memory-bound"


def run(csrc: Path, bandwidth: float, clock: float) -> dict:
    """Compile every mode for both backends and count; -> {"rows": [analyse(...)], "meta": {...}}."""
    import triton

    issue_rate = SMS * SCHEDULERS * clock
    with tempfile.TemporaryDirectory() as tmp:
        nvcc = compile_cuda(csrc, Path(tmp))  # runs while Triton compiles
        triton_rows = [analyse(m, "triton", k, bandwidth, issue_rate) for m, k in zip(MODES, triton_kernels(MODES))]
        cuda = cuda_kernels(csrc, Path(tmp), nvcc)
    rows = [analyse(m, "cuda", cuda[cuda_key(m)], bandwidth, issue_rate) for m in MODES]
    from triton.backends.nvidia.compiler import get_ptxas

    nvcc_path, ptxas = off.nvidia_tool("nvcc"), get_ptxas(off.ARCH).path
    meta = dict(date=datetime.date.today().isoformat(), triton=triton.__version__,
                nvcc=off.tool_version(nvcc_path), triton_ptxas=off.tool_version(ptxas),
                cuobjdump=off.tool_version(off.nvidia_tool("cuobjdump")), bandwidth=bandwidth, clock=clock, sms=SMS,
                schedulers=SCHEDULERS, issue_rate=issue_rate,
                cuda_kernels={k["kernel"]: instantiation(k) for k in cuda.values()})
    return dict(rows=rows + triton_rows, meta=meta)


COLUMNS = ("mode", "backend", "bytes/elt", "instr/elt before", "instr/elt", "ratio before", "ratio", "verdict",
           "regs", "spills B (in loop B/elt)", "byte-bound ns/Melt", "issue-bound ns/Melt",
           "loop instr / elts per warp", "SASS ld+st B/elt")


def read_table(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """{(backend, mode): {column: cell}} of a results file this script wrote (any version of its table)."""
    rows, header = {}, None
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["mode", "backend"]:
            header = cells
        elif header and len(cells) == len(header) and not set(cells[0]) <= set("-"):
            row = dict(zip(header, cells))
            rows[(row["backend"], row["mode"])] = row
    return rows


def markdown(result: dict, baseline: dict | None = None) -> str:
    """The results file: tools, assumptions, one row per (mode, backend), torch's fused AdamW, and the
    instr/elt and ratio of `baseline` (read_table of a previous file) as "before"."""
    m, baseline = result["meta"], baseline or {}
    lines = ["# Predicted cost per element of every kernel mode on an H200 (sm_90), counted offline", "",
             f"{m['date']}; nvcc {m['nvcc']}, Triton {m['triton']} (its ptxas {m['triton_ptxas']}), cuobjdump "
             f"{m['cuobjdump']}. Bandwidth {m['bandwidth'] / 1e12:g} TB/s (the device-to-device copy measured on an "
             f"H200 here, KINDS.md), issue rate {m['sms']} SMs x {m['schedulers']} schedulers x {m['clock'] / 1e9:g} GHz "
             f"= {m['issue_rate'] / 1e12:.3f}e12 warp instructions/s. How it counts: the docstring of "
             "benchmarks/kernel_cost.py. Nothing ran on a GPU: these are predictions from the compiled code.", "",
             "- instr/elt: SASS warp instructions per element on the main-loop path of the kernel that serves the "
             "mode; 'before': the same count in the previous version of this file. tests/test_kernel_cost.py "
             "reads the instr/elt column as each mode's ceiling (x 1.1): regenerate this file with "
             "`python benchmarks/kernel_cost.py --write benchmarks/results/kernel_cost_sm90.md` when a kernel "
             "change moves a count, and commit it with the change.",
             "- spills: bytes of local-memory stores (STL) per thread in the kernel; in loop: LDL/STL bytes per "
             "element on the loop path. SASS ld+st: global access bytes per element per thread (block-scale "
             "broadcasts and code-table gathers count here, not in bytes/elt).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
             f"| torch fused AdamW (reference) | torch | 28 | - | - | - | - | p,g,m,v read + p,m,v written = 7 x 4 B | "
             f"- | - | {28e15 / m['bandwidth']:.0f} | - | - | - |"]
    for r in result["rows"]:
        old = baseline.get((r["backend"], r["mode"]), {})
        lines.append(f"| {r['mode']} | {r['backend']} | {r['bytes']:.4g} | {old.get('instr/elt', '-')} | "
                     f"{r['instr']:.3g} | {old.get('ratio', '-')} | {r['ratio']:.2f} | {r['verdict']} | {r['regs']} | "
                     f"{r['spill']} ({r['loop_local']:.3g}) | {r['byte_ns']:.0f} | {r['issue_ns']:.0f} | "
                     f"{r['loop_instructions']} / {r['elts_per_warp']} | {r['access_bytes']:.3g} |")
    lines += ["", "Summary (ratio = issue-bound / byte-bound time):"]
    for backend in ("cuda", "triton"):
        rs = [r for r in result["rows"] if r["backend"] == backend]
        counts = Counter(r["verdict"] for r in rs)
        before = Counter(verdict(float(o["ratio"])) for o in (baseline.get((backend, r["mode"])) for r in rs) if o)
        worst = sorted(rs, key=lambda r: -r["ratio"])
        lines.append(f"- {backend}: {counts['memory-bound']} memory-bound, {counts['close']} close (ratio "
                     f"{CLOSE}-1), {counts['issue-bound']} issue-bound of {len(rs)}"
                     + (f" (before: {before['memory-bound']}, {before['close']}, {before['issue-bound']})" if before else "")
                     + "; issue-bound: "
                     + (", ".join(f"{r['mode']} {r['ratio']:.2f}" for r in worst if r["verdict"] == "issue-bound")
                        or "none"))
    bad = [f"- {r['backend']} {r['mode']}: {'; '.join(r['errors'])}" for r in result["rows"] if r["errors"]]
    return "\n".join(lines + (["", "Cross-check failures:", *bad] if bad else [])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line (last line)")
    ap.add_argument("--write", type=Path, help="write the markdown table here")
    ap.add_argument("--baseline", type=Path, help="a previous results file for the 'before' columns "
                                                   "(default: the file --write replaces)")
    ap.add_argument("--clock-ghz", type=float, default=CLOCK / 1e9, help="SM clock for the issue rate (1.98)")
    ap.add_argument("--bandwidth-tbs", type=float, default=BANDWIDTH / 1e12, help="DRAM bandwidth (4.3)")
    ap.add_argument("--csrc", type=Path, default=Path(os.environ.get("LISA_FUSED_COST_CSRC", ROOT / "csrc")),
                    help="the csrc/ to compile (default: this checkout's; env LISA_FUSED_COST_CSRC)")
    args = ap.parse_args(argv)
    result = run(args.csrc, args.bandwidth_tbs * 1e12, args.clock_ghz * 1e9)
    base = args.baseline or (args.write if args.write and args.write.is_file() else None)
    text = markdown(result, read_table(base) if base else None)
    if args.write:
        args.write.write_text(text)
    print(json.dumps(result) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
