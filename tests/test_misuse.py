"""How real training code touches an optimizer beyond the happy path (issue 22): each pattern either works,
checked against torch.optim.AdamW with the same freezing, or raises naming the parameter and the fix with
nothing changed. The table in docs/integration.md ("Patterns") lists them with these tests."""
from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

from helpers import MLPStack, assert_close_rel, freeze_like, stack_of
from lisa_fused import FusedLISA

LR, WD, K = 1e-2, 0.1, 2


class Pair:
    """FusedLISA (gamma 2 of 5 blocks, a switch every K steps) on an MLPStack and torch AdamW on a copy.
    Each step the reference freezes the blocks FusedLISA does not train; both get the reference's grads
    (teacher forcing: it compares the optimizers, not the ulps of two forward passes)."""

    def __init__(self, backend="cpu", n_active=2, **kw):
        self.model = MLPStack()
        self.ref = copy.deepcopy(self.model)
        self.opt = FusedLISA(self.model, lr=LR, weight_decay=WD, n_active_layers=n_active, switch_every=K, seed=1,
                             backend=backend, **kw)
        self.ropt = torch.optim.AdamW([p for p in self.ref.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
        self.ever = set(self.opt.active_layers)
        self.init = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.gen = torch.Generator().manual_seed(0)

    def ref_grads(self, partial=False):
        """Backward on the reference with the current active set frozen like FusedLISA's; returns its grads."""
        freeze_like(stack_of(self.ref), self.opt.active_layers)
        for n, p in self.model.named_parameters():  # the user's own flags, mirrored
            q = dict(self.ref.named_parameters())[n]
            if not p.requires_grad:
                q.requires_grad_(False)
        self.ropt.zero_grad()
        x = torch.randn(8, 3, generator=self.gen)
        out = self.ref(x)
        (out[:, :0].sum() + self.ref.out(self.ref.inp(x)).square().mean() if partial else out.square().mean()).backward()
        return {n: q.grad for n, q in self.ref.named_parameters()}

    def step_both(self, write=None, partial=False, zero=True):
        """One step of both; zero: opt.zero_grad() first (set_to_none=True), as a training loop does."""
        if zero:
            self.opt.zero_grad()
        grads = self.ref_grads(partial)
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            g = grads[n]
            if p.requires_grad and g is not None:
                (write or _assign)(p, g.clone())
        self.opt.step()
        self.ropt.step()
        self.ever |= set(self.opt.active_layers)

    def check(self, tol=1e-6):
        rp = dict(self.ref.named_parameters())
        for n, p in self.model.named_parameters():
            assert_close_rel(p, rp[n], tol, n)
        moved = [n for n, p in self.model.named_parameters() if not torch.equal(p, self.init[n])]
        assert "inp.weight" in moved and "out.weight" in moved, moved
        for b in range(5):
            if b not in self.ever:
                assert all(torch.equal(p, self.init[n]) for n, p in self.model.named_parameters()
                           if n.startswith(f"blocks.{b}.")), f"block {b} never active but changed"


def _assign(p, g):
    p.grad = g


# --------------------------------------------------------------------------- gradients that are not the view
def _swap_data(p, g):  # meta-learning / parameter-server code: keeps the .grad object, swaps its storage
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    p.grad.data = g


def _swap_data_double(p, g):  # another dtype, through .data (assigning .grad itself refuses another dtype)
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    p.grad.data = g.double()


def _non_contiguous(p, g):
    if g.dim() == 2 and min(g.shape) > 1:
        t = torch.empty(g.shape[::-1]).t()
        t.copy_(g)
        assert not t.is_contiguous()
        g = t
    p.grad = g


def _in_place_after_backward(p, g):
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    p.grad.mul_(0).add_(g)


WRITES = {"grad.data=": _swap_data, "grad.data=double": _swap_data_double, "non_contiguous": _non_contiguous,
          "in_place": _in_place_after_backward, "assign": _assign}


@pytest.mark.parametrize("write", list(WRITES))
def test_every_way_of_writing_a_grad_steps_like_adamw(write):
    pair = Pair()
    for _ in range(6):  # three intervals: leaving blocks hand their grads back, arriving ones take views
        pair.opt.zero_grad(set_to_none=False)
        pair.step_both(WRITES[write], zero=False)
    pair.check()


def test_a_grad_of_the_wrong_shape_raises_naming_it_and_changes_nothing():
    pair = Pair()
    pair.step_both()
    sd, before = pair.opt.state_dict(), {n: p.detach().clone() for n, p in pair.model.named_parameters()}
    for p in pair.model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    pair.model.out.weight.grad.data = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"parameter 'out.weight' has a .grad of shape \(3,\), but the parameter "
                                           r"is \(1, 37\): assign a gradient of the parameter's shape"):
        pair.opt.step()
    assert all(torch.equal(p, before[n]) for n, p in pair.model.named_parameters())
    after = pair.opt.state_dict()
    assert after["lisa"]["global_step"] == sd["lisa"]["global_step"]
    assert all(torch.equal(after["state"][i]["exp_avg"], e["exp_avg"]) for i, e in sd["state"].items())


# ----------------------------------------------------------------------------------------------- steps
def test_step_before_any_backward_changes_nothing_and_keeps_the_schedule():
    pair = Pair()
    active = pair.opt.active_layers
    for _ in range(3 * K):
        pair.opt.step()
        pair.ropt.step()
    assert pair.opt.active_layers == active and pair.opt.state_dict()["lisa"]["global_step"] == 0
    assert all(torch.equal(p, pair.init[n]) for n, p in pair.model.named_parameters())
    for _ in range(3):
        pair.step_both()
    pair.check()


def test_zero_grad_keeping_tensors_then_a_partial_backward_steps_zero_grads_like_adamw():
    """zero_grad(set_to_none=False) leaves zero grads: a param the next backward does not reach still steps
    (weight decay, moment decay), as in torch; the blocks' outputs are unused in the partial loss."""
    pair = Pair()
    pair.step_both()
    for _ in range(4):
        pair.opt.zero_grad(set_to_none=False)
        pair.step_both(partial=True, zero=False)
    pair.check()


def test_clip_grad_norm_foreach_on_the_packed_views():
    pair = Pair()

    def clip_then_assign(p, g):
        p.grad = g

    for _ in range(6):
        grads = pair.ref_grads()
        for n, p in pair.model.named_parameters():
            if p.requires_grad:
                p.grad = grads[n].clone()
        for m in (pair.model, pair.ref):
            torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], 0.05, foreach=True)
        pair.opt.step()
        pair.ropt.step()
        pair.ever |= set(pair.opt.active_layers)
    pair.check()


# --------------------------------------------------------------------------------------------- copies
def test_swa_averaged_model_and_ema_copies_track_the_trained_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    pair = Pair()
    ema = AveragedModel(pair.model, multi_avg_fn=get_ema_multi_avg_fn(0.9))  # deep-copies the packed views
    swa = AveragedModel(pair.model)
    rema = AveragedModel(pair.ref, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    rswa = AveragedModel(pair.ref)
    for _ in range(6):
        pair.step_both()
        for a, m in ((ema, pair.model), (swa, pair.model), (rema, pair.ref), (rswa, pair.ref)):
            a.update_parameters(m)
    pair.check()
    for a, b in ((ema, rema), (swa, rswa)):
        for p, q in zip(a.module.parameters(), b.module.parameters()):
            assert_close_rel(p, q, 1e-6, "averaged copy")
    assert not any(p.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
                   for p in ema.module.parameters() for q in pair.model.parameters())


def test_lr_scheduler_state_dict_beside_the_optimizers_resumes_bitwise():
    def run(steps, resume_at=None):
        pair = Pair()
        sched = torch.optim.lr_scheduler.OneCycleLR(pair.opt, max_lr=LR, total_steps=12)
        for t in range(steps):
            if t == resume_at:
                ckpt = io.BytesIO()
                torch.save({"model": pair.model.state_dict(), "opt": pair.opt.state_dict(),
                            "sched": sched.state_dict()}, ckpt)
                ckpt.seek(0)
                saved = torch.load(ckpt, weights_only=True)
                gen = pair.gen
                pair = Pair()
                pair.gen = gen
                sched = torch.optim.lr_scheduler.OneCycleLR(pair.opt, max_lr=LR, total_steps=12)
                pair.model.load_state_dict(saved["model"])
                pair.opt.load_state_dict(saved["opt"])
                sched.load_state_dict(saved["sched"])
            grads = pair.ref_grads()  # (the reference only supplies the gradients here)
            for n, p in pair.model.named_parameters():
                p.grad = grads[n].clone() if p.requires_grad else None
            pair.opt.step()
            sched.step()
        return pair, sched

    a, sa = run(9)
    b, sb = run(9, resume_at=5)
    assert sa.get_last_lr() == sb.get_last_lr()
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


# ------------------------------------------------------------------------------------- requires_grad flips
def test_a_param_the_user_freezes_mid_run_stays_frozen_across_switches():
    pair = Pair(n_active=5 - 1)  # 4 of 5 blocks active: every block comes and goes
    target = None
    for t in range(10):
        if t == 1:
            b = pair.opt.active_layers[0]
            target = f"blocks.{b}.0.weight"
            dict(pair.model.named_parameters())[target].requires_grad_(False)
            frozen_at = dict(pair.model.named_parameters())[target].detach().clone()
        pair.step_both()
    assert torch.equal(dict(pair.model.named_parameters())[target], frozen_at)
    assert not dict(pair.model.named_parameters())[target].requires_grad
    pair.check()


def test_unfreezing_a_param_of_an_inactive_block_trains_it_when_its_block_is_drawn(caplog):
    pair = Pair()
    p0 = dict(pair.model.named_parameters())
    b = pair.opt.active_layers[0]
    p0[f"blocks.{b}.0.bias"].requires_grad_(False)  # frozen by the user while active
    pair.step_both()
    for _ in range(K):
        pair.step_both()
        if b not in pair.opt.active_layers:
            break
    assert b not in pair.opt.active_layers
    p0[f"blocks.{b}.0.bias"].requires_grad_(True)  # the user wants it trained again
    with caplog.at_level(logging.INFO, logger="lisa_fused"):
        pair.step_both()
    assert "requires_grad=True was set on 1 params of inactive blocks" in caplog.text
    assert not p0[f"blocks.{b}.0.bias"].requires_grad or b in pair.opt.active_layers
    for _ in range(12):
        pair.step_both()
    pair.check()
    assert not torch.equal(p0[f"blocks.{b}.0.bias"], pair.init[f"blocks.{b}.0.bias"])


def test_a_param_frozen_at_construction_that_gets_a_grad_is_warned_about_once(caplog):
    model = MLPStack()
    model.inp.bias.requires_grad_(False)
    opt = FusedLISA(model, lr=LR, n_active_layers=2, backend="cpu")
    model.inp.bias.requires_grad_(True)
    before = model.inp.bias.detach().clone()
    with caplog.at_level(logging.WARNING, logger="lisa_fused"):
        for _ in range(3):
            model(torch.randn(4, 3)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert caplog.text.count("parameter 'inp.bias' was frozen when FusedLISA was built") == 1
    assert "opt.add_param_group" in caplog.text
    assert torch.equal(model.inp.bias, before)


# ------------------------------------------------------------------------------------------ add_param_group
def test_add_param_group_unfreezes_progressively_like_adamw():
    """Progressive unfreezing: the input layer and one block's bias frozen at construction, added with their
    own lr after 3 steps; equal to torch AdamW doing the same, the state of every other param carried over."""
    pair = Pair()
    pair.opt.release()  # (hands the construction-time flags back: freeze after it)
    for m in (pair.model, pair.ref):
        m.inp.weight.requires_grad_(False)
        m.blocks[3][0].bias.requires_grad_(False)
    pair.opt = FusedLISA(pair.model, lr=LR, weight_decay=WD, n_active_layers=2, switch_every=K, seed=1, backend="cpu")
    pair.ropt = torch.optim.AdamW([p for p in pair.ref.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    pair.ever = set(pair.opt.active_layers)
    for _ in range(3):
        pair.step_both()
    schedule = pair.opt.active_layers, pair.opt.state_dict()["lisa"]["global_step"]
    for m in (pair.model, pair.ref):
        m.inp.weight.requires_grad_(True)
        m.blocks[3][0].bias.requires_grad_(True)
    pair.opt.add_param_group({"params": [pair.model.inp.weight, pair.model.blocks[3][0].bias], "lr": LR / 2})
    pair.ropt.add_param_group({"params": [pair.ref.inp.weight, pair.ref.blocks[3][0].bias], "lr": LR / 2})
    assert (pair.opt.active_layers, pair.opt.state_dict()["lisa"]["global_step"]) == schedule
    assert len(pair.opt.param_groups) == 2 and pair.opt.param_groups[1]["weight_decay"] == WD
    for _ in range(8):
        pair.step_both()
    pair.check()
    assert 3 in pair.ever and not torch.equal(pair.model.blocks[3][0].bias, pair.init["blocks.3.0.bias"])


@pytest.mark.parametrize("what,match", [
    ("trained", r"parameter 'out.weight' is already trained by this FusedLISA"),
    ("frozen", r"parameter 'inp.weight' has requires_grad=False: set requires_grad=True on it first"),
    ("stray", r"\['inp.bias'\] became trainable since FusedLISA was built but are in no group"),
    ("nothing", r"pattern 'nope' names no trained parameter"),
])
def test_add_param_group_refusals_name_the_param_and_change_nothing(what, match):
    model = MLPStack()
    model.inp.weight.requires_grad_(False)
    model.inp.bias.requires_grad_(False)
    opt = FusedLISA(model, lr=LR, n_active_layers=2, switch_every=K, backend="cpu")
    for _ in range(3):
        model(torch.randn(4, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    sd, values = opt.state_dict(), {n: p.detach().clone() for n, p in model.named_parameters()}
    group = {"trained": {"params": [model.out.weight]}, "frozen": {"params": [model.inp.weight]},
             "nothing": {"params": "nope"}}.get(what)
    if what == "stray":
        model.inp.weight.requires_grad_(True)
        model.inp.bias.requires_grad_(True)
        group = {"params": [model.inp.weight]}
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(group)
    after = opt.state_dict()
    assert after["lisa"]["active_layers"] == sd["lisa"]["active_layers"] and len(opt.param_groups) == 1
    assert all(torch.equal(after["state"][i][k], e[k]) for i, e in sd["state"].items() for k in e)
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())
    inactive = [b for b in range(5) if b not in opt.active_layers]
    assert all(not p.requires_grad for b in inactive for p in model.blocks[b].parameters())
    model(torch.randn(4, 3)).square().mean().backward()
    opt.step()  # still trains
    assert not torch.equal(model.out.weight, values["out.weight"])
