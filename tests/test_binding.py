"""Parameters that move, change or get copied (issue 9, issue 28): FusedLISA follows a moved/converted model
(its own state moves; the params keep the storage the move gave them) or says why it cannot, steps exactly
the params torch's AdamW would, hands the model back (release), refuses to be copied, and resumes across
dtypes as documented in checkpoint.py."""
from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch

from lisa_fused import FusedLISA
from helpers import TOL, MLPStack, assert_close_rel, lm_batch, tiny_llama


def state_ptr(opt):
    return opt._packed_state.bufs[0].exp_avg.untyped_storage().data_ptr()


def own_storage(opt, model):
    """No param or grad shares storage with the optimizer's packed state (or with another param)."""
    state = {t.untyped_storage().data_ptr() for b in opt._packed_state.bufs for t in
             (b.master, b.exp_avg, b.exp_avg_sq) if t is not None}
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    grads = [p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None]
    return len(set(ptrs)) == len(ptrs) and not (set(ptrs) | set(grads)) & state


def masters_of(opt):
    """fp32 value the optimizer holds for every param: the master where it has one, else the param."""
    sd = opt.state_dict()
    out = []
    for i, p in enumerate(opt._params):
        e = sd["state"].get(i, {})
        out.append(e["master_param"].float() if "master_param" in e else p.detach().float().cpu())
    return out


def run_with_moves(model, opt, steps, moves, inputs_on=None):
    """Train `steps` LM steps; before step t apply moves[t](model). A reference fp32 AdamW over fp32 copies
    of the optimizer's values gets the same gradients (upcast), so it is what any dtype path must equal:
    fp32 masters are AdamW on the model's own gradients. Returns (reference params, AdamW)."""
    ref = [p.detach().float().clone().requires_grad_() for p in opt._params]
    ropt = torch.optim.AdamW(ref, lr=opt.param_groups[0]["lr"], weight_decay=opt.param_groups[0]["weight_decay"])
    for t in range(steps):
        if t in moves:
            was_fp32 = opt.param_dtype == torch.float32
            moves[t](model)
            if was_fp32 and model.lm_head.weight.dtype != torch.float32:
                # fp32 -> low precision: an fp32 param is its own master, the conversion rounded its only copy
                with torch.no_grad():
                    for r in ref:
                        r.copy_(r.to(model.lm_head.weight.dtype).float())
            opt.state_dict()  # (follows the move now: from a low-precision to an fp32 model params take their masters)
        opt.zero_grad()
        active = opt.active_layers
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        x = lm_batch(t).to(inputs_on or "cpu")
        model(input_ids=x, labels=x).loss.backward()
        for p, r in zip(opt._params, ref):
            r.grad = None if p.grad is None else p.grad.detach().to(r.device, torch.float32, copy=True)
        opt.step()
        ropt.step()
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p.detach().float(), frozen[n].float()), f"step {t}: frozen {n} changed"
        assert active, "no active layers"
    return ref, ropt


def assert_follows_reference(opt, ref, tol):
    for name, m, r in zip(opt._names, masters_of(opt), ref):
        assert_close_rel(m, r.cpu(), tol, f"fp32 value of {name}")
    for p, r in zip(opt._params, ref):
        assert_close_rel(p.cpu(), r.detach().cpu().to(p.dtype), TOL[p.dtype] if p.dtype != torch.float32 else tol,
                         "param")


MOVES = {
    "to_cpu0": (torch.float32, lambda m: m.to(torch.device("cpu", 0)), torch.float32),  # what the Trainer does
    "to_bf16": (torch.float32, lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "half": (torch.float32, lambda m: m.half(), torch.float16),
    "bf16_to_float": (torch.bfloat16, lambda m: m.float(), torch.float32),
    "bf16_to_fp16": (torch.bfloat16, lambda m: m.to(torch.float16), torch.float16),
}


@pytest.mark.parametrize("policy", ["host", "device"])
@pytest.mark.parametrize("case", list(MOVES))
def test_moved_model_keeps_training_like_adamw(case, policy):
    start, move, end = MOVES[case]
    model = tiny_llama(dtype=start)
    opt = FusedLISA(model, lr=3e-3, weight_decay=0.1, n_active_layers=2, switch_every=2, seed=1,
                    inactive_moments=policy, backend="torch")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_ptr = state_ptr(opt)
    # the move falls mid-interval, with blocks parked in the store; switches follow, blocks come back
    ref, _ = run_with_moves(model, opt, steps=9, moves={3: move})
    if end != start:
        assert state_ptr(opt) != old_ptr, "the optimizer did not rebuild its state for the converted params"
    else:  # (cpu:0 is the cpu: new param storage, nothing of the optimizer's to move)
        assert state_ptr(opt) == old_ptr, "the optimizer rebuilt its state for a move that needed none"
    assert opt.param_dtype == end and all(p.dtype == end for p in model.parameters())
    assert own_storage(opt, model)
    assert (opt.memory_stats()["master_bytes"] > 0) == (end != torch.float32)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), before[n].float())]
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert_follows_reference(opt, ref, TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_model_cuda_after_construction_follows(dtype):
    """FusedLISA built on the CPU, then model.cuda(): buffers, paged state (host store, now pinned) and
    masters move to the GPU; the fp32 values follow AdamW (run on the CPU, same gradients)."""
    model = tiny_llama(dtype=dtype)
    opt = FusedLISA(model, lr=3e-3, weight_decay=0.1, n_active_layers=2, switch_every=2, seed=1)
    ref, _ = run_with_moves(model, opt, steps=7, moves={3: lambda m: m.cuda()}, inputs_on="cuda")
    assert opt.device.type == "cuda" and opt._packed_state.bufs[0].exp_avg.is_cuda
    assert_follows_reference(opt, ref, 1e-5)


def fused_and_reference(weight_decay: float):
    """An MLPStack under FusedLISA (every block active, torch backend) and a copy under torch's AdamW
    with the same hyperparameters: (model, opt, ref, ref_opt)."""
    model = MLPStack()
    ref = copy.deepcopy(model)
    opt = FusedLISA(model, lr=1e-2, weight_decay=weight_decay, n_active_layers=5, backend="torch")
    return model, opt, ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=weight_decay)


def test_trainer_style_move_before_the_first_step_trains():
    """The HF Trainer's model.to(torch.device("cpu", 0)) right after the optimizer is built: the run equals
    torch AdamW on the moved model, bitwise (torch backend), and the trained params change."""
    model = MLPStack()
    ref = copy.deepcopy(model)
    opt = FusedLISA(model, lr=1e-2, weight_decay=0.1, n_active_layers=5, backend="torch")
    ref.to(torch.device("cpu", 0))
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    ptr = model.out.weight.data_ptr()
    model.to(torch.device("cpu", 0))
    assert model.out.weight.data_ptr() != ptr, "the move must give new storage, else this test proves nothing"
    before = model.out.weight.detach().clone()
    x = torch.randn(8, 3)
    for _ in range(4):
        for m, o in ((model, opt), (ref, ropt)):
            m.zero_grad()  # the Trainer zeroes through the model
            m(x).square().mean().backward()
            o.step()
    assert not torch.equal(model.out.weight, before)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


def test_move_between_backwards_keeps_accumulated_grads():
    """No zero_grad around the move: Module._apply converts the existing .grad along with the param, the
    next backward accumulates onto it, and step() takes the sum, as torch's AdamW does."""
    model, opt, ref, ropt = fused_and_reference(weight_decay=0.1)
    x = torch.randn(8, 3)
    for m, o in ((model, opt), (ref, ropt)):
        m(x).square().mean().backward()
        o.step()
        m.to(torch.device("cpu", 0))
        m(x).sin().mean().backward()  # onto the first backward's grads
        o.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(p.grad, q.grad), n
    assert own_storage(opt, model)


def test_conversion_seen_at_the_next_step_and_state_dict():
    """The optimizer's state follows a conversion at the next step() or state_dict(); its grads stay autograd's."""
    model = MLPStack()
    opt = FusedLISA(model, lr=1e-2, n_active_layers=5, backend="torch")
    model.to(torch.bfloat16)
    sd = opt.state_dict()
    assert opt.param_dtype == torch.bfloat16 and sd["lisa"]["param_dtype"] == "bfloat16"
    assert opt.memory_stats()["master_bytes"] >= 4 * sum(p.numel() for p in model.parameters())
    model(torch.randn(4, 3, dtype=torch.bfloat16)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert own_storage(opt, model)


@pytest.mark.parametrize("where", ["step", "state_dict"])
def test_move_that_cannot_be_followed_names_param_and_fix(where):
    model = MLPStack()
    opt = FusedLISA(model, n_active_layers=2, backend="torch")
    model.double()
    with pytest.raises(RuntimeError, match=r"'inp.weight' was converted to torch.float64.*model.float\(\)"):
        getattr(opt, where)()
    model.float()  # the fix named in the message: back to a supported dtype, and training goes on
    model(torch.randn(4, 3)).sum().backward()
    before = model.out.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.out.weight, before)


def test_partial_move_names_the_param():
    model = MLPStack()
    opt = FusedLISA(model, n_active_layers=2, backend="torch")
    model.out.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"'out.weight' is torch.bfloat16.*move the whole model"):
        opt.step()
    # only a parked block moved: refused before the switch that would bind it
    model = MLPStack()
    opt = FusedLISA(model, n_active_layers=1, switch_every=1, backend="torch")
    parked = next(b for b in range(5) if b not in opt.active_layers)
    model.blocks[parked].to(torch.float16)
    with pytest.raises(RuntimeError, match=rf"'blocks.{parked}.0.weight' is torch.float16"):
        opt.step()


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("write", ["copy_", "add_", "assign"])
def test_grads_written_by_hand_step_like_adamw(write):
    """Meta-learning/RL style loops: gradients that autograd did not write are stepped, exactly as by
    torch's AdamW (a param steps iff its .grad is not None)."""
    model, opt, ref, ropt = fused_and_reference(weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    for t in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m, o in ((model, opt), (ref, ropt)):
            if write == "assign" or t == 0:
                o.zero_grad(set_to_none=True)
                for p, gr in zip(m.parameters(), grads):
                    p.grad = gr.clone()
            else:
                o.zero_grad(set_to_none=False)
                for p, gr in zip(m.parameters(), grads):
                    getattr(p.grad, write)(gr)
            o.step()
    for p, q, b in zip(model.parameters(), ref.parameters(), before):
        assert not torch.equal(p, b)
        assert torch.equal(p, q)


def test_set_to_none_means_no_step_and_false_means_zero_grad_step():
    model, opt, ref, ropt = fused_and_reference(weight_decay=0.5)
    x = torch.randn(8, 3)
    for m, o in ((model, opt), (ref, ropt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
        o.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    after_one = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no grads: nothing steps, not even weight decay
    for p, q in zip(model.parameters(), after_one):
        assert torch.equal(p, q)
    for m, o in ((model, opt), (ref, ropt)):  # zero grads that exist: a real step (decay, moments)
        m(x).square().mean().backward()
        o.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        o.step()
    for p, q, b in zip(model.parameters(), ref.parameters(), after_one):
        assert torch.equal(p, q) and not torch.equal(p, b)


# ------------------------------------------------------------------------------- release, second optimizer
def test_second_optimizer_on_a_live_one_names_release():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice, kept through release
    opt = FusedLISA(model, n_active_layers=1)
    with pytest.raises(RuntimeError, match=r"another live FusedLISA.*release\(\)"):
        FusedLISA(model, n_active_layers=1)
    x = lm_batch(0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sd = opt.state_dict()
    trained = {n: (p.detach().clone(), p.untyped_storage().data_ptr()) for n, p in model.named_parameters()}
    opt.release()
    assert model.model.embed_tokens.weight.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" not in n)
    for n, p in model.named_parameters():  # values and storage as they were: release moves nothing
        assert torch.equal(p, trained[n][0]) and p.untyped_storage().data_ptr() == trained[n][1], n
    with pytest.raises(RuntimeError, match="released"):
        opt.step()
    # a new FusedLISA starts clean: same trainable params, and the state_dict of the first one loads
    opt2 = FusedLISA(model, n_active_layers=1)
    opt2.load_state_dict(sd)
    assert len(opt2._params) == len(opt._params)


def test_adamw_after_release_trains_every_param_in_its_own_storage():
    model = MLPStack()
    opt = FusedLISA(model, n_active_layers=2, backend="torch")
    opt.release()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    for p, b in zip(model.parameters(), before):
        assert p.grad is not None and not torch.equal(p, b)


def test_dropped_optimizer_hands_back_its_frozen_blocks():
    """A rebuilt optimizer (notebook cell run twice, a restarted training function): the first one's
    frozen blocks are not mistaken for the user's."""
    model = tiny_llama()
    n_params = len(list(model.parameters()))
    opt = FusedLISA(model, n_active_layers=1)
    del opt
    opt = FusedLISA(model, n_active_layers=1)
    assert len(opt._params) == n_params


# ---------------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle", "torch.save"])
def test_copies_are_refused_naming_state_dict(how):
    opt = FusedLISA(MLPStack(), n_active_layers=2)
    do = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": pickle.dumps,
          "torch.save": lambda o: torch.save(o, io.BytesIO())}[how]
    with pytest.raises(TypeError, match=r"(?i)save opt.state_dict\(\) instead"):
        do(opt)
    torch.save(opt.state_dict(), io.BytesIO())  # what to do instead works


# -------------------------------------------------------------------------------------- cross-dtype resume
def _train(model, opt, steps):
    for t in range(steps):
        opt.zero_grad()
        x = lm_batch(t)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()


def test_bf16_checkpoint_into_fp32_model_continues_from_masters(caplog):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = FusedLISA(model, lr=3e-3, n_active_layers=2, switch_every=2)
    _train(model, opt, 3)
    sd = opt.state_dict()
    masters = {i: e["master_param"] for i, e in sd["state"].items()}
    model32 = tiny_llama(seed=7)
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    opt32 = FusedLISA(model32, lr=3e-3, n_active_layers=2, switch_every=2)
    with caplog.at_level(logging.WARNING, logger="lisa_fused"):
        opt32.load_state_dict(sd)
    assert "bfloat16" in caplog.text and "float32" in caplog.text
    for i, m in masters.items():
        assert torch.equal(opt32._params[i].detach(), m), opt32._names[i]
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values()), "masters carry fp32 bits"
    _train(model32, opt32, 2)


def test_fp32_checkpoint_into_bf16_model_starts_masters_from_params(caplog):
    model = tiny_llama()
    opt = FusedLISA(model, lr=3e-3, n_active_layers=2, switch_every=2)
    _train(model, opt, 3)
    sd = opt.state_dict()
    model16 = tiny_llama(seed=7, dtype=torch.bfloat16)
    model16.load_state_dict(model.state_dict())
    opt16 = FusedLISA(model16, lr=3e-3, n_active_layers=2, switch_every=2)
    with caplog.at_level(logging.WARNING, logger="lisa_fused"):
        opt16.load_state_dict(sd)
    assert "float32" in caplog.text and "bfloat16" in caplog.text
    sd16 = opt16.state_dict()
    for i, e in sd16["state"].items():
        assert torch.equal(e["master_param"], opt16._params[i].detach().float()), opt16._names[i]
        assert torch.equal(e["exp_avg"], sd["state"][i]["exp_avg"])
    before = {n: p.detach().clone() for n, p in model16.named_parameters()}
    _train(model16, opt16, 2)
    assert not torch.equal(model16.lm_head.weight, before["lm_head.weight"])


# --------------------------------------------------------------------------------------------- CUDA graphs
def test_step_refused_under_cuda_graph_capture(monkeypatch):
    model = MLPStack()
    opt = FusedLISA(model, n_active_layers=5, backend="torch")
    model(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph"):
        opt.step()
    monkeypatch.undo()
    assert opt._global_step == 0 and opt._steps == [0] * len(opt._params)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
