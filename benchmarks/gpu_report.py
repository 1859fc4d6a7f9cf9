"""Collect what benchmarks/gpu_check.sh wrote under OUT into OUT/results.json and OUT/results.md.

Reads precheck.json, versions.txt, summary.txt, bench-kernels.json, bench-switch.json (pytest-benchmark
JSON; each case's numbers are in its extra_info) and bench/results.md (`lisa-fused bench`). Whatever is
missing is reported as missing, never filled in.

    python benchmarks/gpu_report.py --out OUT --command CMD --started ISO --target gpu|cpu --failed 0|1
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

KERNEL_COLS = [("method", "method"), ("mode", "mode"), ("params", "params"), ("ms", "median ms"),
               ("gbps", "GB/s"), ("pct_of_stream", "% of stream"), ("pct_of_copy", "% of copy")]
SWITCH_COLS = [("case", "case"), ("policy", "policy"), ("block_params", "block params"),
               ("paged_bytes_per_switch", "paged bytes (out+in)"), ("switch_ms", "switch ms"),
               ("switch_GBps", "switch GB/s"), ("pinned_GBps", "pinned GB/s (both ways)"),
               ("pct_of_pinned", "% of pinned"), ("normal_step_ms", "normal step ms"),
               ("switch_step_ms", "switch step ms"), ("switch_step_ratio", "switch/normal")]


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    if not path.endswith(".json"):
        return text
    try:
        return json.loads(text)
    except ValueError:  # empty (pytest-benchmark writes nothing under --benchmark-disable) or cut off
        return None


def bench_rows(doc):
    rows = []
    for b in (doc or {}).get("benchmarks", []):
        row = dict(b.get("extra_info", {}))
        row.setdefault("case", b.get("name"))
        if b.get("stats"):
            row.setdefault("ms", round(1e3 * b["stats"]["median"], 3))
        rows.append(row)
    return rows


def table(rows, cols):
    if not rows:
        return ["(no results: see gpu_check.log)"]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
    return out


def main():
    ap = argparse.ArgumentParser()
    for a in ("--out", "--command", "--started", "--target", "--failed"):
        ap.add_argument(a, required=True)
    args = ap.parse_args()
    out = args.out
    kernels = bench_rows(load(os.path.join(out, "bench-kernels.json")))
    switch = bench_rows(load(os.path.join(out, "bench-switch.json")))
    env = kernels[0] if kernels else (switch[0] if switch else {})
    doc = {
        "command": args.command, "target": args.target, "started": args.started,
        "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "all_stages_ok": args.failed == "0",
        "device": env.get("device"), "versions": {k: env.get(k) for k in ("torch", "torch_cuda", "triton", "driver")},
        "precheck": load(os.path.join(out, "precheck.json")),
        "stages": (load(os.path.join(out, "summary.txt")) or "").splitlines(),
        "kernels": kernels, "switch": switch,
        "bench_7b": load(os.path.join(out, "bench", "results.json")),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    md = [f"# gpu_check ({args.target}): {doc['device']}", "",
          f"- command: `{args.command}` (from the repository root, OUT={out})",
          f"- started {args.started}, finished {doc['finished']}; all stages ok: {doc['all_stages_ok']}",
          f"- versions: {json.dumps(doc['versions'])}", "", "## Stages", "", "```", *doc["stages"], "```", "",
          "## AdamW step on the packed active set (benchmarks/test_bench_kernels.py)", "",
          *table(kernels, KERNEL_COLS), "",
          "## Switch (benchmarks/test_bench_switch.py)", "", *table(switch, SWITCH_COLS), "",
          "## lisa-fused bench (end to end; its arguments are in gpu_check.sh)", ""]
    bench_md = load(os.path.join(out, "bench", "results.md"))
    if bench_md is None:
        md.append("(no results: see gpu_check.log)")
    else:
        md += [line for line in bench_md.splitlines() if line.startswith("|")] or ["(no table in bench/results.md)"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
