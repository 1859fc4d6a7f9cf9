"""param_groups=: per-group hyperparameters and state formats, against torch.optim.AdamW with the same groups
and the same freezing; edits in place; bad groups; the small-tensor rule at a real shape."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from helpers import assert_close_rel, freeze_like, lm_batch, stack_of, tiny_llama
from lisa_fused import FusedLISA

LR, WD = 3e-3, 0.1


def named(model):
    return dict(model.named_parameters())


def run_pair(model, groups_by_name, steps=9, K=3, backend="cpu", edit=None, **kw):
    """FusedLISA(model, param_groups=...) and torch AdamW with the same groups (defaults first), both fed
    the reference model's gradients; frozen blocks get none. groups_by_name: [(names, options)].
    edit(t, opt, ropt, model, ref): called before step t, to change param_groups (or the models) on both.
    Returns (model, opt, ref, ropt, ever_active)."""
    ref = copy.deepcopy(model)
    params, rparams = named(model), named(ref)
    pg = [{"params": [params[n] for n in names], **o} for names, o in groups_by_name]
    opt = FusedLISA(model, lr=LR, weight_decay=WD, n_active_layers=2, switch_every=K, seed=3, backend=backend,
                    param_groups=pg, **kw)
    claimed = {n for names, _ in groups_by_name for n in names}
    rgroups = [{"params": [p for n, p in rparams.items() if n not in claimed]}]
    rgroups += [{"params": [rparams[n] for n in names], **{k: v for k, v in o.items() if k in
                                                         ("lr", "betas", "eps", "weight_decay")}}
                for names, o in groups_by_name]
    ropt = torch.optim.AdamW(rgroups, lr=LR, weight_decay=WD)
    rstack, ever = stack_of(ref), set()
    for t in range(steps):
        if edit is not None:
            edit(t, opt, ropt, model, ref)
        active = set(opt.active_layers)
        ever |= active
        freeze_like(rstack, active)
        ropt.zero_grad()
        x = lm_batch(t)
        ref(input_ids=x, labels=x).loss.backward()
        opt.zero_grad()
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = rparams[n].grad.clone()
        opt.step()
        ropt.step()
    return model, opt, ref, ropt, ever


def assert_matches(model, ref, ever, tol=1e-6):
    rp = named(ref)
    blocks = stack_of(model)
    for b, blk in enumerate(blocks):
        if b not in ever:
            for (n, p), (_, q) in zip(blk.named_parameters(), stack_of(ref)[b].named_parameters()):
                assert torch.equal(p, q), f"block {b} was never active but {n} changed"
    for n, p in model.named_parameters():
        assert_close_rel(p, rp[n], tol, n)


def test_groups_with_their_own_hyperparameters_equal_adamw():
    model = tiny_llama(n_layers=4)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = [n for n in init if "norm" in n]
    groups = [(["lm_head.weight", "model.embed_tokens.weight"], dict(lr=1e-3, betas=(0.8, 0.99))),
              (norms, dict(weight_decay=0.0, eps=1e-6))]
    model, opt, ref, ropt, ever = run_pair(model, groups)
    assert len(opt.param_groups) == 3
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[2]["weight_decay"] == 0.0
    assert_matches(model, ref, ever)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, init[n])]
    assert "lm_head.weight" in moved and any("norm" in n for n in moved)


def test_edits_in_place_are_read_every_step():
    """lr per group (a scheduler), weight_decay, betas and a group set to lr=0 mid-run."""
    def edit(t, opt, ropt, *_):
        for g, rg in zip(opt.param_groups, ropt.param_groups):
            g["lr"] = rg["lr"] = LR * (1 - t / 20)
        if t == 3:
            opt.param_groups[1]["weight_decay"] = ropt.param_groups[1]["weight_decay"] = 0.5
            opt.param_groups[0]["betas"] = ropt.param_groups[0]["betas"] = (0.5, 0.9)
        if t == 5:
            opt.param_groups[1]["lr"] = ropt.param_groups[1]["lr"] = 0.0

    model = tiny_llama(n_layers=4)
    model, opt, ref, ropt, ever = run_pair(model, [(["lm_head.weight"], {})], edit=edit)
    assert_matches(model, ref, ever)


def test_a_group_whose_params_get_no_grad_stays_put_and_others_train():
    """A "frozen group": the user freezes the head mid-run (requires_grad=False); torch and FusedLISA both
    skip a param without .grad."""
    head_at = {}

    def edit(t, opt, ropt, model, ref):
        if t == 4:
            model.lm_head.weight.requires_grad_(False)
            ref.lm_head.weight.requires_grad_(False)
            head_at["t4"] = model.lm_head.weight.detach().clone()

    model, opt, ref, ropt, ever = run_pair(tiny_llama(n_layers=4), [(["lm_head.weight"], dict(lr=1e-3))], edit=edit)
    assert torch.equal(model.lm_head.weight, head_at["t4"])
    assert_matches(model, ref, ever)


def test_name_patterns_pick_params_tied_names_and_modules():
    from helpers import tiny_gpt2

    model = tiny_gpt2(n_layers=4)
    opt = FusedLISA(model, n_active_layers=2, param_groups=[
        {"params": "lm_head", "moments": "fp32"},  # tied to transformer.wte.weight: found by its other name
        {"params": ["*.ln_*", "transformer.h.*.attn.c_attn.bias"], "weight_decay": 0.0}])
    names = {id(p): n for n, p in model.named_parameters()}
    g1 = [names[id(p)] for p in opt.param_groups[1]["params"]]
    g2 = [names[id(p)] for p in opt.param_groups[2]["params"]]
    assert g1 == ["transformer.wte.weight"]
    assert all(".ln_" in n or n.endswith("attn.c_attn.bias") for n in g2) and len(g2) == 4 * 5 + 2
    assert len(opt.param_groups[0]["params"]) + len(g1) + len(g2) == len(list(model.parameters()))


@pytest.mark.parametrize("groups,err,match", [
    ([{"params": "no_such_module"}], ValueError, r"param_groups\[0\] \(opt.param_groups\[1\]\): pattern 'no_such_module' names no trained parameter"),
    ([{"params": ["lm_head"]}, {"params": "lm_head.weight"}], ValueError,
     r"param_groups\[1\] \(opt.param_groups\[2\]\): parameter 'lm_head.weight' is already in param_groups\[0\]"),
    ([{"params": "lm_head", "momentum": 0.9}], ValueError, r"param_groups\[0\] \(opt.param_groups\[1\]\): unknown key 'momentum'"),
    ([{"params": "lm_head", "moments": "3bit"}], ValueError, r"param_groups\[0\] \(opt.param_groups\[1\]\): Invalid moments: '3bit'"),
    ([{"params": "lm_head", "master_weights": "kahan"}], ValueError,
     r"param_groups\[0\] \(opt.param_groups\[1\]\): master_weights='kahan' .* this model's trainable params are torch.float32"),
    ([{"params": "lm_head", "lr": -1.0}], ValueError, r"param_groups\[0\] \(opt.param_groups\[1\]\): Invalid learning rate: -1.0"),
    ([{"params": []}], ValueError, r"param_groups\[0\] \(opt.param_groups\[1\]\): 'params' is empty"),
    ([{"lr": 1.0}], ValueError, r"param_groups\[0\] \(opt.param_groups\[1\]\) has no 'params'"),
    ({"params": "lm_head"}, TypeError, "param_groups must be a list of dicts"),
    ([{"params": [3]}], TypeError, r"'params' items must be Parameters or name patterns \(str\), got int"),
])
def test_bad_groups_raise_naming_the_group(groups, err, match):
    model = tiny_llama(n_layers=4)
    with pytest.raises(err, match=match):
        FusedLISA(model, n_active_layers=2, param_groups=groups)
    assert all(p.requires_grad for p in model.parameters())  # the refused one froze nothing
    FusedLISA(model, n_active_layers=2)  # and claimed nothing


def test_a_frozen_or_foreign_parameter_is_refused_by_name():
    model = tiny_llama(n_layers=4)
    model.model.norm.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'model.norm.weight' is frozen"):
        FusedLISA(model, n_active_layers=2, param_groups=[{"params": [model.model.norm.weight]}])
    with pytest.raises(ValueError, match="matches only parameters frozen before FusedLISA was built"):
        FusedLISA(model, n_active_layers=2, param_groups=[{"params": "model.norm"}])
    with pytest.raises(ValueError, match="not a parameter of this model"):
        FusedLISA(model, n_active_layers=2, param_groups=[{"params": [torch.nn.Parameter(torch.zeros(3))]}])


def test_editing_a_format_key_or_the_group_list_raises_and_changes_nothing():
    model = tiny_llama(n_layers=4)
    opt = FusedLISA(model, lr=LR, n_active_layers=2, backend="cpu", param_groups=[{"params": "lm_head"}])
    x = lm_batch(0)
    model(input_ids=x, labels=x).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = opt.state_dict()
    opt.param_groups[1]["moments"] = "8bit"
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['moments'\] was changed from 'fp32' to '8bit'"):
        opt.step()
    opt.param_groups[1]["moments"] = "fp32"
    opt.param_groups.append({"params": [], "lr": 1.0})
    with pytest.raises(RuntimeError, match=r"add groups with opt.add_param_group\(...\)"):
        opt.step()
    opt.param_groups.pop()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.state_dict()["lisa"]["global_step"] == sd["lisa"]["global_step"] == 0
    opt.step()
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])


@pytest.mark.parametrize("moments", ["8bit", "4bit"])
def test_embedding_and_head_pinned_to_fp32_resume_bitwise(moments):
    """A group pinning the embedding and head to fp32 moments under a 4-bit default (bnb's
    override_config idiom); a resume mid-interval with a switch on each side is bitwise."""
    def fresh(seed):
        model = tiny_llama(n_layers=4, hidden=64, seed=seed, dtype=torch.bfloat16)
        opt = FusedLISA(model, lr=LR, n_active_layers=2, switch_every=3, seed=seed, moments=moments,
                        master_weights="stochastic", backend="cpu",
                        param_groups=[{"params": ["model.embed_tokens", "lm_head"], "moments": "fp32",
                                       "master_weights": "kahan", "lr": 1e-3}])
        return model, opt

    def steps(model, opt, ts):
        for t in ts:
            opt.zero_grad()
            x = lm_batch(t)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()

    model, opt = fresh(0)
    fmt = opt.state_formats()
    assert fmt["lm_head.weight"] == "fp32/kahan" and fmt["model.embed_tokens.weight"] == "fp32/kahan"
    assert fmt["model.layers.0.mlp.up_proj.weight"] == f"{moments}/stochastic"
    assert fmt["model.layers.0.input_layernorm.weight"] == "fp32/stochastic"  # 64 < 4096 elements
    assert opt.memory_stats()["compensation_bytes"] > 0
    steps(model, opt, range(8))
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt = fresh(0)
    steps(model, opt, range(4))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt = fresh(7)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    steps(model, opt, range(4, 8))
    for n, p in model.named_parameters():
        assert torch.equal(p, want[n]), n


def test_loading_across_group_formats_converts_per_param(caplog):
    """Saved with the head in 8-bit, loaded with the head pinned to fp32: that param is dequantized."""
    import logging

    def build(head_moments):
        model = tiny_llama(n_layers=4, hidden=64)
        return model, FusedLISA(model, lr=LR, n_active_layers=2, moments="8bit", backend="cpu",
                                param_groups=[{"params": "lm_head", "moments": head_moments}])

    model, opt = build("8bit")
    for t in range(3):
        opt.zero_grad()
        x = lm_batch(t)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    sd = opt.state_dict()
    _, opt2 = build("fp32")
    with caplog.at_level(logging.WARNING, logger="lisa_fused"):
        opt2.load_state_dict(sd)
    assert "moments='8bit'" in caplog.text and "moments='fp32'" in caplog.text
    head = opt2._names.index("lm_head.weight")
    got = opt2.state_dict()["state"][head]["exp_avg"]
    assert got.dtype == torch.float32 and got.shape == model.lm_head.weight.shape
    from lisa_fused.kernels import quant

    e = sd["state"][head]
    want = quant.dequantize(e["exp_avg"], e["exp_avg_scale"], "8bit", "exp_avg", got.numel())
    assert torch.equal(got.reshape(-1), want)


def test_state_dict_numbers_params_group_after_group():
    """torch's convention (and torch.distributed.checkpoint's): param ids count through the groups in
    order, so param_groups[k]["params"] in the state_dict are consecutive ranges."""
    model = tiny_llama(n_layers=4)
    opt = FusedLISA(model, n_active_layers=2, param_groups=[{"params": "lm_head"}, {"params": "*norm*"}])
    sd = opt.state_dict()
    flat = [i for g in sd["param_groups"] for i in g["params"]]
    assert flat == list(range(len(flat)))
    order = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in order] == [id(p) for p in opt._params]
    assert [n for n, _ in sd["lisa"]["params"]][len(sd["param_groups"][0]["params"])] == "lm_head.weight"


def test_small_tensor_rule_at_llama_2_7b_shape():
    """On the meta device (exact bytes): norms of 4096 elements are quantized (not fewer than 4096); with
    min_quantized_size=4097 they keep fp32 moments, 8 B per element, and memory_stats lists them."""
    from lisa_fused.plan.models import load_config, meta_model

    model = meta_model(load_config("llama-2-7b"), torch.bfloat16)
    a = FusedLISA(model, n_active_layers=2, moments="8bit")
    assert a.memory_stats()["small_tensor_numel"] == 0
    a.release()
    b = FusedLISA(model, n_active_layers=2, moments="8bit", min_quantized_size=4097)
    st = b.memory_stats()
    n_norms = 2 * 32 + 1
    assert st["small_tensor_numel"] == n_norms * 4096 and st["small_tensor_moment_bytes"] == 8 * n_norms * 4096
    b.release()


def test_grad_norm_meter_sums_every_launch_when_groups_split_a_partition():
    """Groups with other betas split a partition into several launches: the grad_norm sampler's sums of
    squares still reach each segment's slot of the meter."""
    model = tiny_llama(n_layers=4)
    opt = FusedLISA(model, n_active_layers=2, sampler="grad_norm", backend="cpu",
                    param_groups=[{"params": ["lm_head", "*norm*"], "betas": (0.5, 0.9)}])
    gen = torch.Generator().manual_seed(0)
    for p in opt._params:
        p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None
    opt.step()
    seg_params = [i for _, sp in opt._slots.segments() for i in sp]
    want = torch.stack([opt._params[i].grad.double().square().sum() for i in seg_params]).float()
    assert torch.allclose(opt._meter.sumsq, want, rtol=1e-5), (opt._meter.sumsq - want).abs().max()


@pytest.mark.parametrize("key,value,match", [("betas", (0.9, 1.5), "Invalid beta parameter at index 1: 1.5"),
                                             ("lr", -1e-3, "Invalid learning rate: -0.001"),
                                             ("weight_decay", float("nan"), "Invalid weight_decay value: nan")])
def test_an_invalid_hyperparameter_edited_in_place_raises_naming_the_group(key, value, match):
    model = tiny_llama(n_layers=4)
    opt = FusedLISA(model, lr=LR, n_active_layers=2, backend="cpu", param_groups=[{"params": "lm_head"}])
    x = lm_batch(0)
    model(input_ids=x, labels=x).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=r"opt.param_groups\[1\] \(edited in place\): " + match):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.param_groups[1][key] = good
    opt.step()
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])


def test_add_param_group_with_an_lr_scheduler_attached():
    """Schedulers add keys of their own to every group ("initial_lr"); add_param_group keeps them and
    trains the new params; a typo in the new group's keys is still refused, with nothing changed."""
    model = tiny_llama(n_layers=4)
    model.model.norm.weight.requires_grad_(False)
    opt = FusedLISA(model, lr=LR, n_active_layers=2, backend="cpu", param_groups=[{"params": "lm_head"}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    for t in range(2):
        opt.zero_grad()
        x = lm_batch(t)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"add_param_group \(the new opt.param_groups\[2\]\): unknown key 'learning_rate'"):
        opt.add_param_group({"params": [model.model.norm.weight], "learning_rate": 1e-3})
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["initial_lr"] == LR
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == [LR / 3, LR / 3]
    opt.add_param_group({"params": [model.model.norm.weight], "lr": 1e-3})
    assert [g["initial_lr"] for g in opt.param_groups[:2]] == [LR, LR]
    assert [g["lr"] for g in opt.param_groups] == lrs + [1e-3]
    before = model.model.norm.weight.detach().clone()
    opt.zero_grad()
    x = lm_batch(5)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()  # (the scheduler itself knows 2 groups: torch's LambdaLR refuses a third, for any optimizer)
    assert not torch.equal(model.model.norm.weight, before)
