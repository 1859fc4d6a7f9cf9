"""`lisa-fused bench`: end to end in a subprocess on a tiny setting, argument errors, and its parts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lisa_fused
from lisa_fused.bench import data, preflight, report
from lisa_fused.bench.memory import RssMeter
from lisa_fused.bench.run import split_switch_steps
from lisa_fused.cli import build_parser, main

PACKAGE_ROOT = Path(lisa_fused.__file__).resolve().parents[1]  # the child imports this same lisa_fused
METHODS = ("full", "lora", "lisa", "lisa-device")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # A decoy package where the method processes run (the cache folder is their working directory):
    # they must import the parent's lisa_fused, not whatever the working directory holds.
    decoy = out / "cache" / "lisa_fused"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy lisa_fused was imported')\n")
    cmd = [sys.executable, "-m", "lisa_fused", "bench", "--steps", "3", "--base-steps", "2", "--batch-size", "2",
           "--seq-len", "16", "--eval-windows", "2", "--switch-every", "1", "--lora-rank", "4",
           "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("OMP_WAIT_POLICY", None)  # the bench re-runs itself with PASSIVE (test_bench_json_...)
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.slow
def test_bench_writes_table_json_png(bench_run):
    out, proc = bench_run
    # stdout: one line per method against lisa, the 120-column table (one row per method), its legend
    assert proc.stdout.startswith("lisa (the reference): eval loss "), proc.stdout
    for method in METHODS:
        assert f"| {method.ljust(11)} |" in proc.stdout, proc.stdout
        if method != "lisa":
            assert f"\n{method}: " in proc.stdout and "the step time" in proc.stdout
    assert all(len(line) <= 120 for line in proc.stdout.splitlines()), max(proc.stdout.splitlines(), key=len)
    assert proc.stdout.count("dev MiB: ") == 1  # the legend, once
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert md.split("\n", 4)[4].startswith(proc.stdout.split("\n")[0])  # results.md leads with the same screen
    assert re.search(r"\|\s+method\s+\|\s+backend\s+\|.*\|\s+eval loss\s+\|\s+load\s+\|\n\|-+\|", md)
    assert re.search(r"\|\s+peak mem MiB\s+\|\s+tensors MiB\s+\|\s+planned MiB\s+\|", md)
    assert "planned MiB: `lisa-fused plan` for the same settings" in md
    # progress on stderr: captured, so no terminal width: a plain line per phase
    assert "lora: timed pass 2/2: 3 steps ..." in proc.stderr and "lora: timed pass 2/2: done, 3 steps in" in proc.stderr


@pytest.mark.slow
def test_bench_json_has_every_field_for_every_method(bench_run):
    out, _ = bench_run
    result = json.loads((out / "results.json").read_text())
    header, rows = result["header"], result["rows"]
    assert result["failures"] == []
    assert header["omp_wait_policy"] == "PASSIVE"  # set by the bench itself, before torch loaded OpenMP
    for key in ("device", "torch", "transformers", "peft", "python", "date", "command", "config"):
        assert header[key], key
    assert header["command"].startswith("lisa-fused bench --steps 3")
    assert header["config"]["gamma"] == 2 and header["config"]["lora_rank"] == 4
    assert header["planner"]["error"] is None and header["planner"]["weights_bytes"] > 0
    assert {r["method"] for r in header["planner"]["rows"]} == {"full", "lora", "lisa"}
    planned_peak_at = {r["method"]: r.get("peak_at") for r in header["planner"]["rows"]}
    assert result["skipped"] == []
    assert [r["method"] for r in rows] == list(METHODS)
    for row in rows:
        # optimizer bytes on the device: its state after step() + the grads read before it, per step
        assert row["opt_device_bytes_trace"] == [a + b for a, b in zip(row["opt_state_device_bytes_trace"],
                                                                         row["grad_bytes_trace"])]
        assert row["opt_device_bytes"] == max(row["opt_device_bytes_trace"]) >= row["opt_device_end_bytes"] \
            == row["opt_device_bytes_trace"][-1]
        assert row["grad_bytes"] == max(row["grad_bytes_trace"]) > 0 and row["opt_state_device_bytes"] > 0
        for key in report.FIELDS:
            assert key in row, f"{row['method']}: {key} is missing"
            if key != "switch_step_ms":  # null for methods that never switch
                assert row[key] is not None, f"{row['method']}: {key} is None"
        assert len(row["loss_curve"]) == len(row["opt_device_bytes_trace"]) == 3
        assert row["peak_mem_bytes"] > 0 and row["opt_step_ms"] > 0 and row["tokens_per_s"] > 0
        # CPU memory pass: anonymous peak <= raw RSS peak; live tensor bytes as the planner predicts them
        assert 0 < row["peak_mem_bytes"] <= row["peak_rss_bytes"]
        assert row["peak_tensor_bytes"] > 0 and len(row["tensor_mem_trace"]) == 3
        # LISA at this tiny seq_len peaks in backward, where the bytes depend on where the drawn blocks sit:
        # the planner takes the worst place (active blocks on top), the run's draw is elsewhere, and a
        # 3-step run has paged fewer blocks than the steady state: 2% (1.2% / 1.5% measured, 2026-12-07)
        rel = 0.02 if row["base_method"].startswith("lisa") and str(planned_peak_at.get("lisa")).startswith("backward") \
            else 0.01
        assert row["planned_tensor_bytes"] == pytest.approx(row["peak_tensor_bytes"], rel=rel), row["method"]
        assert row["tokens_per_s"] == pytest.approx(2 * 16 / (row["step_ms"] / 1e3))  # one statistic
        assert row["lisa_fused_file"] == lisa_fused.__file__
        assert row["busy"] == "ok" or row["busy"].startswith("BUSY: ")
        assert 0 < row["cpu_share"] <= 1.5
    assert {r["backend"] for r in rows} == {"torch", "cpu"}, "the compiled CPU kernel did not run"
    # switch_every=1 and 3 steps: step 1 switches and is followed by step 2; full/LoRA never switch.
    assert [r["switches"] for r in rows] == [0, 0, 1, 1]
    assert rows[2]["switch_step_ms"] > 0 and rows[0]["switch_step_ms"] is None


@pytest.mark.slow
def test_bench_methods_start_equal_and_lisa_policies_agree(bench_run):
    out, _ = bench_run
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    starts = {r["eval_loss_start"] for r in rows.values()}
    assert len(starts) == 1, "methods did not start from identical weights"
    first_losses = {round(r["loss_curve"][0], 5) for r in rows.values()}
    assert len(first_losses) == 1, "methods did not see identical first batches"
    for name, r in rows.items():  # every method trained: its eval loss moved off the shared start
        assert r["eval_loss"] != r["eval_loss_start"], name
    # "host" and "device" are the same math; they differ only in where inactive moments live.
    assert rows["lisa"]["loss_curve"] == pytest.approx(rows["lisa-device"]["loss_curve"], rel=1e-5)
    assert rows["lisa-device"]["opt_device_bytes"] > rows["lisa"]["opt_device_bytes"]
    assert rows["lisa"]["opt_host_bytes"] > 0 and rows["lisa-device"]["opt_host_bytes"] == 0
    assert len(set(rows["lisa"]["opt_device_bytes_trace"])) == 1, "lisa's device bytes changed over switches"
    assert rows["lisa"]["trainable_params"] < rows["full"]["trainable_params"]


BAD_ARGS = [
    (["bench", "--methods", "full,adam"], "unknown method 'adam'"),
    (["bench", "--methods", "lisa,lisa"], "listed twice"),
    (["bench", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["bench", "--batch-size", "two"], "invalid int value: 'two'"),
    (["bench", "--gamma", "9"], "--gamma 9: larger than the model's 8 layers"),
    (["bench", "--lr=-1e-4"], "--lr: must be > 0, got -1e-4"),
    (["bench", "--preset", "llama-3-70b"], "invalid choice: 'llama-3-70b'"),
    (["bench", "--data", "/no/such/file.txt"], "--data '/no/such/file.txt': no such file"),
    (["bench", "--model", "/no/such/dir"], "--model '/no/such/dir': no such directory"),
    (["bench", "--device", "tpu"], "--device 'tpu'"),
    (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
    ([], "required: COMMAND"),
]
if not torch.cuda.is_available():
    BAD_ARGS.append((["bench", "--device", "cuda"], "--device 'cuda': CUDA is not available"))


@pytest.mark.parametrize("argv,message", BAD_ARGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_exit_2_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_data_file_wrong_suffix_and_bad_jsonl(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n")
    with pytest.raises(SystemExit):
        main(["bench", "--data", str(csv)])
    assert "expected a .txt or .jsonl file" in capsys.readouterr().err
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: expected an object with a string field \"text\""):
        data.read_text_file(str(bad))


def test_data_too_short_for_seq_len(tmp_path, capsys):
    txt = tmp_path / "short.txt"
    txt.write_text("x" * 100)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--data", str(txt), "--seq-len", "64", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "its eval split has 12 tokens, fewer than --seq-len 64 needs (64)" in capsys.readouterr().err


def test_data_splits_and_byte_tokens(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    corpus = data.finetune_corpus(str(jsonl))
    assert corpus.eval == ["doc 0", "doc 10"] and len(corpus.train) == 18
    txt = tmp_path / "d.txt"
    txt.write_text("x" * 100)
    assert [len(d) for d in data.finetune_corpus(str(txt)).eval] == [10]
    ids = data.encode_documents(["hé"])
    assert ids.tolist() == [data.BOS, 104, 0xC3, 0xA9, data.EOS]
    assert not set(data.base_corpus()) & set(data.finetune_corpus().train + data.finetune_corpus().eval)
    a = data.batch_starts(1000, 4, 3, 16, seed=5)
    assert torch.equal(a, data.batch_starts(1000, 4, 3, 16, seed=5)) and int(a.max()) <= 1000 - 16


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_rss_meter_sees_a_freed_spike():
    meter = RssMeter()
    meter.start()
    spike = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed before peak() is read
    del spike
    assert meter.peak() >= 60 * 2**20
    assert meter.current() < 32 * 2**20


def test_gamma_is_checked_against_a_local_checkpoint(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                vocab_size=300).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tmp_path), "--gamma", "4"])
    assert exc.value.code == 2
    assert "--gamma 4: larger than the model's 3 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", str(tmp_path), "--base-steps", "5"])
    assert "a --model checkpoint is already trained" in capsys.readouterr().err


def test_switch_and_normal_steps_are_split():
    # K=3: steps 2, 5, 8 switch; the next step (3, 6) may wait for the page-in; step 8 has no next.
    ms = [100, 10, 11, 30, 12, 10, 25, 11, 10]
    split = split_switch_steps(ms, 3)
    assert split["normal_step_ms"] == 11  # steps 1, 4, 7: 10, 12, 11 (step 0 excluded)
    assert split["switch_step_ms"] == 27.5 and split["switches"] == 2  # max(11, 30), max(10, 25)
    assert split_switch_steps(ms, None) == {"normal_step_ms": 11.0, "switch_step_ms": None, "switches": 0}


def test_busy_rows_are_flagged():
    assert report.busy_reason({"load_avg": [0.2, 0.4], "cpu_share": 0.95}, 2) == "ok"
    assert report.busy_reason({"load_avg": [1.9, 3.2], "cpu_share": 0.5, "threads": 2}, 2) == \
        "BUSY: load 3.2/2 CPUs, 1.2 beyond its own threads, got 50% of its CPUs"
    # A quiet machine: the load is the method's own two threads (the fresh-user run flagged 1.6/2).
    assert report.busy_reason({"load_avg": [1.1, 1.8], "cpu_share": 0.97, "threads": 2}, 2) == "ok"
    assert report.busy_reason({"load_avg": [1.1, 2.4], "cpu_share": 0.97, "threads": 1}, 2) == \
        "BUSY: load 2.4/2 CPUs, 1.4 beyond its own threads"


def test_busy_reads_what_other_processes_ran_where_it_is_measured():
    # The tiny model keeps one of two threads busy (cpu_share ~0.5) on a quiet machine: not BUSY.
    assert report.busy_reason({"load_avg": [0.7, 1.4], "cpu_share": 0.5, "threads": 2, "others_share": 0.03}, 2) == "ok"
    assert report.busy_reason({"load_avg": [0.7, 1.4], "cpu_share": 0.97, "threads": 2, "others_share": 0.4}, 2) == \
        "BUSY: other processes used 40% of the 2 CPUs"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_machine_busy_seconds_sees_another_process_spin():
    from lisa_fused.bench.run import machine_busy_seconds

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    time.sleep(0.2)
    busy0, wall0 = machine_busy_seconds(), time.perf_counter()
    time.sleep(1.0)
    busy1, wall1 = machine_busy_seconds(), time.perf_counter()
    spin.wait()
    others = (busy1 - busy0) / ((wall1 - wall0) * (os.cpu_count() or 1))
    # One spinning process is a whole CPU: at least 1/cpus of the machine (less a tick's rounding).
    assert others > 0.8 / (os.cpu_count() or 1), f"others {others:.2f} of {os.cpu_count()} CPUs"


def test_help_has_text_on_every_option_and_no_doubled_defaults():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name in ("bench", "plan"):
        sub = subs.choices[name]
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings}: no help text"
        text = sub.format_help()
        assert "(default: None)" not in text and "default: [" not in text and "(default: default" not in text
    assert "(default: full,lora,lisa,lisa-device)" in " ".join(subs.choices["bench"].format_help().split())


def test_seq_len_too_long_names_the_built_in_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--seq-len", "100000", "--out", str(tmp_path)])
    assert "the built-in data (pydoc_data.topics" in capsys.readouterr().err


def test_preflight_refuses_what_cannot_fit_unless_forced(monkeypatch, capsys):
    from transformers import LlamaConfig

    # 2 small blocks and a 128k vocabulary: over the 100M-parameter line, quick to trace.
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128256, tie_word_embeddings=False)
    args = build_parser().parse_args(["bench", "--device", "cpu", "--steps", "1", "--batch-size", "1",
                                      "--seq-len", "8", "--methods", "full,lisa", "--gamma", "1"])
    args.dtype = "float32"
    monkeypatch.setattr(preflight, "_available_bytes", lambda device: 2**30)
    why = preflight.check(args, config)
    assert why is not None and "full (torch.optim.AdamW, all parameters) needs about" in why
    assert "cpu has 1.0 GiB available" in why and "--force" in why
    args.force = True
    assert preflight.check(args, config) is None
    assert "--force: running although" in capsys.readouterr().out


def test_methods_groups_expand_in_place():
    parse = lambda text: build_parser().parse_args(["bench", "--methods", text]).methods  # noqa: E731
    from lisa_fused.bench import DEFAULT_METHODS, PEERS

    assert parse("peers") == list(PEERS) and PEERS[0] == "lisa"
    assert parse("full,peers") == ["full", *PEERS]
    assert parse("lisa,peers") == list(PEERS)  # lisa once: the group brings it again
    assert parse("default,badam") == [*DEFAULT_METHODS, "badam"]


def test_every_bench_method_has_a_planner_row():
    """The preflight plans each method before a run: a method without a planner row was a KeyError."""
    from lisa_fused.bench.methods import METHODS
    from lisa_fused.bench.preflight import BENCH_TO_PLAN

    assert set(BENCH_TO_PLAN) == set(METHODS)
