"""benchmarks/gpu_check.sh plans within its deadline (CI runs --dry-run), its helpers run on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def dry_run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


@pytest.mark.parametrize("target", [[], ["--cpu"]], ids=["h200", "rehearsal"])  # an id "gpu" would mark it gpu
def test_dry_run_plan_fits_the_deadline(target):
    r = dry_run(*target)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    budgets = {ln.split()[0]: int(ln.split()[1].rstrip("s")) for ln in lines[1:]}
    total = budgets.pop("total")
    assert total == sum(budgets.values()) <= 570  # the device call is limited to 600 s
    # cheap checks first, then the three checks of the GPU path only a GPU can make (issue 29), ~2 minutes
    assert list(budgets)[:7] == ["precheck", "install", "versions", "sync-debug", "sanitizer", "delayed-copies",
                                 "gpu-tests"]
    assert budgets["sync-debug"] + budgets["sanitizer"] + budgets["delayed-copies"] <= 150
    assert "-m gpu" in r.stdout
    assert ("--no-build-isolation --no-deps" in r.stdout) == (not target)
    flag = " --cpu" if target else ""
    for script in ("gpu_sync_debug.py", "gpu_delayed_copies.py"):
        assert f"benchmarks/{script}{flag}" in r.stdout
    assert f"sanitize{flag}" in r.stdout
    sanitize = SCRIPT.read_text().split("sanitize() {")[1].split("\n}")[0]
    for tool in ("memcheck", "racecheck", "synccheck", "CUDA_FORCE_PTX_JIT=1", "test_lean_kernels.py"):
        assert tool in sanitize, tool


def test_dry_run_fails_when_the_budgets_do_not_fit():
    r = dry_run(GPU_CHECK_DEADLINE_S="300")
    assert r.returncode == 1 and "over the 300s deadline" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gpu_sync_debug.py", "gpu_sanitize.py", "gpu_delayed_copies.py"])
def test_gpu_stage_scripts_rehearse_on_the_cpu(script):
    """The three GPU-path stages' scripts run their loops on the CPU (--cpu, as gpu_check.sh --cpu does), so
    they do not rot between GPU runs; on the CPU they check only themselves."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--cpu"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "FAIL" not in r.stdout and r.stdout.strip()


def test_precheck_reports_every_check(tmp_path):
    out = tmp_path / "precheck.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_precheck.py"), "--cpu", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    found = json.loads(out.read_text())
    for name in ("setuptools", "wheel", "pybind11", "driver", "torch", "nvcc"):
        assert name in found and name in r.stdout, name
    assert r.returncode == (1 if found["failures"] else 0)


def test_report_collects_results_and_says_what_is_missing(tmp_path):
    kernels = {"benchmarks": [{"name": "test_packed_step[cuda-bf16-packed-cuda]", "stats": {"median": 0.01},
                               "extra_info": {"method": "packed-cuda", "mode": "bf16", "gbps": 3000.0,
                                              "device": "NVIDIA H200", "torch": "2.11.0"}}]}
    (tmp_path / "bench-kernels.json").write_text(json.dumps(kernels))
    (tmp_path / "summary.txt").write_text("precheck      ok       rc=0      1s of 15s\n")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "--out", str(tmp_path),
                    "--command", "benchmarks/gpu_check.sh", "--started", "2026-01-01T00:00:00Z", "--target", "gpu",
                    "--failed", "0"], check=True, timeout=60)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["device"] == "NVIDIA H200" and doc["kernels"][0]["ms"] == 10.0 and doc["switch"] == []
    md = (tmp_path / "results.md").read_text()
    assert "| packed-cuda | bf16 |" in md and md.count("(no results: see gpu_check.log)") == 2  # switch, 7B bench
