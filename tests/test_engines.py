"""One-process checks of lisa_fused/engines.py and dcp.py: what a wrapper's swap of param_groups[0]["params"]
does, opt.state for torch.distributed.checkpoint, the DCP layout round trip, FusedLISAFactory.
(The engines themselves run in tests/test_integration_engines.py, 2 processes.)"""
from __future__ import annotations

import pytest
import torch

from helpers import MLPStack, assert_trained_changed_frozen_kept, params_of, tiny_llama
from lisa_fused import FusedLISA, dcp


def make(model, **kw):
    return FusedLISA(model, lr=1e-2, n_active_layers=2, switch_every=2, backend="torch", **kw)


def step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def test_swapped_params_of_the_same_shapes_are_followed_before_the_first_step():
    """A re-wrap that assigns one new Parameter per old one (as accelerate's FSDP2 prepare does) is followed
    at the assignment: the optimizer trains the new objects, with the active set it had."""
    model = MLPStack(seed=0)
    opt = make(model)
    active = opt.active_layers
    old = list(opt.param_groups[0]["params"])
    new = [torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in old]
    for (name, _), q in zip(opt.model_layout.always + sum(opt.model_layout.blocks, ()), new):
        mod, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(mod, attr, q)
    opt.param_groups[0]["params"] = new
    assert opt._params == new and all(a is b for a, b in zip(opt._params, new))
    assert opt.active_layers == active
    before = params_of(model)
    ever = set()
    for s in range(3):  # spans a switch (switch_every=2)
        ever.update(opt.active_layers)
        step(model, opt, s)
    assert len(ever) > 2 or ever != set(active)
    assert_trained_changed_frozen_kept(model, before, ever)
    opt.release()
    assert all(q.requires_grad for q in new)  # the user's flags come back on the new objects


def test_groups_switched_one_after_the_other_like_accelerate_are_followed_at_the_last():
    """accelerate's _prepare_fsdp2: every group's entries become 1-element placeholders in place, then each
    group is assigned its new Parameters in a loop; FusedLISA rebinds once the last group is switched, and a
    step in a half-switched state raises naming the group."""
    model = MLPStack(seed=0)
    opt = make(model, param_groups=[{"params": ["out"], "lr": 1e-3}])
    names = {id(p): n for n, p in model.named_parameters()}
    olds = [list(g["params"]) for g in opt.param_groups]
    news = [[torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in g] for g in olds]
    for g in opt.param_groups:
        for i, p in enumerate(g["params"]):
            g["params"][i] = torch.empty(1)
    for old, new in zip(olds, news):
        for p, q in zip(old, new):
            name = names[id(p)]
            setattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], q)
    opt.param_groups[0]["params"] = news[0]
    assert opt._params[0] is olds[0][0]  # not yet: group 1 still holds a placeholder
    with pytest.raises(RuntimeError, match=r"param_groups\[1\] still hold \['Tensor'"):
        step(model, opt)
    opt.param_groups[1]["params"] = news[1]
    assert all(a is b for a, b in zip(opt._params, news[0] + news[1]))
    assert opt.param_groups[1]["lr"] == 1e-3 and opt._group_of[-1] is opt.param_groups[1]
    before = params_of(model)
    ever = set()
    for s in range(3):
        ever.update(opt.active_layers)
        step(model, opt, s)
    assert_trained_changed_frozen_kept(model, before, ever)


def test_swap_after_training_is_refused():
    model = MLPStack(seed=0)
    opt = make(model)
    step(model, opt)
    new = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="after 1 optimizer steps; FusedLISA follows such a re-wrap only before"):
        opt.param_groups[0]["params"] = new


def test_swap_for_other_tensors_is_refused_naming_who_did_it():
    model = MLPStack(seed=0)
    opt = make(model)

    def wrapper_init():  # a stand-in for a wrapper that flattens the params into one tensor
        opt.param_groups[0]["params"] = [torch.zeros(10)]

    with pytest.raises(RuntimeError, match=r"test_engines\.wrapper_init replaced the 14 parameters of param_groups\[0\] "
                                           r"with 1 other tensors"):
        wrapper_init()


def test_in_place_change_of_the_param_list_is_seen_at_step():
    model = MLPStack(seed=0)
    opt = make(model)
    opt.param_groups[0]["params"][0] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="an in-place change of param_groups"):
        step(model, opt)


def test_state_is_torchs_and_dcps_init_step_moves_no_schedule():
    """opt.state as torch's: empty before the first step, an entry per stepped param after. DCP's
    _init_optim_state (it steps an optimizer whose .state is empty, with zero grads and lr 0) then gives
    FusedLISA what it gives torch AdamW (step 1, zero moments, params unchanged) without moving the schedule."""
    import copy

    from torch.distributed.checkpoint.state_dict import _init_optim_state

    assert len(FusedLISA(MLPStack(seed=0), n_active_layers=2).state) == 0  # (a temporary optimizer's view works)
    model = MLPStack(seed=0)
    ref = copy.deepcopy(model)
    opt = make(model)
    for i, blk in enumerate(ref.blocks):  # the reference freezes what FusedLISA froze
        blk.requires_grad_(i in opt.active_layers)
    ropt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    assert not opt.state and not ropt.state and len(opt.state) == 0
    before = params_of(model)
    _init_optim_state(opt)
    _init_optim_state(ropt)
    assert opt._global_step == 0, "DCP's init step counted towards switch_every"
    assert len(opt.state) == len(ropt.state) == sum(p.requires_grad for p in model.parameters())
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, before[n]), n
        if p.requires_grad:
            mine, theirs = opt.state[p], ropt.state[q]
            assert float(mine["step"]) == float(theirs["step"]) == 1.0
            assert torch.equal(mine["exp_avg"], theirs["exp_avg"]) and not mine["exp_avg_sq"].any()
        else:
            assert p not in opt.state
    step(model, opt)
    p = opt._params[0]
    assert float(opt.state[p]["step"]) == 2.0 and opt._global_step == 1
    assert torch.equal(opt.state[p]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="read-only"):
        opt.state = {p: {}}


@pytest.mark.parametrize("sampler, moments, policy", [("grad_norm", "fp32", "host"), ("weight_norm", "8bit", "host"),
                                                      ("uniform", "4bit", "drop")])
def test_dcp_layout_round_trip_in_one_process_group(sampler, moments, policy):
    """to_dcp_layout -> from_dcp_layout gives the plain state_dict back; a fresh optimizer loaded from the
    DCP layout continues bitwise; "state" is empty (DCP's requires_grad filter never drops paged state)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = MLPStack(seed=0)
        opt = make(model, sampler=sampler, moments=moments, inactive_moments=policy)
        for s in range(3):
            step(model, opt, s)
        sd = opt.state_dict()
        assert sd["state"] == {} and dcp.is_dcp_layout(sd)
        assert len(sd["param_groups"][0]["lisa"]["state"]) == len(opt._params)
        clone = MLPStack(seed=1)
        clone.load_state_dict(model.state_dict())
        opt2 = make(clone, sampler=sampler, moments=moments, inactive_moments=policy, seed=5)
        opt2.load_state_dict(sd)
        for s in range(3, 7):
            step(model, opt, s)
            step(clone, opt2, s)
        for a, b in zip(model.parameters(), clone.parameters()):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()


def test_dcp_without_a_process_group_keeps_the_schedule(tmp_path):
    """Without torch.distributed, DCP's get/set_optimizer_state_dict still get the layout DCP keeps whole (it
    would drop a top-level "lisa" section): dcp.save / dcp.load in one process resume bitwise."""
    import torch.distributed.checkpoint as dcp_api
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    ref_model = MLPStack(seed=0)
    ref = make(ref_model)
    for s in range(6):
        step(ref_model, ref, seed=s)

    model = MLPStack(seed=0)
    opt = make(model)
    for s in range(3):
        step(model, opt, seed=s)
    osd = get_optimizer_state_dict(model, opt)
    assert dcp.is_dcp_layout(osd) and "lisa" not in osd
    dcp_api.save({"optim": osd, "model": model.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    assert opt.state_dict().get("lisa") is not None  # (a plain state_dict() call keeps the plain layout)

    model2 = MLPStack(seed=7)
    opt2 = make(model2)
    sd = {"optim": get_optimizer_state_dict(model2, opt2), "model": model2.state_dict()}
    assert opt2._global_step == 0  # (its DCP init step did not count)
    dcp_api.load(sd, checkpoint_id=str(tmp_path / "ckpt"))
    model2.load_state_dict(sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    assert opt2._global_step == 3 and opt2.active_layers == opt.active_layers
    for s in range(3, 6):
        step(model2, opt2, seed=s)
    for (n, p), q in zip(ref_model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n


def test_factory_builds_fused_lisa_on_the_trainers_model():
    pytest.importorskip("transformers")
    from lisa_fused.hf import FusedLISAFactory

    model = tiny_llama(3)
    opt = FusedLISAFactory()(model, lr=1e-3, n_active_layers=1, switch_every=4)
    assert isinstance(opt, FusedLISA) and opt.n_active_layers == 1 and opt.param_groups[0]["lr"] == 1e-3
    with pytest.raises(TypeError, match="does not call optimizer factories"):
        FusedLISAFactory()([{"params": list(model.parameters())}])
