"""Hyperparameter values (issue 30, item 2): every value torch.optim.AdamW accepts (Python, numpy and tensor
scalars) is accepted with the same meaning at construction, in param_groups edited in place and from an LR
scheduler, and trains as torch's AdamW given the value as a Python float; a refused value names its type
and what is accepted, and leaves the optimizer as it was."""
from __future__ import annotations

import fractions
import math

import numpy as np
import pytest
import torch

from lisa_fused import FusedLISA
from helpers import MLPStack

N_LAYERS, STEPS = 4, 6
BASE = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)


def batches(steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(steps)]


def step(model, opt, x, y):
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def as_float(v):
    return tuple(map(as_float, v)) if isinstance(v, (tuple, list)) else (v.item() if isinstance(v, torch.Tensor) else float(v))


ACCEPTED = [  # (key, value): torch's AdamW constructor accepts each (betas: where marked, only FusedLISA)
    ("lr", np.float32(3e-3)), ("lr", np.float64(3e-3)), ("lr", np.float16(3e-3)), ("lr", np.int64(0)),
    ("lr", fractions.Fraction(3, 1000)), ("lr", np.array(3e-3)), ("lr", torch.tensor(3e-3)),
    ("lr", torch.tensor([3e-3])), ("lr", torch.tensor(3e-3, dtype=torch.float64)),
    ("lr", torch.tensor(3e-3, dtype=torch.bfloat16)), ("lr", 0), ("lr", True),
    ("eps", np.float32(1e-6)), ("eps", torch.tensor(1e-6)), ("eps", 0), ("eps", math.inf),
    ("weight_decay", np.float32(0.1)), ("weight_decay", torch.tensor([0.1])), ("weight_decay", np.int64(0)),
    ("weight_decay", fractions.Fraction(1, 10)),
    ("betas", (torch.tensor(0.8), torch.tensor(0.99))), ("betas", [0.8, 0.99]), ("betas", (np.float64(0.8), 0.99)),
    ("betas", (np.float32(0.8), np.float32(0.99))),  # torch's constructor: "both floats or both Tensors"
    ("betas", (0, 0.99)),  # the same
]


def _id(case):
    key, v = case
    return f"{key}={type(v).__name__}" + (f"[{v.dtype}]" if hasattr(v, "dtype") else f"[{v}]")


@pytest.mark.parametrize("how", ["constructor", "edited_in_place"])
@pytest.mark.parametrize("case", ACCEPTED, ids=[_id(c) for c in ACCEPTED])
def test_every_value_torch_accepts_trains_like_adamw_given_its_float(case, how):
    key, value = case
    model, ref = MLPStack(n_layers=N_LAYERS), MLPStack(n_layers=N_LAYERS)
    before = [p.detach().clone() for p in model.parameters()]
    kw = dict(BASE, **({key: value} if how == "constructor" else {}))
    opt = FusedLISA(model, **kw, n_active_layers=N_LAYERS, backend="torch")
    if how == "edited_in_place":
        opt.param_groups[0][key] = value
    ropt = torch.optim.AdamW(ref.parameters(), **dict(BASE, **{key: as_float(value)}))
    for x, y in batches():
        step(model, opt, x, y)
        step(ref, ropt, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
    assert opt.param_groups[0][key] is value  # kept as given, as torch keeps it
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert all(moved) == (as_float(value) != 0 or key != "lr"), moved  # lr=0 moves nothing, the others train


def test_lambda_lr_over_a_float32_numpy_table_trains_like_adamw():
    """The issue's case: a LambdaLR over an np.float32 warmup table writes np.float32 lrs into param_groups
    (before: "Invalid learning rate: 0.000100..."). Equal to torch AdamW under the same scheduler with each lr
    as a Python float, across switches; torch fed the raw np.float32 lr rounds its step size to float32 (NEP 50),
    so it differs from both by float32 rounding only."""
    table = np.linspace(0.1, 1.0, 10, dtype=np.float32)
    runs = {}
    for name in ("fused", "torch_float", "torch_raw"):
        model = MLPStack(n_layers=N_LAYERS)
        if name == "fused":
            opt = FusedLISA(model, lr=1e-3, n_active_layers=2, switch_every=3, backend="torch")
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: table[min(t, 9)])
        lrs, seq = [], []
        for x, y in batches(9):
            if name == "fused":
                seq.append(opt.active_layers)
            else:
                for b, blk in enumerate(model.blocks):
                    blk.requires_grad_(b in runs["fused"]["seq"][len(lrs)])
            if name == "torch_float":
                opt.param_groups[0]["lr"] = float(opt.param_groups[0]["lr"])
            lrs.append(opt.param_groups[0]["lr"])
            step(model, opt, x, y)
            sched.step()
        runs[name] = {"model": model, "lrs": lrs, "seq": seq}
    assert all(type(lr) is np.float32 for lr in runs["fused"]["lrs"])
    assert len(set(runs["fused"]["seq"])) > 1
    assert [float(x) for x in runs["fused"]["lrs"]] == runs["torch_float"]["lrs"]
    fused, exact, raw = (list(runs[n]["model"].parameters()) for n in ("fused", "torch_float", "torch_raw"))
    for p, q, r in zip(fused, exact, raw):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-9)


def test_a_tensor_lr_filled_by_a_scheduler_is_read_every_step():
    """torch's schedulers fill a tensor lr in place; FusedLISA reads its value at every step (the reference:
    torch AdamW given that value as a Python float)."""
    model, ref = MLPStack(n_layers=N_LAYERS), MLPStack(n_layers=N_LAYERS)
    opt = FusedLISA(model, lr=torch.tensor(1e-2), n_active_layers=N_LAYERS, backend="torch")
    ropt = torch.optim.AdamW(ref.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    for x, y in batches():
        seen.append(ropt.param_groups[0]["lr"] == opt.param_groups[0]["lr"].item())
        ropt.param_groups[0]["lr"] = opt.param_groups[0]["lr"].item()
        step(model, opt, x, y)
        step(ref, ropt, x, y)
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == (torch.tensor(1e-2) / 8).item()
    assert seen == [False, True] * 3  # (the first lr, then a halving every 2 steps, reached the reference)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


REFUSED = [  # (key, value, exception, message)
    ("lr", "1e-3", TypeError, r"Invalid learning rate: '1e-3' is a str; takes a real number >= 0"),
    ("lr", None, TypeError, r"Invalid learning rate: None is a NoneType; takes a real number >= 0"),
    ("lr", 1e-3 + 0j, TypeError, r"Invalid learning rate: \(0.001\+0j\) is a complex; takes a real number"),
    ("lr", torch.tensor([1e-3, 2e-3]), ValueError, r"Invalid learning rate: a torch.float32 tensor of shape \(2,\) "
                                                   r"\(tensor values must have 1 element\)"),
    ("lr", np.array([1e-3]), TypeError, r"Invalid learning rate: .* is a numpy.ndarray with 1 dimension\(s\)"),
    ("lr", math.nan, ValueError, r"Invalid learning rate: nan \(a float\); lr takes a real number >= 0"),
    ("lr", np.float32(-1e-3), ValueError, r"Invalid learning rate: -0.001 \(a numpy.float32\); lr takes"),
    ("lr", torch.tensor(-1.0), ValueError, r"Invalid learning rate: -1.0 \(a torch.float32 tensor of shape \(\)\)"),
    ("eps", torch.tensor(1j), TypeError, r"Invalid epsilon value: .* is a torch.complex64 tensor"),
    ("weight_decay", -0.1, ValueError, r"Invalid weight_decay value: -0.1 \(a float\)"),
    ("betas", 0.9, ValueError, r"Invalid betas: 0.9 \(expected a pair \(beta1, beta2\)"),
    ("betas", (0.9, 1.0), ValueError, r"Invalid beta parameter at index 1: 1.0 \(a float\); each beta takes a real "
                                      r"number in \[0, 1\)"),
    ("betas", (np.float32("nan"), 0.9), ValueError, r"Invalid beta parameter at index 0: nan \(a numpy.float32\)"),
    ("betas", ("0.9", 0.99), TypeError, r"Invalid beta parameter at index 0: '0.9' is a str"),
]


@pytest.mark.parametrize("key,value,exc,match", REFUSED, ids=[f"{k}={v!r}" for k, v, _, _ in REFUSED])
def test_a_refused_value_names_its_type_and_what_is_accepted(key, value, exc, match):
    model = MLPStack(n_layers=N_LAYERS)
    with pytest.raises(exc, match=r"FusedLISA: " + match):
        FusedLISA(model, **{key: value})
    with pytest.raises(exc, match=r"param_groups\[0\] \(opt.param_groups\[1\]\): " + match):
        FusedLISA(model, param_groups=[{"params": "out", key: value}])
    FusedLISA(model, n_active_layers=2).release()  # nothing claimed by the refused ones


@pytest.mark.parametrize("key,value,exc,match", REFUSED, ids=[f"{k}={v!r}" for k, v, _, _ in REFUSED])
def test_a_refused_edit_raises_at_step_and_changes_nothing(key, value, exc, match):
    model = MLPStack(n_layers=N_LAYERS)
    opt = FusedLISA(model, n_active_layers=2, switch_every=2, backend="torch", param_groups=[{"params": "out"}])
    data = batches(5)
    for x, y in data[:3]:
        step(model, opt, x, y)
    params, sd, active = [p.detach().clone() for p in model.parameters()], opt.state_dict(), opt.active_layers
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    torch.nn.functional.mse_loss(model(data[3][0]), data[3][1]).backward()
    with pytest.raises(exc, match=r"opt.param_groups\[1\] \(edited in place\): " + match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.active_layers == active and opt._global_step == 3
    now = opt.state_dict()
    assert all(torch.equal(a, now["state"][i][k]) for i, e in sd["state"].items() for k, a in e.items()
               if isinstance(a, torch.Tensor))
    opt.param_groups[1][key] = good  # put back: the same step goes through
    opt.step()
    assert opt._global_step == 4 and not torch.equal(model.out.weight, params[-2])
