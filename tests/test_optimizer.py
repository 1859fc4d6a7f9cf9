"""FusedLISA against torch.optim.AdamW: trajectories over several intervals, policies, resume, memory."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lisa_fused import FusedLISA
from lisa_fused.kernels import backend_unavailable_reason
from helpers import (TOL, MLPStack, assert_close_rel, describe, freeze_like, lm_batch, stack_of, tiny_gpt2,
                     tiny_llama)

CPU_BACKENDS = [b if backend_unavailable_reason(b, "cpu") is None else
                pytest.param(b, marks=pytest.mark.skip(reason=backend_unavailable_reason(b, "cpu")))
                for b in ("torch", "cpu")]
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def lm_step(model, opt, x, zero="opt"):
    (model.zero_grad if zero == "model" else opt.zero_grad)()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def run_against_adamw(make_model, *, policy, backend, n_active, steps, K, zero="opt", lr=3e-3, wd=0.1):
    """Run FusedLISA and torch AdamW side by side on the same batches and active sequence; check that
    frozen blocks stay bitwise unchanged; return both models and optimizers.

    The "torch" backend repeats AdamW's arithmetic exactly, so each model computes its own gradients and
    the runs stay bitwise equal. A native kernel may differ from torch's CPU AdamW by an ulp (torch's
    vectorised sqrt is not correctly rounded; FMA placement), and through the model's own gradients such
    ulps grow chaotically; so for native backends both optimizers get the reference model's gradients,
    which compares the optimizers and nothing else."""
    teacher_forced = backend != "torch"
    model = make_model()
    ref = copy.deepcopy(model)
    opt = FusedLISA(model, lr=lr, weight_decay=wd, n_active_layers=n_active, switch_every=K,
                    inactive_moments=policy, backend=backend, seed=5)
    ropt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=wd)
    stack, rstack = stack_of(model), stack_of(ref)
    seen, prev = set(), set()
    sequence = []
    for t in range(steps):
        active = set(opt.active_layers)
        sequence.append(tuple(sorted(active)))
        freeze_like(rstack, active)
        if policy == "drop":  # a re-activated block restarts from step 1 with zero moments
            for b in (active - prev) & seen:
                for p in rstack[b].parameters():
                    ropt.state.pop(p, None)
        seen |= active
        prev = active
        frozen = {b: [p.detach().clone() for p in stack[b].parameters()] for b in range(len(stack)) if b not in active}
        x = lm_batch(t)
        if teacher_forced:
            ropt.zero_grad()
            ref(input_ids=x, labels=x).loss.backward()
            rgrads = {n: q.grad for n, q in ref.named_parameters() if q.grad is not None}
            (model.zero_grad if zero == "model" else opt.zero_grad)()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.grad = rgrads[n].clone()
            opt.step()
            ropt.step()
        else:
            lm_step(model, opt, x, zero)
            lm_step(ref, ropt, x)
        for b, before in frozen.items():
            for p, q in zip(stack[b].parameters(), before):
                assert torch.equal(p.detach(), q), f"step {t}: frozen block {b} changed"
    return model, opt, ref, ropt, sequence


def compare_with_reference(model, opt, ref, ropt, tol):
    rparams = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rel(p, rparams[name], tol, f"param {name}")
    sd = opt.state_dict()
    names = [n for n, _ in sd["lisa"]["params"]]
    for i, entry in sd["state"].items():
        rstate = ropt.state[rparams[names[i]]]
        assert int(entry["step"]) == int(rstate["step"]), names[i]
        assert_close_rel(entry["exp_avg"], rstate["exp_avg"], tol, f"exp_avg {names[i]}")
        assert_close_rel(entry["exp_avg_sq"], rstate["exp_avg_sq"], tol, f"exp_avg_sq {names[i]}")
    # every param torch has state for must have state here too, unless its block was dropped
    if opt.inactive_moments != "drop":
        assert len(sd["state"]) == sum(1 for p in ref.parameters() if p in ropt.state)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("policy", ["host", "device", "drop"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_matches_adamw_over_intervals(arch, policy, backend):
    # 4 intervals (3+3+3+2 steps): blocks leave and come back; no switch after the last step, so the
    # "drop" reference (which resets a block when it is re-activated) sees the same final active set
    model, opt, ref, ropt, seq = run_against_adamw(MODELS[arch], policy=policy, backend=backend, n_active=2,
                                                   steps=11, K=3)
    assert len(set(seq)) >= 3, f"the sampler should have produced several active sets, got {seq}"
    compare_with_reference(model, opt, ref, ropt, TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_layers_active_is_plain_adamw(backend):
    model, opt, ref, ropt, seq = run_against_adamw(tiny_llama, policy="host", backend=backend, n_active=4,
                                                   steps=5, K=2)
    assert set(seq) == {(0, 1, 2, 3)}
    compare_with_reference(model, opt, ref, ropt, TOL[torch.float32])
    assert opt.memory_stats()["host_bytes"] == 0


def test_model_zero_grad_between_steps_is_harmless():
    """model.zero_grad() sets .grad to None; the next backward makes new tensors that step() copies in."""
    model, opt, ref, ropt, _ = run_against_adamw(tiny_llama, policy="host", backend="torch", n_active=2,
                                                 steps=7, K=3, zero="model")
    compare_with_reference(model, opt, ref, ropt, TOL[torch.float32])


def test_param_without_grad_is_skipped_like_adamw():
    """A param that gets no gradient (unused, like an expert nobody routed to) is not decayed or stepped."""

    class WithUnused(MLPStack):
        def __init__(self):
            super().__init__()
            self.blocks[0].add_module("unused", nn.Linear(37, 37))  # in a block, never called

    torch.manual_seed(0)
    model = WithUnused()
    ref = copy.deepcopy(model)
    opt = FusedLISA(model, lr=1e-2, weight_decay=0.5, n_active_layers=5, backend="torch")
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.5)
    x = torch.randn(8, 3)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ropt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert torch.equal(model.blocks[0].unused.weight, ref.blocks[0].unused.weight)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close_rel(p, q, TOL[torch.float32], n)


def test_device_bytes_flat_over_500_switches():
    model = MLPStack(n_layers=6)
    opt = FusedLISA(model, lr=1e-3, n_active_layers=2, switch_every=1, inactive_moments="host", seed=1)
    packed_ptr = opt._packed_state.bufs[0].exp_avg.data_ptr()
    g = torch.Generator().manual_seed(0)

    def one_step():
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        opt.step()

    one_step()
    first = opt.memory_stats()
    for _ in range(500):
        one_step()
    last = opt.memory_stats()
    assert last["device_bytes"] == first["device_bytes"] > 0
    assert opt._packed_state.bufs[0].exp_avg.data_ptr() == packed_ptr
    # every block has been paged out by now; host state holds the 4 inactive blocks (+ stale copies)
    assert last["host_bytes"] >= 4 * opt._packed_state.layouts[0].blocks[0].length * 2 * 4


def test_device_policy_grows_host_policy_does_not():
    sizes = {}
    for policy in ("host", "device"):
        model = MLPStack(n_layers=6)
        opt = FusedLISA(model, lr=1e-3, n_active_layers=2, switch_every=1, inactive_moments=policy, seed=1)
        for _ in range(30):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.ones_like(p)
            opt.step()
        sizes[policy] = opt.memory_stats()
    assert sizes["device"]["device_bytes"] > sizes["host"]["device_bytes"]
    assert sizes["host"]["host_bytes"] > 0 and sizes["device"]["host_bytes"] == 0


@pytest.mark.parametrize("policy", ["host", "device", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe)
def test_resume_mid_interval_is_bitwise_exact(policy, dtype):
    steps, save_at, K = 14, 5, 3  # step 5 is in the middle of the second interval

    def fresh(seed):
        model = tiny_llama(seed=seed, dtype=dtype)
        return model, FusedLISA(model, lr=3e-3, weight_decay=0.1, n_active_layers=2, switch_every=K,
                                inactive_moments=policy, seed=seed)

    model, opt = fresh(0)
    for t in range(steps):
        lm_step(model, opt, lm_batch(t))
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_active = opt.active_layers

    model, opt = fresh(0)
    for t in range(save_at):
        lm_step(model, opt, lm_batch(t))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del model, opt
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    model, opt = fresh(123)  # a different init and seed: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    for t in range(save_at, steps):
        lm_step(model, opt, lm_batch(t))
    assert opt.active_layers == expected_active
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[n]), n


def test_bf16_masters_match_fp32_adamw_on_same_grads():
    """bf16 params with fp32 masters: fed the same gradients, the masters follow fp32 AdamW exactly and the
    bf16 params are the masters rounded to nearest, across switches (masters are paged with the moments)."""
    model = tiny_llama(dtype=torch.bfloat16)
    opt = FusedLISA(model, lr=3e-3, weight_decay=0.1, n_active_layers=2, switch_every=2, inactive_moments="host")
    names = opt._names
    masters = [p.detach().float().clone().requires_grad_() for p in opt._params]
    ropt = torch.optim.AdamW(masters, lr=3e-3, weight_decay=0.1)
    for t in range(9):
        opt.zero_grad()
        x = lm_batch(t)
        model(input_ids=x, labels=x).loss.backward()
        for p, m in zip(opt._params, masters):
            m.grad = p.grad.float().clone() if p.requires_grad and p.grad is not None else None
        opt.step()
        ropt.step()
    sd = opt.state_dict()
    for i, entry in sd["state"].items():
        assert_close_rel(entry["master_param"], masters[i], TOL[torch.float32], f"master {names[i]}")
        assert_close_rel(entry["exp_avg"], ropt.state[masters[i]]["exp_avg"], TOL[torch.float32], names[i])
    for p, m in zip(opt._params, masters):
        assert_close_rel(p, m.detach().to(torch.bfloat16), TOL[torch.bfloat16])


def test_sampler_reproducible_and_covers_blocks():
    def sequence(seed, sampler="uniform"):
        model = MLPStack(n_layers=6)
        opt = FusedLISA(model, n_active_layers=2, switch_every=1, seed=seed, sampler=sampler)
        seq = []
        for _ in range(40):
            seq.append(opt.active_layers)
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            opt.step()
        return seq

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)
    assert {b for s in sequence(7) for b in s} == set(range(6))
    assert all(len(set(s)) == 2 for s in sequence(7, "weight_norm"))


def test_weight_norm_sampler_prefers_heavy_blocks():
    model = MLPStack(n_layers=6)
    with torch.no_grad():
        for p in model.blocks[3].parameters():
            p.mul_(200.0)
    opt = FusedLISA(model, n_active_layers=1, switch_every=1, sampler="weight_norm", lr=0.0)
    counts = [0] * 6
    for _ in range(60):
        counts[opt.active_layers[0]] += 1
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
    assert counts[3] > 40, counts


def test_callable_sampler_and_its_validation():
    model = MLPStack(n_layers=6)
    opt = FusedLISA(model, n_active_layers=2, sampler=lambda n, k, g: [4, 1])
    assert opt.active_layers == (1, 4)
    with pytest.raises(ValueError, match=r"sampler returned \[1, 1\]"):
        FusedLISA(MLPStack(n_layers=6), n_active_layers=2, sampler=lambda n, k, g: [1, 1])


def test_constructor_freezes_inactive_blocks_and_grads_stay_autograds():
    model = tiny_llama()
    opt = FusedLISA(model, n_active_layers=1)
    stack = stack_of(model)
    for i, blk in enumerate(stack):
        for p in blk.parameters():
            assert p.requires_grad == (i in opt.active_layers)
    x = lm_batch(0)
    model(input_ids=x, labels=x).loss.backward()
    state = {t.untyped_storage().data_ptr() for b in opt._packed_state.bufs for t in (b.exp_avg, b.exp_avg_sq)}
    for p in model.parameters():
        if p.requires_grad:  # autograd's own gradient tensors, nothing of the optimizer's
            assert p.grad is not None and p.grad.untyped_storage().data_ptr() not in state
        else:
            assert p.grad is None


def _all_trainable(model):
    return all(p.requires_grad for p in model.parameters())


BAD_INPUTS = [
    ("lr", dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    ("lr_nan", dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
    ("beta1", dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
    ("beta2", dict(betas=(0.9, -0.5)), ValueError, "Invalid beta parameter at index 1: -0.5"),
    ("betas_len", dict(betas=(0.9,)), ValueError, "Invalid betas: (0.9,)"),
    ("eps", dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    ("wd", dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    ("gamma0", dict(n_active_layers=0), ValueError, "Invalid n_active_layers: 0 (must be an integer in 1..4"),
    ("gamma_big", dict(n_active_layers=5), ValueError, "Invalid n_active_layers: 5"),
    ("gamma_float", dict(n_active_layers=1.5), ValueError, "Invalid n_active_layers: 1.5"),
    ("K0", dict(switch_every=0), ValueError, "Invalid switch_every: 0"),
    ("sampler", dict(sampler="topk"), ValueError, "Invalid sampler: 'topk'"),
    ("policy", dict(inactive_moments="gpu"), ValueError, "Invalid inactive_moments: 'gpu'"),
    ("backend", dict(backend="metal"), ValueError, "Invalid backend: 'metal'"),
    ("backend_cuda_on_cpu", dict(backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
    ("layers_path", dict(layers="model.blocks"), ValueError, "model.blocks"),
    ("layers_type", dict(layers=3), TypeError, "int"),
]


@pytest.mark.parametrize("kwargs,exc,msg", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_value_and_touch_nothing(kwargs, exc, msg):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(exc) as info:
        FusedLISA(model, **kwargs)
    assert msg in str(info.value)
    assert _all_trainable(model), "a failed constructor must not freeze anything"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_not_a_model():
    with pytest.raises(TypeError, match="nn.Module"):
        FusedLISA([torch.zeros(3, requires_grad=True)])


def test_mixed_dtypes_rejected():
    model = MLPStack()
    model.out.to(torch.bfloat16)
    with pytest.raises(ValueError, match="one floating dtype"):
        FusedLISA(model)


def test_state_dict_from_other_model_is_rejected_and_nothing_changes():
    opt = FusedLISA(tiny_llama(n_layers=4), n_active_layers=2)
    other = FusedLISA(tiny_llama(n_layers=3), n_active_layers=2)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="different model"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="no 'lisa' section"):
        opt.load_state_dict(torch.optim.AdamW(tiny_llama().parameters()).state_dict())
    sd = opt.state_dict()
    sd["lisa"]["n_active_layers"] = 3
    with pytest.raises(ValueError, match="n_active_layers=3"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["lisa"]["active_layers"] == before["lisa"]["active_layers"]
    assert after["param_groups"] == before["param_groups"]


def test_lr_scheduler_drives_param_groups():
    model = MLPStack()
    opt = FusedLISA(model, lr=1.0, n_active_layers=5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= 1 else 1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # lr is now 0: nothing moves
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_repr_names_backend_and_schedule():
    r = repr(FusedLISA(tiny_llama(), n_active_layers=2, switch_every=7))
    assert "backend=" in r and "switch_every=7" in r and "model.layers" in r
