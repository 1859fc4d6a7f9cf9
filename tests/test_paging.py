"""Paging race test (torchao's CPU-offload idea): layers with almost no arithmetic and large moments,
a switch after every step, and a check against torch AdamW after every step. On CUDA the copies run on
a side stream; a missing event wait shows up here as a wrong parameter or moment. On CPU the same code
path runs synchronously."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lisa_fused import FusedLISA
from lisa_fused.paging import MomentStore
from helpers import TOL, assert_close_rel, describe, freeze_like


class Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.01 * torch.randn(n))

    def forward(self, h):
        return h * self.weight


class ScaleStack(nn.Module):
    def __init__(self, n=(1 << 16) + 3, n_layers=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Parameter(torch.randn(n))
        self.layers = nn.ModuleList(Scale(n) for _ in range(n_layers))

    def forward(self, x):
        h = x * self.embed
        for layer in self.layers:
            h = layer(h)
        return h


@pytest.mark.parametrize("policy", ["host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe)
def test_switch_every_step_matches_adamw(device, policy, dtype):
    # big layers on a GPU, so a copy in flight is still in flight when a missing wait would read it
    n = (1 << 22) + 3 if device.type == "cuda" else 4099
    model = ScaleStack(n).to(device=device, dtype=dtype)
    opt = FusedLISA(model, lr=1e-2, weight_decay=0.05, n_active_layers=3, switch_every=1,
                    inactive_moments=policy, seed=2)
    # fp32 reference on the same gradients (for bf16: AdamW on fp32 copies, as the masters are)
    ref_params = [p.detach().float().clone() for p in opt._params]
    ropt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.05)
    g = torch.Generator(device="cpu").manual_seed(1)
    for step in range(40):
        x = torch.randn(model.embed.shape, generator=g).to(device=device, dtype=dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        for p, r in zip(opt._params, ref_params):
            r.grad = p.grad.float().clone() if p.requires_grad else None
        opt.step()
        ropt.step()
    tol = TOL[dtype]
    for p, r in zip(opt._params, ref_params):
        assert_close_rel(p.float(), r.to(dtype).float(), tol, "param")
    sd = opt.state_dict()
    for i, e in sd["state"].items():
        st = ropt.state[ref_params[i]]
        assert_close_rel(e["exp_avg"], st["exp_avg"].cpu(), TOL[torch.float32], f"exp_avg {i}")
        assert_close_rel(e["exp_avg_sq"], st["exp_avg_sq"].cpu(), TOL[torch.float32], f"exp_avg_sq {i}")


def test_store_round_trip_and_policies(device):
    n, length = 3, 4097
    slots = torch.arange(n * 2 * length, dtype=torch.float32, device=device).reshape(2, n, length)

    def views(slot, ln):
        return [slots[slot, k, :ln] for k in range(n)]

    for policy in ("host", "device", "drop"):
        store = MomentStore(policy, device)
        original = slots[0].clone()
        fresh = store.switch(leaving=[(5, 0)], arriving=[(7, 0)], length_of=lambda b: length,
                             slot_views=views, init_master=lambda s, b, v: v.fill_(-1.0))
        store.wait_ready()
        assert fresh == [7]
        assert torch.all(slots[0, :2] == 0) and torch.all(slots[0, 2] == -1)  # zeroed moments, master init
        fresh = store.switch(leaving=[(7, 0)], arriving=[(5, 0)], length_of=lambda b: length,
                             slot_views=views, init_master=lambda s, b, v: v.fill_(-1.0))
        store.wait_ready()
        if policy == "drop":
            assert fresh == [5] and store.nbytes() == 0
        else:
            assert fresh == [] and torch.equal(slots[0], original), policy
        if policy == "host":
            assert store.get(5).device.type == "cpu"


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="Invalid inactive_moments: 'disk'"):
        MomentStore("disk", "cpu")


@pytest.mark.gpu
def test_host_store_is_pinned_and_exact_size():
    model = ScaleStack(n=(1 << 20) + 5).cuda()
    opt = FusedLISA(model, n_active_layers=2, switch_every=1, inactive_moments="host")
    for _ in range(3):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        opt.step()
    opt._store.synchronize()
    for block, buf in opt._store._saved.items():
        assert buf.is_pinned(), block
        assert buf.numel() == 2 * opt._packed.blocks[block].length  # no power-of-two rounding
