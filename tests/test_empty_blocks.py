"""Blocks without a trainable parameter (issue 30, item 1): peft LoRA with `layers_to_transform` (with and
without `modules_to_save`) and blocks the user froze are never drawn, by every sampler; fewer trainable
blocks than n_active_layers all train; runs equal torch.optim.AdamW with the same freezing; a resume
mid-interval is bitwise. (Rank consistency: tests/test_integration_distributed.py.)"""
from __future__ import annotations

import logging

import pytest
import torch

from lisa_fused import FusedLISA
from lisa_fused.layers import find_layout
from helpers import MLPStack, lm_batch, tiny_llama

LR, WD = 1e-2, 0.01
SAMPLERS = ["uniform", "weight_norm", "grad_norm", "outlier", "loss_feedback", "callable"]


def pick_first_free(n, k, g):
    """A callable sampler: k blocks from range(n) (n is the number of drawable blocks)."""
    pick_first_free.calls.append(n)
    return torch.randperm(n, generator=g)[:k].tolist()


pick_first_free.calls = []


def sampler_arg(name):
    return pick_first_free if name == "callable" else name


def peft_llama(layers, modules_to_save, seed=0):
    peft = pytest.importorskip("peft")
    model = tiny_llama(4, seed=seed)
    torch.manual_seed(seed + 1)  # LoRA's A matrices: the same in the model and its reference copy
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=list(layers),
                          modules_to_save=modules_to_save)
    return peft.get_peft_model(model, cfg)


def frozen_mlp(frozen=(1, 4), n_layers=6, seed=0):
    model = MLPStack(n_layers=n_layers, seed=seed)
    for b in frozen:
        model.blocks[b].requires_grad_(False)
    return model


MODELS = {  # id -> (factory, trainable blocks)
    "peft_layers_to_transform+modules_to_save": (lambda: peft_llama([0, 2, 3], ["lm_head"]), (0, 2, 3)),
    "peft_layers_to_transform": (lambda: peft_llama([0, 1, 3], None), (0, 1, 3)),
    "user_froze_blocks": (lambda: frozen_mlp(), (0, 2, 3, 5)),
}


def loss_of(model, t):
    if isinstance(model, MLPStack):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        return torch.nn.functional.mse_loss(model(x), y)
    x = lm_batch(t)
    return model(input_ids=x, labels=x).loss


def train(model, opt, steps, start=0):
    """Steps [start, start + steps); the active set before each step."""
    seq = []
    for t in range(start, start + steps):
        seq.append(opt.active_layers)
        loss = loss_of(model, t)
        loss.backward()
        opt.observe_loss(loss.detach())
        opt.step()
        opt.zero_grad()
    return seq


def adamw_reference(model, seq, layout=None):
    """torch.optim.AdamW over the params trainable at the start, each step's blocks frozen as in `seq`."""
    layout = layout or find_layout(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    for t, active in enumerate(seq):
        for b, blk in enumerate(layout.blocks):
            for _, p in blk:
                p.requires_grad_(b in active)
        loss_of(model, t).backward()
        opt.step()
        opt.zero_grad()
    return model


def make(model, sampler, **kw):
    kw = dict(lr=LR, weight_decay=WD, n_active_layers=2, switch_every=2, seed=5, backend="torch") | kw
    return FusedLISA(model, sampler=sampler_arg(sampler), **kw)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers helper
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_blocks_without_a_trainable_param_are_never_drawn_and_the_run_is_adamws(kind, sampler, caplog):
    """Before: the uniform sampler drew blocks with nothing to train (with modules_to_save 4 of 12 intervals
    trained no block at all; without it loss.backward() failed: "element 0 of tensors does not require grad")."""
    factory, trainable = MODELS[kind]
    model, ref = factory(), factory()
    layout = find_layout(ref)  # (before the reference flips requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pick_first_free.calls.clear()
    with caplog.at_level(logging.INFO, logger="lisa_fused"):
        opt = make(model, sampler)
    n_blocks = len(find_layout(model).blocks)
    empty = [b for b in range(n_blocks) if b not in trainable]
    assert f"never drawn: {empty}" in caplog.text and f"pick among blocks {list(trainable)}" in caplog.text
    seq = train(model, opt, 10)
    assert all(len(a) == 2 and set(a) <= set(trainable) for a in seq), seq
    assert len(set(seq)) > 1, f"the run must span different draws: {seq}"
    if sampler == "callable":
        assert pick_first_free.calls and set(pick_first_free.calls) == {len(trainable)}
    else:
        probs = opt.sampler_probabilities()
        assert all(probs[b] == 0.0 for b in empty) and abs(sum(probs) - 1) < 1e-9, probs
    adamw_reference(ref, seq, layout)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), f"{n} differs from torch AdamW with the same freezing"
    ever = {b for a in seq for b in a}
    in_block = {n: b for b, blk in enumerate(layout.blocks) for n, _ in blk}
    trained = {n for n, _ in layout.always} | {n for n, b in in_block.items() if b in ever}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trained), f"{n}: {'unchanged' if n in trained else 'changed'}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resume_mid_interval_with_frozen_blocks_is_bitwise(sampler):
    model = frozen_mlp()
    opt = make(model, sampler, switch_every=3)
    seq = train(model, opt, 5)
    sd, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    seq += train(model, opt, 7, start=5)

    fresh = frozen_mlp(seed=9)
    fresh.load_state_dict(weights)
    opt2 = make(fresh, sampler, switch_every=3, seed=77)
    opt2.load_state_dict(sd)
    assert train(fresh, opt2, 7, start=5) == seq[5:]
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    assert all(not {1, 4} & set(a) for a in seq)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fewer_trainable_blocks_than_n_active_all_train_and_it_is_said_once(caplog):
    """peft layers_to_transform=[0, 1] (the issue's case) with n_active_layers=2, and 2 trainable blocks
    with n_active_layers=3: every trainable block trains at every step (no draw), one WARNING."""
    for factory, n_active, want in ((lambda: peft_llama([0, 1], ["lm_head"]), 2, (0, 1)),
                                    (lambda: peft_llama([0, 1], None), 3, (0, 1)),
                                    (lambda: frozen_mlp(frozen=(0, 1, 2), n_layers=5), 3, (3, 4))):
        model, ref = factory(), factory()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lisa_fused"):
            opt = make(model, "uniform", n_active_layers=n_active, switch_every=1)
            gen = opt._generator.get_state()
            seq = train(model, opt, 5)
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and f"no more than n_active_layers={n_active}: all of them train" in warned[0].message
        assert seq == [want] * 5 and torch.equal(opt._generator.get_state(), gen)  # no draw
        adamw_reference(ref, seq)
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.equal(p, q), n


def test_no_trainable_block_at_all_trains_the_rest_like_adamw():
    model, ref = frozen_mlp(frozen=range(4), n_layers=4), frozen_mlp(frozen=range(4), n_layers=4)
    opt = make(model, "grad_norm", switch_every=1)
    seq = train(model, opt, 4)
    assert seq == [()] * 4 and opt.sampler_probabilities() == [0.0] * 4
    adamw_reference(ref, seq)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(model.inp.weight, frozen_mlp(frozen=(), n_layers=4).inp.weight)


def test_a_state_dict_whose_active_set_holds_an_empty_block_is_refused_and_changes_nothing():
    """A checkpoint of a run that drew a block with nothing to train (written before this fix), or of a
    run with other frozen blocks: ValueError naming the blocks and the fix, before anything changes."""
    model = frozen_mlp()
    opt = make(model, "grad_norm", switch_every=3)
    train(model, opt, 4)
    sd = opt.state_dict()
    before = opt.state_dict()
    bad = dict(sd, lisa=dict(sd["lisa"], active_layers=[0, 4]))
    with pytest.raises(ValueError, match=r"active_layers \[0, 4\] include blocks \[4\], which have no trainable "
                                         r"parameter.*trainable blocks: \[0, 2, 3, 5\].*same peft config"):
        opt.load_state_dict(bad)
    assert same(opt.state_dict(), before) and opt.active_layers == tuple(before["lisa"]["active_layers"])


def same(a, b) -> bool:
    """Nested state_dict equality (tensors bitwise)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b
