"""The Triton kernel compiled ahead of time for sm_90 (H100/H200), on the CPU: CI's only guard of GPU speed.

Triton compiles for a GPU target without a GPU (it ships its own ptxas). For each mode the optimizer
launches (fp32; bf16 params with fp32 masters and bf16 grads; fp16 with a grad scale) the PTX main loop
(the unmasked loop a chunk runs where its segment's addresses are 16-byte aligned: the loop that loads
the most bytes; the masked loop for the rest moves one element per thread per access) must move every
stream with vector accesses (`ld/st.global.v4` for the fp32 streams p, m, v and fp32 g,
v2 or v4 for 16-bit ones) and no scalar ones, hold no barrier (a shared-memory layout conversion), and
the cubin Triton built (its own ptxas, with its flags: --regAllocOptLevel=2, -lineinfo, --fmad=false, the
code a launch loads) must have no spills (no local-memory instruction) and at most MAX_REGISTERS
registers. The kernel that masked every block on `offs < end` failed all of this (scalar b32/b16 loads,
96 registers, barriers in bf16). Re-running ptxas on the PTX without Triton's flags, as this test once
did, reports another allocation: for the earlier lean kernel's 8-bit mode, no spill, where the cubin
stores and loads 32 B per thread.

The compile runs in a subprocess: conftest.py sets TRITON_INTERPRET=1, under which @triton.jit functions
are interpreted and cannot be compiled. LISA_FUSED_PTX_KERNEL=path/to/triton_adamw.py checks another
version of the kernel file (e.g. `git show HEAD~3:lisa_fused/kernels/triton_adamw.py > /tmp/old.py`).
Run `python tests/test_ptx.py` to print the per-mode report.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# shared with benchmarks/kernel_cost.py: signatures for the offline compile, ptxas' report
from offline_sm90 import ARCH, _signature, cubin_resources  # noqa: E402

# 64 registers per thread leave room for 32 resident warps per SM of 64K registers (50% occupancy); the
# kernel needs 40-46 (4 elements per thread per block) with Triton 3.6 and 3.9 (40-43 on the pointer table
# with Triton 3.9); the one that masked every block 78-96.
MAX_REGISTERS = 64

# Per mode: pointer types that differ from *fp32, constexpr flags, runtime scalars' types, and how many
# fp32 streams are loaded / stored in the main loop (one 128-bit access each at 4 elements per thread).
# The params, grads and lowps are addressed through the pointer table; the main loop is the path taken
# where a chunk's addresses are 16-byte aligned.
MODES = {
    "fp32": dict(
        pointers={}, constexprs=dict(GRAD_KIND=0, LOWP=0, HAS_SCALE=False),
        fp32_loads=4, fp32_stores=3, lowp_loads=0, lowp_stores=0,
    ),
    "bf16-master": dict(  # bf16 model: fp32 master params, bf16 grads (int16 bits), bf16 copy written back
        pointers={}, constexprs=dict(GRAD_KIND=1, LOWP=1, HAS_SCALE=False),
        fp32_loads=3, fp32_stores=3, lowp_loads=1, lowp_stores=1,
    ),
    "fp16-scaled": dict(  # fp16 model with a loss scale: grads divided by *scale_ptr
        pointers={}, constexprs=dict(GRAD_KIND=2, LOWP=2, HAS_SCALE=True),
        fp32_loads=3, fp32_stores=3, lowp_loads=1, lowp_stores=1,
    ),
}


# ------------------------------------------------------------------------------ compile (subprocess side)
def _kernel_module():
    path = os.environ.get("LISA_FUSED_PTX_KERNEL")
    if not path:
        from lisa_fused.kernels import triton_adamw

        return triton_adamw
    spec = importlib.util.spec_from_file_location("lisa_fused.kernels._ptx_checked", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_bytes(line: str) -> int:
    """Bytes one thread loads with a PTX global load (0 for any other instruction)."""
    m = re.search(r"\bld\.global[\w.]*?(?:\.v(\d))?\.[bsuf](8|16|32|64)\b", line)
    return int(m.group(1) or 1) * int(m.group(2)) // 8 if m else 0


def main_loop(ptx: str) -> list[str]:
    """Instructions of the PTX loop that loads the most bytes per thread (label ... backward branch to
    it): the unmasked loop over aligned blocks, not the masked one (one element per thread)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"(\$L__BB\d+_\d+):", ln))}
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", ln)
        if m and labels.get(m.group(1), i + 1) < i:
            loops.append(lines[labels[m.group(1)]:i + 1])
    return max(loops, key=lambda body: sum(map(_load_bytes, body)), default=[])


def compile_report() -> dict:
    """{mode: facts} for every mode in MODES, compiled for sm_90 with the GPU launch configuration."""
    import triton
    from triton.backends.compiler import GPUTarget

    module = _kernel_module()
    _, block, num_warps = module._GPU_CONFIG
    fn = module._adamw_segments_kernel
    report = {}
    for name, mode in MODES.items():
        mode = dict(mode, layout=dict(BLOCK=block))
        signature, constexprs, attrs = _signature(fn, mode)
        src = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                                  options=dict(num_warps=num_warps, enable_fp_fusion=False))
        ptx = compiled.asm["ptx"]
        loop = main_loop(ptx)
        memory_ops = [re.search(r"\b(ld|st)\.global[\w.]*", ln).group(0) for ln in loop
                      if re.search(r"\b(ld|st)\.global", ln)]
        report[name] = dict(
            loop_found=bool(loop),
            loop_memory_ops=memory_ops,
            loop_barriers=sum(bool(re.search(r"\b(bar|barrier)\.", ln)) for ln in loop),
            kernel_barriers=len(re.findall(r"\b(?:bar|barrier)\.", ptx)),
            triton=triton.__version__, block=block, num_warps=num_warps,
            **cubin_resources(compiled.asm["cubin"]),
        )
    return report


# ------------------------------------------------------------------------------ tests (pytest side)
@pytest.fixture(scope="module")
def report():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not importable: the offline sm_90 compile needs it (pip install triton)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    out = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, f"offline sm_{ARCH} compile failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def kinds(ops: list[str], kind: str, width: str) -> int:
    """How many of `ops` are `kind` (ld/st) accesses of vector `width` ('v4', 'v2' or '' for scalar)."""
    return sum(1 for op in ops if op.startswith(kind + ".") and
               (f".{width}." in op + "." if width else not re.search(r"\.v\d", op)))


@pytest.mark.parametrize("mode", MODES)
def test_main_loop_uses_vector_accesses(report, mode):
    facts, want = report[mode], MODES[mode]
    assert facts["loop_found"], f"{mode}: no loop in the PTX"
    ops = facts["loop_memory_ops"]
    scalar = [op for op in ops if not re.search(r"\.v\d", op)]
    assert not scalar, f"{mode}: scalar global accesses in the main loop {scalar} (all: {ops})"
    assert kinds(ops, "ld", "v4") >= want["fp32_loads"], f"{mode}: expected {want['fp32_loads']} 128-bit loads, got {ops}"
    assert kinds(ops, "st", "v4") >= want["fp32_stores"], f"{mode}: expected {want['fp32_stores']} 128-bit stores, got {ops}"
    vec_loads = kinds(ops, "ld", "v4") + kinds(ops, "ld", "v2")
    vec_stores = kinds(ops, "st", "v4") + kinds(ops, "st", "v2")
    assert vec_loads >= want["fp32_loads"] + want["lowp_loads"], f"{mode}: 16-bit streams not vectorised: {ops}"
    assert vec_stores >= want["fp32_stores"] + want["lowp_stores"], f"{mode}: 16-bit streams not vectorised: {ops}"


@pytest.mark.parametrize("mode", MODES)
def test_main_loop_has_no_layout_conversion(report, mode):
    assert report[mode]["loop_barriers"] == 0, (
        f"{mode}: {report[mode]['loop_barriers']} barriers in the main loop (shared-memory layout conversions "
        f"between streams of different element sizes)")


@pytest.mark.parametrize("mode", MODES)
def test_masked_path_has_no_layout_conversion(report, mode):
    """The masked loop (misaligned chunks, tails) has its own block shape, so its one-element-per-thread
    accesses are not widened to the aligned loop's layout, which would move its stores through shared
    memory: no barrier anywhere in the kernel."""
    assert report[mode]["kernel_barriers"] == 0, f"{mode}: {report[mode]['kernel_barriers']} barriers in the kernel"


@pytest.mark.parametrize("mode", MODES)
def test_no_spills_and_bounded_registers(report, mode):
    facts = report[mode]
    assert facts["spill_stores"] == facts["spill_loads"] == 0, (
        f"{mode}: the cubin spills {facts['spill_stores']} B stored, {facts['spill_loads']} B loaded per thread "
        f"(stack {facts['stack']} B, {facts['registers']} registers)")
    assert facts["registers"] <= MAX_REGISTERS, (
        f"{mode}: {facts['registers']} registers > {MAX_REGISTERS} (occupancy falls)")


if __name__ == "__main__":
    facts = compile_report()
    if "--json" in sys.argv:
        print(json.dumps(facts))
    else:
        for name, f in facts.items():
            from collections import Counter

            print(f"{name:12s} regs={f['registers']} spills={f['spill_stores']}+{f['spill_loads']} B "
                  f"loop_barriers={f['loop_barriers']} kernel_barriers={f['kernel_barriers']} "
                  f"loop={dict(Counter(f['loop_memory_ops']))} (triton {f['triton']}, BLOCK={f['block']}, "
                  f"num_warps={f['num_warps']})")
