"""benchmarks/lean_quality.py keeps working: its main() at minimum size (1 seed, 3 steps, no base training)
produces every asked row, finite losses and its trained-params checks; rows whose library is missing or
whose kwargs the installed FusedLISA rejects are SKIPPED with the reason, and a row that trains nothing
is FAILED (the check can fail)."""
import importlib.util
import inspect
import json
import math
from pathlib import Path

import torch

from lisa_fused import FusedLISA

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lean_quality.py"
TINY = ["--seeds", "1", "--steps", "3", "--base-steps", "0", "--batch-size", "2", "--seq-len", "32",
        "--eval-windows", "2", "--switch-every", "2"]


def _script():
    spec = importlib.util.spec_from_file_location("lean_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(lq, rows, tmp_path):
    rc = lq.main([*TINY, "--rows", ",".join(rows), "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    return rc, json.loads((tmp_path / "results.json").read_text()), (tmp_path / "results.md").read_text()


def test_rows_train_check_and_skip_with_reasons(tmp_path):
    lq = _script()
    rows = ["torch AdamW", "FusedLISA 8bit all", "FusedLISA 4bit g2", "torchao AdamW8bit", "FusedLISA 8bit all minq=0"]
    rc, res, md = _run(lq, rows, tmp_path)
    assert rc == 0
    assert list(res["rows"]) == rows
    assert all(label in md for label in rows)
    expected = {label: "ok" for label in rows}
    if importlib.util.find_spec("torchao") is None:
        expected["torchao AdamW8bit"] = "SKIPPED"
    if "min_quantized_size" not in inspect.signature(FusedLISA).parameters:
        expected["FusedLISA 8bit all minq=0"] = "SKIPPED"
    assert {k: r["status"] for k, r in res["rows"].items()} == expected
    model = lq.build_model(lq.model_config("tiny", None), model_path=None, dtype=torch.float32,
                           device=torch.device("cpu"), seed=0)
    n_params = len(list(model.parameters()))
    for label, r in res["rows"].items():
        if r["status"] == "SKIPPED":
            assert ("ImportError" in r["reason"]) if label.startswith("torchao") else ("rejects" in r["reason"])
            continue
        (run,) = r["seeds"]
        assert math.isfinite(run["train_loss"]) and math.isfinite(run["eval_loss"])
        assert run["loss_curve"][-1] != run["loss_curve"][0]
        # every trained param was compared and changed; gamma=2: the never-active blocks were compared too
        assert run["checked_changed"] + run["checked_frozen"] == n_params
        if label.startswith("FusedLISA"):
            assert run["backend"] == "cpu", run["backend"]
        if label.endswith("g2"):
            assert run["checked_frozen"] > 0 and len(run["never_active_blocks"]) >= 4  # 2 intervals x 2 blocks
    # which params keep fp32 moments: torchao's rule (>= 4096 elements and a multiple of its 256 block: the
    # 259 x 128 embedding and head are not); FusedLISA's min_quantized_size (4096: only the norms)
    assert res["rows"]["torch AdamW"]["fp32_state"] == [n for n, _ in model.named_parameters()]
    if expected["torchao AdamW8bit"] == "ok":
        assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(
            res["rows"]["torchao AdamW8bit"]["fp32_state"])
        assert "train_loss_vs_ref" in res["rows"]["FusedLISA 8bit all"]  # gap to torchao of the same bits
    if hasattr(FusedLISA, "state_formats"):
        assert sorted(res["rows"]["FusedLISA 8bit all"]["fp32_state"]) == sorted(
            n for n, p in model.named_parameters() if p.numel() < 4096)


def test_a_row_that_trains_nothing_fails(tmp_path, monkeypatch):
    lq = _script()
    monkeypatch.setattr(lq, "ROWS", lq.ROWS + (("SGD lr=0", lambda m, hp: torch.optim.SGD(m.parameters(), lr=0.0),
                                                None),))
    rc, res, _ = _run(lq, ["SGD lr=0"], tmp_path)
    assert rc == 1
    assert res["rows"]["SGD lr=0"]["status"] == "FAILED"
    assert "trained params unchanged" in res["rows"]["SGD lr=0"]["reason"]
