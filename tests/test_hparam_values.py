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


def _tiny_budget_scheduler(name):
    """An LR scheduler factory for `test_every_lr_scheduler_trains_like_adamw_under_it` (10 steps)."""
    from torch.optim import lr_scheduler as S
    transformers = pytest.importorskip("transformers")

    return {
        "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS + 1),  # also cycles betas[0]
        "CyclicLR": lambda o: S.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=2),  # betas[0] too
        "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, eta_min=1e-5),
        "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=STEPS, power=2.0),
        "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=2),
                                                     S.ExponentialLR(o, gamma=0.7)], milestones=[2]),
        "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0),
        "transformers_cosine_with_warmup": lambda o: transformers.get_cosine_schedule_with_warmup(o, 2, STEPS),
    }[name]


@pytest.mark.parametrize("name", ["OneCycleLR", "CyclicLR", "CosineAnnealingWarmRestarts", "PolynomialLR",
                                  "SequentialLR", "ReduceLROnPlateau", "transformers_cosine_with_warmup"])
def test_every_lr_scheduler_trains_like_adamw_under_it(name):
    """Whatever a scheduler writes into param_groups (lr; OneCycleLR and CyclicLR also betas[0]) trains as
    torch AdamW under the same scheduler: bitwise, with the hyperparameters written the same way."""
    make = _tiny_budget_scheduler(name)
    model, ref = MLPStack(n_layers=N_LAYERS), MLPStack(n_layers=N_LAYERS)
    before = [p.detach().clone() for p in model.parameters()]
    opt = FusedLISA(model, **BASE, n_active_layers=N_LAYERS, backend="torch")
    ropt = torch.optim.AdamW(ref.parameters(), **BASE)
    sched, rsched = make(opt), make(ropt)
    seen = []
    for x, y in batches():
        seen.append((opt.param_groups[0]["lr"], tuple(opt.param_groups[0]["betas"])))
        assert seen[-1] == (ropt.param_groups[0]["lr"], tuple(ropt.param_groups[0]["betas"]))
        losses = []
        for m, o in ((model, opt), (ref, ropt)):
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
            o.zero_grad()
            losses.append(loss.item())
        for s, loss in zip((sched, rsched), losses):
            s.step(loss) if name == "ReduceLROnPlateau" else s.step()
    assert len({lr for lr, _ in seen}) > 2, seen  # the scheduler moved the lr
    if name in ("OneCycleLR", "CyclicLR"):
        assert len({b for _, b in seen}) > 2, seen  # and beta1
    for p, q, b in zip(model.parameters(), ref.parameters(), before):
        assert torch.equal(p, q) and not torch.equal(p, b)


@pytest.mark.parametrize("key,value", [("lr", np.float32(3e-3)), ("lr", torch.tensor(3e-3)), ("eps", torch.tensor(1e-6)),
                                       ("betas", (np.float32(0.8), torch.tensor(0.99))),
                                       ("weight_decay", fractions.Fraction(1, 10))],
                         ids=["lr=np.float32", "lr=tensor", "eps=tensor", "betas=mixed", "weight_decay=Fraction"])
def test_the_native_kernel_reads_each_value_as_its_float(key, value):
    """On the C++ kernel (betas and eps are launch scalars there), a value of any accepted type trains bitwise
    as the same run given the value as a Python float, at construction and edited in place."""
    runs = []
    for v, edit in ((as_float(value), False), (value, False), (value, True)):
        model = MLPStack(n_layers=N_LAYERS)
        before = [p.detach().clone() for p in model.parameters()]
        opt = FusedLISA(model, **dict(BASE, **({} if edit else {key: v})), n_active_layers=2, switch_every=2,
                        backend="cpu")
        if edit:
            opt.param_groups[0][key] = v
        for x, y in batches():
            step(model, opt, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
        assert all(not torch.equal(p, b) for p, b in zip(runs[-1][:2], before[:2]))  # the run trained
    for other in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(runs[0], other))


def test_a_tensor_value_is_read_once_per_step(monkeypatch):
    """step() reads each group's hyperparameters once (groups.check_unchanged) and hands the floats to every
    launch: a tensor lr on a device costs one host read per step, not one per check and per partition. Two
    partitions here (fp32 moments, and 8-bit for the head's group) and two groups."""
    from lisa_fused import hparams

    model = MLPStack(n_layers=N_LAYERS)
    opt = FusedLISA(model, lr=torch.tensor(1e-3), n_active_layers=2, backend="torch",
                    param_groups=[{"params": "out", "moments": "8bit", "min_quantized_size": 0,
                                   "lr": torch.tensor(2e-3)}])
    assert len(opt._packed_state.formats) == 2
    calls = []
    real = hparams.to_float
    monkeypatch.setattr(hparams, "to_float", lambda value, *a, **k: calls.append(value) or real(value, *a, **k))
    for x, y in batches(3):
        calls.clear()
        step(model, opt, x, y)
        assert len(calls) == 2 * 5, calls  # 2 groups x (lr, beta1, beta2, eps, weight_decay), once each
        assert sum(isinstance(v, torch.Tensor) for v in calls) == 2


@pytest.mark.parametrize("key,value,exc,match", REFUSED[::3], ids=[f"{k}={v!r}" for k, v, _, _ in REFUSED[::3]])
def test_a_refused_value_in_add_param_group_changes_nothing(key, value, exc, match):
    model = MLPStack(n_layers=N_LAYERS)
    model.inp.requires_grad_(False)
    opt = FusedLISA(model, n_active_layers=2, switch_every=2, backend="torch")
    for x, y in batches(3):
        step(model, opt, x, y)
    sd, active = opt.state_dict(), opt.active_layers
    model.inp.requires_grad_(True)
    with pytest.raises(exc, match=r"add_param_group \(the new opt.param_groups\[1\]\): " + match):
        opt.add_param_group({"params": "inp", key: value})
    assert len(opt.param_groups) == 1 and opt.active_layers == active
    now = opt.state_dict()
    assert all(torch.equal(a, now["state"][i][k]) for i, e in sd["state"].items() for k, a in e.items()
               if isinstance(a, torch.Tensor))
    opt.add_param_group({"params": "inp", key: dict(BASE, betas=(0.8, 0.99))[key]})  # a good value goes in
    assert len(opt.param_groups) == 2
