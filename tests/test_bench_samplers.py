"""`lisa-fused bench --samplers ... --seeds N` and the LoRA-FA baseline, without running the bench: the
rows it plans, the seed summary, argument errors, and one LoRA-FA step (A frozen, B trained)."""
from __future__ import annotations

import argparse

import pytest
import torch

from lisa_fused.bench import methods, report
from lisa_fused.bench.bench import run_specs
from lisa_fused.cli import build_parser, main


def test_run_specs_one_row_per_method_sampler_seed():
    args = argparse.Namespace(methods=["full", "lora-fa", "lisa"], samplers=["uniform", "grad_norm"], seeds=2, seed=5)
    specs = run_specs(args, {"seed": 5})
    assert [s["label"] for s in specs] == ["full", "lora-fa s5", "lora-fa s6", "lisa:uniform s5", "lisa:uniform s6",
                                           "lisa:grad_norm s5", "lisa:grad_norm s6"]
    assert [s["run_seed"] for s in specs] == [5, 5, 6, 5, 6, 5, 6]
    assert all(s["seed"] == 5 for s in specs)  # data order and base weights: the same for every row
    assert [s["memory_pass"] for s in specs] == [True, True, False, True, False, False, False]
    assert [s.get("sampler") for s in specs] == [None, None, None, "uniform", "uniform", "grad_norm", "grad_norm"]
    plain = argparse.Namespace(methods=["full", "lisa"], samplers=["uniform"], seeds=1, seed=0)
    assert [s["label"] for s in run_specs(plain, {"seed": 0})] == ["full", "lisa"]  # the default bench's rows


def _row(method, base, seed, eval_loss, peak=None):
    return {"method": method, "base_method": base, "run_seed": seed, "eval_loss": eval_loss, "train_loss": 1.0,
            "peak_mem_bytes": peak, "opt_device_bytes": 2 * report.MIB}


def test_seed_summary_mean_and_sample_std():
    rows = [_row("full", "full", 0, 2.0, 3 * report.MIB), _row("lisa:grad_norm s0", "lisa", 0, 1.0, 4 * report.MIB),
            _row("lisa:grad_norm s1", "lisa", 1, 2.0), _row("lisa:grad_norm s2", "lisa", 2, 3.0)]
    table = report.format_seed_summary(rows)
    assert "| full | 1 | 2.0000 ± 0.0000 |" in table
    assert "| lisa:grad_norm | 3 | 2.0000 ± 1.0000 | 1.0000 ± 0.0000 | 4.0 | 2.00 |" in table
    assert report.format_seed_summary([_row("full", "full", 0, 2.0), _row("lisa", "lisa", 0, 1.0)]) == ""


@pytest.mark.parametrize("argv,message", [
    (["bench", "--samplers", "uniform,topk"], "unknown sampler 'topk'"),
    (["bench", "--samplers", "grad_norm,grad_norm"], "a sampler is listed twice"),
    (["bench", "--seeds", "0"], "--seeds: must be >= 1, got 0"),
    (["bench", "--methods", "lora-fb"], "unknown method 'lora-fb'"),
])
def test_bad_sampler_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_unchanged():
    args = build_parser().parse_args(["bench"])
    assert args.methods == list(methods.DEFAULT_METHODS) and args.samplers == ["uniform"] and args.seeds == 1


def test_lora_fa_freezes_a_and_trains_b():
    pytest.importorskip("peft")
    from helpers import tiny_llama

    setup = methods.build("lora-fa", tiny_llama(2), {"lr": 1e-3, "lora_lr": 1e-2, "lora_rank": 4, "seed": 0})
    named = dict(setup.model.named_parameters())
    a = {n: p.detach().clone() for n, p in named.items() if "lora_A" in n}
    b = {n: p.detach().clone() for n, p in named.items() if "lora_B" in n}
    base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    assert a and b and not any(named[n].requires_grad for n in a) and all(named[n].requires_grad for n in b)
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        setup.model(input_ids=x, labels=x).loss.backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    assert all(not torch.equal(named[n], v) for n, v in b.items()), "lora_B did not train"
    assert all(torch.equal(named[n], v) for n, v in a.items()), "lora_A moved"
    assert all(torch.equal(named[n], v) for n, v in base.items()), "a base weight moved"
    assert setup.trainable_params() == sum(v.numel() for v in b.values())
    assert setup.state_bytes()[0] > 0
