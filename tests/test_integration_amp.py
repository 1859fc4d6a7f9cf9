"""Mixed precision: bf16 models with fp32 masters, and torch.amp.GradScaler's grad_scale / found_inf protocol
(normal steps equal unscaled AdamW; an overflow step touches nothing and does not advance the schedule)."""
from __future__ import annotations

import copy

import pytest
import torch

from lisa_fused import FusedLISA
from helpers import (assert_trained_changed_frozen_kept, describe, freeze_like, lm_batch, params_of, stack_of,
                     tiny_llama)

pytest.importorskip("transformers")

N_LAYERS, N_ACTIVE, K = 4, 2, 2


def lm_loss(model, t):
    x = lm_batch(t)
    return model(input_ids=x, labels=x).loss


def snapshot(opt):
    """Everything a step may change: params, the whole state_dict (moments, masters, steps, sampler)."""
    params = [p.detach().clone() for p in opt._params]
    sd = opt.state_dict()
    return params, sd, list(opt._steps), opt._global_step, opt.active_layers


def assert_same_snapshot(a, b):
    pa, sa, steps_a, g_a, act_a = a
    pb, sb, steps_b, g_b, act_b = b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)), "params changed"
    assert steps_a == steps_b and g_a == g_b and act_a == act_b
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][key]), f"state {key} of param {i} changed"
    assert torch.equal(sa["lisa"]["generator"], sb["lisa"]["generator"])


def test_bf16_model_trains_like_fp32_within_bf16_rounding():
    """Same init, batches and schedule: the bf16 run's fp32 masters move like the fp32 run's params (the
    difference is what bf16 forward/backward rounding makes of the gradients), and its bf16 params are
    exactly those masters rounded to nearest."""
    fp32 = tiny_llama(N_LAYERS, seed=0)
    init = {n: p.detach().clone() for n, p in fp32.named_parameters()}
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    o32 = FusedLISA(fp32, lr=1e-3, n_active_layers=N_ACTIVE, switch_every=K, seed=1)
    o16 = FusedLISA(bf16, lr=1e-3, n_active_layers=N_ACTIVE, switch_every=K, seed=1)
    init16, ever = params_of(bf16), set()
    for t in range(6):
        ever.update(o16.active_layers)
        for model, opt in ((fp32, o32), (bf16, o16)):
            lm_loss(model, t).backward()
            opt.step()
            opt.zero_grad()
            if model is bf16:
                assert o16.active_layers == o32.active_layers
        # bf16 forward: the losses agree to about bf16's relative precision
        assert lm_loss(bf16, 99).item() == pytest.approx(lm_loss(fp32, 99).item(), rel=2 ** -8)

    sd = o16.state_dict()
    names = [n for n, _ in sd["lisa"]["params"]]
    p32 = dict(fp32.named_parameters())
    moved = 0
    for i, entry in sd["state"].items():
        n = names[i]
        master = entry["master_param"]
        # bf16 params are the masters rounded (active ones via the kernel, paged ones when they left)
        assert torch.equal(o16._params[i].detach(), master.to(torch.bfloat16)), n
        d32, d16 = p32[n].detach() - init[n], master - init[n]
        if d32.norm() == 0:
            continue
        moved += 1
        # Updates (~2e-3 per element here, below half a bf16 ulp of a weight near 1.0: without fp32 masters
        # the norm weights would not move at all) agree with fp32 to ~10% per tensor.
        assert (d16 - d32).norm() <= 0.15 * d32.norm(), n
    assert moved == len(sd["state"])
    assert_trained_changed_frozen_kept(fp32, init, ever)
    assert_trained_changed_frozen_kept(bf16, init16, ever)


def _scaler(scale=2.0 ** 12):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("clip", [False, True], ids=["step", "unscale_clip_step"])
def test_grad_scaler_step_equals_unscaled(clip, backend):
    """fp32 model, loss scaled by 2^12: scaler.step(opt) (the kernel divides by grad_scale) or
    scaler.unscale_(opt) + clip_grad_norm_ + scaler.step(opt) gives bitwise the unscaled FusedLISA run
    (power-of-two scaling is exact), and on the reference kernel bitwise torch AdamW's trajectory."""
    exact = backend == "torch"  # the reference kernel is torch AdamW's math: compare with it too
    models = [tiny_llama(N_LAYERS, seed=0) for _ in range(3 if exact else 2)]
    scaled, plain = models[:2]
    kw = dict(lr=3e-3, weight_decay=0.1, n_active_layers=N_ACTIVE, switch_every=K, seed=2, backend=backend)
    opts = [FusedLISA(scaled, **kw), FusedLISA(plain, **kw)]
    if exact:
        opts.append(torch.optim.AdamW(models[2].parameters(), lr=3e-3, weight_decay=0.1))
    scaler = _scaler()
    init, ever = params_of(scaled), set()
    for t in range(5):
        ever.update(opts[0].active_layers)
        if exact:
            freeze_like(stack_of(models[2]), opts[1].active_layers)
        scaler.scale(lm_loss(scaled, t)).backward()
        for m in models[1:]:
            lm_loss(m, t).backward()
        if clip:
            scaler.unscale_(opts[0])
            for m in models:
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], 0.5)
        scaler.step(opts[0])
        scaler.update()
        for o in opts[1:]:
            o.step()
        for o in opts:
            o.zero_grad()
        assert scaler.get_scale() == 2.0 ** 12  # no overflow, no growth
        assert not hasattr(opts[0], "grad_scale") and not hasattr(opts[0], "found_inf")
    assert opts[0].active_layers == opts[1].active_layers
    for params in zip(*(m.parameters() for m in models)):
        assert all(torch.equal(params[0], q) for q in params[1:])
    assert_trained_changed_frozen_kept(scaled, init, ever)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=describe)
def test_grad_scaler_overflow_step_is_skipped_entirely(dtype):
    """An inf gradient: the step is skipped with params, moments, masters, step counts, the sampler and the
    switch schedule untouched; the scaler backs off; the next step switches as the schedule says."""
    model = tiny_llama(N_LAYERS, seed=0, dtype=dtype)
    opt = FusedLISA(model, lr=1e-3, n_active_layers=N_ACTIVE, switch_every=K, seed=4)
    scaler = _scaler(2.0 ** 10)
    scaler.scale(lm_loss(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = snapshot(opt)
    assert opt._global_step == 1  # the next real step (the K-th) switches

    scaler.scale(lm_loss(model, 1)).backward()
    block = opt.active_layers[0]
    next(stack_of(model)[block].parameters()).grad.view(-1)[3] = float("inf")  # into the packed view
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert_same_snapshot(before, snapshot(opt))
    assert scaler.get_scale() == 2.0 ** 9

    scaler.scale(lm_loss(model, 1)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt._global_step == 2 and opt._steps[0] == 2
    g = torch.Generator().manual_seed(4)
    draws = [tuple(sorted(torch.randperm(N_LAYERS, generator=g)[:N_ACTIVE].tolist())) for _ in range(2)]
    assert before[4] == draws[0] and opt.active_layers == draws[1]


def test_fp16_model_with_grad_scaler_follows_fp32_masters_adamw():
    """fp16 params with fp32 masters under GradScaler: the masters follow torch AdamW fed the same fp16
    gradients unscaled in fp32, and the fp16 params are the masters rounded, across switches."""
    model = tiny_llama(N_LAYERS, seed=0, dtype=torch.float16)
    twin = copy.deepcopy(model)
    opt = FusedLISA(model, lr=1e-3, weight_decay=0.1, n_active_layers=N_ACTIVE, switch_every=K, seed=6,
                    backend="torch")  # the reference kernel: exactly torch AdamW's math
    masters = [p.detach().float().clone() for p in twin.parameters()]
    ropt = torch.optim.AdamW(masters, lr=1e-3, weight_decay=0.1)
    scaler = _scaler(2.0 ** 10)
    init, ever = params_of(model), set()
    for t in range(5):
        ever.update(opt.active_layers)
        freeze_like(stack_of(twin), opt.active_layers)
        scale = scaler.get_scale()
        (lm_loss(twin, t) * scale).backward()
        for p, m in zip(twin.parameters(), masters):
            m.grad = None if p.grad is None else p.grad.float() / scale
            p.grad = None
        scaler.scale(lm_loss(model, t)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ropt.step()
        with torch.no_grad():
            for p, m in zip(twin.parameters(), masters):
                p.copy_(m)
    for p, m in zip(model.parameters(), masters):
        assert torch.equal(p.detach(), m.to(torch.float16))
    assert_trained_changed_frozen_kept(model, init, ever)
