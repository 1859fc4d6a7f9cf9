"""examples/train_loop.py and examples/train_trainer.py run with tiny arguments (in this process: importing
transformers again in a subprocess would cost more than the runs)."""
from __future__ import annotations

import logging
import re
import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--layers", "3", "--hidden", "32", "--seq", "16", "--batch", "4", "--steps", "6", "--switch-every", "2"]


@pytest.fixture(autouse=True)
def restore_logger_level():
    lisa = logging.getLogger("lisa_fused")
    level = lisa.level
    yield
    lisa.setLevel(level)


def load(name):
    return runpy.run_path(str(EXAMPLES / name))  # run_name is not "__main__": defines main() only


def assert_trained_changed_frozen_kept(out):
    """Params of blocks that were active at some step, and all params outside the stack, changed; params
    of blocks never active did not. (A run that trains nothing fails here, whatever its loss did.)"""
    ever = out["ever_active"]
    assert ever and len(ever) < 3, f"the run should leave a block untrained for this check to bite, got {ever}"
    for name, moved in out["changed"].items():
        m = re.search(r"layers\.(\d+)\.", name)
        should = m is None or int(m.group(1)) in ever
        assert moved == should, f"{name}: {'unchanged' if should else 'changed'} (blocks trained: {sorted(ever)})"


def test_train_loop_example(capsys):
    out = load("train_loop.py")["main"](TINY)
    printed = capsys.readouterr().out
    assert out["last_loss"] < out["first_loss"]
    assert "FusedLISA(" in printed and printed.count("training blocks") == 3
    assert len(out["active_layers"]) == 1
    assert_trained_changed_frozen_kept(out)


def test_train_loop_example_bf16():
    out = load("train_loop.py")["main"](TINY + ["--dtype", "bf16", "--n-active", "1", "--steps", "4"])
    assert out["last_loss"] < out["first_loss"] and len(out["active_layers"]) == 1
    assert_trained_changed_frozen_kept(out)


def test_train_trainer_example(tmp_path, capsys):
    out = load("train_trainer.py")["main"](TINY + ["--logging-steps", "3", "--grad-accum", "2",
                                                   "--output-dir", str(tmp_path)])
    logged = [e for e in out["log_history"] if "loss" in e]
    # logs at steps 2, 4, 6 (switches, forced by LISACallback) and 3 (logging_steps)
    assert [e["step"] for e in logged] == [2, 3, 4, 6]
    assert all(len(e["lisa_active_layers"]) == 1 for e in logged)
    assert tuple(logged[-1]["lisa_active_layers"]) == out["active_layers"]
    assert "training blocks" in capsys.readouterr().out
    assert_trained_changed_frozen_kept(out)


def test_train_trainer_example_checkpoints_and_resumes(tmp_path):
    """--save-steps writes into the kept --output-dir; --resume continues bitwise to the uninterrupted run."""
    main = load("train_trainer.py")["main"]
    args = TINY + ["--save-steps", "3", "--logging-steps", "1"]
    full = main(args + ["--output-dir", str(tmp_path / "full")])
    assert (tmp_path / "full" / "checkpoint-3").is_dir() and (tmp_path / "full" / "checkpoint-6").is_dir()
    resumed = main(args + ["--output-dir", str(tmp_path / "full"), "--resume", str(tmp_path / "full" / "checkpoint-3")])
    losses = {e["step"]: e["loss"] for e in full["log_history"] if "loss" in e}
    again = {e["step"]: e["loss"] for e in resumed["log_history"] if "loss" in e and e["step"] > 3}
    assert sorted(again) == [4, 5, 6] and all(again[s] == losses[s] for s in again)
    for n, p in resumed["params"].items():
        assert torch.equal(p, full["params"][n]), n
    assert resumed["active_layers"] == full["active_layers"]


def test_train_trainer_example_refuses_checkpoints_it_would_delete():
    with pytest.raises(SystemExit):
        load("train_trainer.py")["main"](TINY + ["--save-steps", "3"])
