"""examples/train_loop.py and examples/train_trainer.py run with tiny arguments (in this process: importing
transformers again in a subprocess would cost more than the runs)."""
from __future__ import annotations

import logging
import runpy
from pathlib import Path

import pytest

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


def test_train_loop_example(capsys):
    out = load("train_loop.py")["main"](TINY)
    printed = capsys.readouterr().out
    assert out["last_loss"] < out["first_loss"]
    assert "FusedLISA(" in printed and printed.count("training blocks") == 3
    assert len(out["active_layers"]) == 1


def test_train_loop_example_bf16():
    out = load("train_loop.py")["main"](TINY + ["--dtype", "bf16", "--n-active", "2"])
    assert out["last_loss"] < out["first_loss"] and len(out["active_layers"]) == 2


def test_train_trainer_example(tmp_path, capsys):
    out = load("train_trainer.py")["main"](TINY + ["--logging-steps", "3", "--grad-accum", "2",
                                                   "--output-dir", str(tmp_path)])
    logged = [e for e in out["log_history"] if "loss" in e]
    # logs at steps 2, 4, 6 (switches, forced by LISACallback) and 3 (logging_steps)
    assert [e["step"] for e in logged] == [2, 3, 4, 6]
    assert all(len(e["lisa_active_layers"]) == 1 for e in logged)
    assert tuple(logged[-1]["lisa_active_layers"]) == out["active_layers"]
    assert "training blocks" in capsys.readouterr().out
