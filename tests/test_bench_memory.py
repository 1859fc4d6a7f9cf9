"""`lisa-fused bench`'s memory numbers: the tensor meter's baseline semantics, a real method run against
the planner, anonymous vs raw RSS, and the table's three memory columns."""
from __future__ import annotations

import importlib.util
import os
import sys
from argparse import Namespace

import pytest
import torch

import lisa_fused
from lisa_fused.bench import bench, preflight, report
from lisa_fused.bench.memory import RssMeter, TensorMeter
from lisa_fused.plan.planner import Row
from lisa_fused.plan.trace import AllocationTracker

MIB = 2**20


def test_baseline_storage_freed_during_the_pass_lowers_live():
    w = torch.ones(1000)                   # 4000 bytes, alive at the start: not counted
    kept = torch.ones(10)                  # alive at the start and through the pass
    tracker = AllocationTracker()
    tracker.baseline([w, kept, w.view(-1)])  # a second view of one storage registers it once
    with tracker:
        a = torch.ones(250)                # +1000
        v = w.view(10, 100)                # a view of a baseline storage: nothing new
        assert (tracker.live, tracker.peak) == (1000, 1000)
        del w, v                           # its storage dies: -4000
        assert tracker.live == -3000
        b = torch.ones(500)                # +2000
        assert (tracker.live, tracker.peak) == (-1000, 1000)
        c = torch.ones(2000)               # +8000: peak above the start = 7000
        del a
        assert (tracker.live, tracker.peak) == (6000, 7000)
        del b, c
    assert tracker.live == -4000 and kept.sum() == 10


def test_preexisting_keeps_its_old_meaning():
    """The planner's preexisting(): never counted, not even when freed (fake tensors are not freed)."""
    w = torch.ones(1000)
    tracker = AllocationTracker()
    tracker.preexisting([w])
    with tracker:
        a = torch.ones(250)
        del w
        assert (tracker.live, tracker.peak) == (1000, 1000)
        del a
    assert tracker.live == 0


def test_tensor_meter_counts_from_its_start():
    before = torch.ones(MIB // 4)          # 1 MiB alive at start
    meter = TensorMeter()
    meter.start()
    try:
        spike = torch.empty(4 * MIB, dtype=torch.uint8)
        del spike, before                  # 4 MiB up and down, then the baseline's 1 MiB freed
        x = torch.zeros(MIB, dtype=torch.uint8)
    finally:
        meter.stop()
    assert meter.peak() == 4 * MIB
    assert meter.current() == 0 and x.numel() == MIB


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_anonymous_peak_is_at_most_the_raw_rss_peak():
    meter = RssMeter()
    meter.start()
    spike = torch.ones(16 * MIB // 4)      # anonymous, touched
    del spike
    assert meter.file_added() >= 0
    assert 15 * MIB <= meter.peak() <= meter.peak_rss()
    assert meter.peak() == meter.peak_rss() - meter.file_added()


def _row(method, **kw):
    base = dict(method=method, base_method=method, peak_mem_bytes=60 * MIB, peak_tensor_bytes=50 * MIB,
                opt_device_bytes=10 * MIB, opt_state_device_bytes=10 * MIB, opt_host_bytes=2 * MIB)
    return {**base, **kw}


PLANNED = {"weights_bytes": 6 * MIB, "rows": [
    Row("full", "", 6 * MIB, 19 * MIB, 38 * MIB, 0, 63 * MIB),
    Row("lisa", "", 4 * MIB, 7 * MIB, 36 * MIB, 12 * MIB, 59 * MIB, kwargs={"inactive_moments": "host"}),
    Row("lisa", "", 4 * MIB, 16 * MIB, 36 * MIB, 0, 56 * MIB, kwargs={"inactive_moments": "device"}),
]}


def test_planned_is_above_the_whole_model_and_states_are_matched():
    full = preflight.planned_above_baseline(_row("full"), PLANNED, "cpu")
    assert full == dict.fromkeys(("planned_peak_bytes", "planned_tensor_bytes", "planned_mem_bytes"), 57 * MIB)
    # LISA: minus the model's 6 MiB (not the Row's 4: what FusedLISA binds is in its state).
    host = preflight.planned_above_baseline(_row("lisa", opt_state_device_bytes=7 * MIB), PLANNED, "cpu")
    assert host == {"planned_peak_bytes": 53 * MIB, "planned_tensor_bytes": 53 * MIB,  # host reserved up front
                    "planned_mem_bytes": 43 * MIB}  # the RSS: only the 2 MiB written of the 12 MiB store
    assert preflight.planned_above_baseline(_row("lisa", opt_state_device_bytes=7 * MIB), PLANNED, "cuda")[
        "planned_mem_bytes"] == 53 * MIB  # no host adjustment off the CPU (the row's peak has no host bytes)
    dev = preflight.planned_above_baseline(_row("lisa-device", opt_state_device_bytes=11 * MIB, opt_host_bytes=0), PLANNED, "cpu")
    assert dev == {"planned_peak_bytes": 50 * MIB, "planned_tensor_bytes": 45 * MIB, "planned_mem_bytes": 45 * MIB}
    assert preflight.planned_above_baseline(_row("lisa-8bit"), PLANNED, "cpu")["planned_peak_bytes"] is None


def test_table_has_peak_mem_tensors_and_planned_columns():
    rows = []
    for r in (_row("full", peak_tensor_bytes=int(57.2 * MIB), peak_mem_bytes=63 * MIB),
              _row("lisa-device", opt_state_device_bytes=11 * MIB, opt_host_bytes=0), _row("lora", peak_tensor_bytes=None)):
        r.update(preflight.planned_above_baseline(r, PLANNED, "cpu"))
        rows.append(r)
    rows[2].update(planned_peak_bytes=None, planned_tensor_bytes=None, planned_mem_bytes=None)
    lines = report.format_table(rows).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    i, j, k = head.index("peak mem MiB"), head.index("tensors MiB"), head.index("planned MiB")
    assert [c[i] for c in cells] == ["63.0", "60.0", "60.0"]
    assert [c[j] for c in cells] == ["57.2", "50.0", "-"]
    assert [c[k] for c in cells] == ["57.0 (-0.3%)", "45.0* (-10.0%)", "-"]
    note = report.planner_note({"settings": dict(dtype="float32", batch_size=4, seq_len=128, lora_rank=16, gamma=2,
                                                 device="cpu"), "weights_bytes": 6 * MIB}, rows)
    assert "6.00 MiB" in note and "lisa-device 50.0 MiB" in note and "full 57.0 (-9.5%)" in note


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """`full`, `lisa` and (where pip badam is installed) `badam` through bench.run_one (their own processes,
    memory pass + timed pass), and the planner for the same settings."""
    tmp = tmp_path_factory.mktemp("bench_mem")
    g = torch.Generator().manual_seed(0)
    data_path = tmp / "data.pt"
    torch.save({"ft_train": torch.randint(0, 256, (20000,), generator=g),
                "ft_eval": torch.randint(0, 256, (2000,), generator=g)}, data_path)
    args = Namespace(preset="tiny", model=None, steps=3, batch_size=2, seq_len=64, device="cpu",
                     dtype="float32", gamma=2, switch_every=1, lora_rank=4, lr=3e-4, lora_lr=1e-3, seed=0,
                     eval_windows=2, methods=["full", "lisa"] + ["badam"] * bool(importlib.util.find_spec("badam")))
    spec = {k: getattr(args, k) for k in ("preset", "model", "steps", "batch_size", "seq_len", "device", "dtype",
                                          "gamma", "switch_every", "lora_rank", "lr", "lora_lr", "seed",
                                          "eval_windows")}
    spec.update(data_path=str(data_path), base_state=None, lisa_fused_file=lisa_fused.__file__)
    rows = {}
    for method in args.methods:
        row, err = bench.run_one(dict(spec, method=method, label=method), tmp)
        assert err is None, err
        rows[method] = row
    from lisa_fused.bench.models import model_config

    planned = preflight.plan_bench(args, model_config("tiny", None))
    return rows, planned


@pytest.mark.slow
def test_peak_tensor_bytes_of_a_real_run_is_the_planners(real_runs):
    rows, planned = real_runs
    for method, row in rows.items():
        assert row["eval_loss"] != row["eval_loss_start"], method  # the method trained something
        assert "WARNING" not in row["memory_how"], row["memory_how"]  # memory pass losses == timed pass's
        p = preflight.planned_above_baseline(row, planned, "cpu")
        # The planner's fake-tensor step and the tracker on the real run count the same storages; the run
        # adds its input batch (2 x 64 int64 = 1 KiB) and the previous step's loss.
        assert row["peak_tensor_bytes"] == pytest.approx(p["planned_tensor_bytes"], rel=0.002), method
        assert 0 < row["peak_mem_bytes"] <= row["peak_rss_bytes"], method
        assert row["peak_rss_bytes"] - row["peak_mem_bytes"] == row["file_pages_added_bytes"]
        assert len(row["tensor_mem_trace"]) == 3
    # full: AdamW's state + grads (19.16 MiB) plus the traced activations; nothing of the weights.
    full = rows["full"]
    assert full["tensor_mem_trace"][-1] == pytest.approx(full["opt_device_bytes"], abs=16 * 1024)  # + batch, loss
    # lisa: the params keep their own storage (the weights are the model's, as for full), and FusedLISA's
    # state is only what it adds: the planner's weights equal the model's.
    planner_lisa = preflight.planner_row("lisa", planned)
    assert planner_lisa.weights_bytes == planned["weights_bytes"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's mallinfo2")
def test_cpu_memory_breakdown_script_reports_tensors_below_malloc_in_use():
    import re
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cpu_memory_breakdown.py")
    # MKL's per-thread buffer cache is malloc'd outside torch's tensors, and its size depends on the host CPU
    # (2.5 MiB on one VM, 26 MiB on another): this test checks torch's own allocations, so MKL's cache is off.
    env = dict(os.environ, MKL_DISABLE_FAST_MM="1")
    out = subprocess.run([sys.executable, script, "full", "--steps", "1"], capture_output=True, text=True,
                         check=True, timeout=300, env=env).stdout
    line = next(ln for ln in out.splitlines() if "after forward" in ln)
    tensors = float(re.search(r"live tensors ([\d.]+) MiB", line).group(1))
    in_use = float(re.search(r"malloc in-use \+([\d.]+) MiB", line).group(1))
    # AdamW's state does not exist before the first step: activations only, every tensor from malloc.
    assert 20 < tensors <= in_use < tensors + 8, line
    assert "live tensor peak" in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
