"""The adaptive samplers wired into FusedLISA (issue 13): grad norms out of the fused kernel's pass on
every backend, draws that follow them, losses from observe_loss / step(closure) / LISACallback,
sampler_options validated at the constructor, and a bitwise resume in the middle of an interval.

The samplers' own math is tested in tests/test_sampling.py; the two-rank agreement in
tests/test_integration_distributed.py.
"""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch

from helpers import MLPStack
from lisa_fused import FusedLISA
from lisa_fused.kernels import triton_interpreted

N_LAYERS, WIDTH = 8, 9
HEAVY = (2, 5)  # blocks whose hand-written gradients are 10x larger

GPU = torch.cuda.is_available()
# (backend, device): the kernels that fill grad_sumsq where they can run here
BACKENDS = [("torch", "cuda" if GPU else "cpu"), ("cpu", "cpu"),
            pytest.param("triton", "cuda" if GPU else "cpu", marks=pytest.mark.skipif(
                not GPU and not triton_interpreted(), reason="Triton needs a GPU or TRITON_INTERPRET=1")),
            pytest.param("cuda", "cuda", marks=pytest.mark.gpu)]


def hand_grads(model, opt, gen):
    """Gradients for the trainable params: N(0, 1), times 10 in the HEAVY blocks. Returns
    {block: [||g_p||^2 per param]} of the active blocks."""
    sq = {}
    for _, p in opt.model_layout.always:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)
    for b in opt.active_layers:
        scale = 10.0 if b in HEAVY else 1.0
        sq[b] = []
        for p in model.blocks[b].parameters():
            g = torch.randn(p.shape, generator=gen) * scale
            p.grad = g.to(p.device)
            sq[b].append(float(g.double().pow(2).sum()))
    return sq


def block_params(model):
    return [[p.detach().clone() for p in blk.parameters()] for blk in model.blocks]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernel_grad_sumsq_feeds_the_grad_norm_scores(backend, device):
    """Each interval's scores are the EMA of m_b = mean over params of sqrt(sum_t ||g_t||^2 / n), the sums
    of squares coming from the fused kernel (any backend); active params change, frozen ones do not."""
    model = MLPStack(WIDTH, N_LAYERS).to(device)
    opt = FusedLISA(model, lr=1e-3, n_active_layers=2, switch_every=3, sampler="grad_norm", backend=backend,
                    sampler_options={"ema_decay": 0.0, "stale_decay": 0.0})
    gen = torch.Generator().manual_seed(0)
    want = [None] * N_LAYERS
    for _ in range(3 if backend == "triton" and not GPU else 6):  # intervals
        acc = {}
        for _ in range(3):
            before = block_params(model)
            for b, sq in hand_grads(model, opt, gen).items():
                acc[b] = [a + s for a, s in zip(acc.get(b, [0.0] * len(sq)), sq)]
            active = opt.active_layers
            opt.step()
            after = block_params(model)
            for b in range(N_LAYERS):
                moved = [not torch.equal(x, y) for x, y in zip(before[b], after[b])]
                assert all(moved) if b in active else not any(moved), (b, active, moved)
            opt.zero_grad()
        for b, s in acc.items():
            want[b] = sum(math.sqrt(v / 3) for v in s) / len(s)
        got = opt._sampler.scores
        for b in range(N_LAYERS):
            assert (got[b] is None) == (want[b] is None)
            if want[b] is not None:
                assert math.isclose(got[b], want[b], rel_tol=1e-5), (b, got[b], want[b])


def draw_sequence(seed, sampler="grad_norm", steps=240, **kw):
    model = MLPStack(WIDTH, N_LAYERS)
    opt = FusedLISA(model, lr=1e-3, n_active_layers=2, switch_every=2, seed=seed, sampler=sampler, backend="cpu", **kw)
    gen = torch.Generator().manual_seed(1)
    seq = []
    for _ in range(steps):
        seq.append(opt.active_layers)
        hand_grads(model, opt, gen)
        opt.step()
        opt.zero_grad()
    return seq, opt


def test_grad_norm_draws_large_gradient_blocks_more_often():
    """Blocks with 10x gradients: p ~ 0.36 each vs ~0.05 for the others (floor 0.1/N): drawn far more
    often, every block still drawn, the same sequence for the same seed, another for another seed."""
    seq, opt = draw_sequence(seed=3)
    intervals = seq[::2]
    counts = [sum(b in s for s in intervals) for b in range(N_LAYERS)]
    heavy = sum(counts[b] for b in HEAVY) / len(HEAVY)
    light = sum(c for b, c in enumerate(counts) if b not in HEAVY) / (N_LAYERS - len(HEAVY))
    assert heavy > 3 * light, counts
    assert all(c > 0 for c in counts), counts
    p = opt.sampler_probabilities()
    assert math.isclose(sum(p), 1.0) and min(p[b] for b in HEAVY) > 3 * max(p[b] for b in range(N_LAYERS) if b not in HEAVY)
    assert "grad_norm(" in repr(opt) and "p=[" in repr(opt)
    assert draw_sequence(seed=3)[0] == seq
    assert draw_sequence(seed=4)[0] != seq
    uniform, _ = draw_sequence(seed=3, sampler="uniform")
    counts_u = [sum(b in s for s in uniform[::2]) for b in range(N_LAYERS)]
    assert max(counts_u) < 2 * min(counts_u), counts_u  # the same gradients do not sway uniform


def test_uniform_draws_unchanged_by_the_sampler_objects():
    """The paper's sampler draws exactly what it drew before the adaptive ones: randperm on the generator."""
    seq, _ = draw_sequence(seed=11, sampler="uniform", steps=20)
    g = torch.Generator().manual_seed(11)
    want = [tuple(sorted(torch.randperm(N_LAYERS, generator=g)[:2].tolist())) for _ in range(10)]
    assert seq[::2] == want


def train_lm(model, opt, data, use_closure=False):
    """MSE regression steps; losses go to the sampler through observe_loss or step(closure)."""
    seq = []
    for x, y in data:
        seq.append(opt.active_layers)
        if use_closure:
            def closure():
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        else:
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.observe_loss(loss)
            opt.step()
        opt.zero_grad()
    return seq


def regression_data(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def outlier_model():
    """Blocks 1, 6, 3, 4 have 6, 3, 2, 1 entries far above their mean |w|: the outlier ratios differ."""
    model = MLPStack(WIDTH, N_LAYERS)
    with torch.no_grad():
        for b, k in ((1, 6), (6, 3), (3, 2), (4, 1)):
            model.blocks[b][0].weight.view(-1)[:k] = 3.0
    return model


@pytest.mark.parametrize("sampler", ["grad_norm", "outlier", "loss_feedback"])
def test_resume_mid_interval_is_bitwise(sampler):
    """Save after 7 steps (switch_every=3: inside an interval), load into a fresh model and optimizer with
    another seed (through torch.save / weights_only load): the active sets, the params and the sampler's
    state equal the uninterrupted run's bit for bit."""
    data = regression_data(16)
    kw = dict(lr=1e-2, n_active_layers=2, switch_every=3, sampler=sampler, backend="cpu")
    model = outlier_model()
    opt = FusedLISA(model, seed=0, **kw)
    before = block_params(model)
    seq = train_lm(model, opt, data)

    model_a = outlier_model()
    opt_a = FusedLISA(model_a, seed=0, **kw)
    seq_b = train_lm(model_a, opt_a, data[:7])
    buf = io.BytesIO()
    torch.save((model_a.state_dict(), opt_a.state_dict()), buf)
    buf.seek(0)
    msd, osd = torch.load(buf, weights_only=True)
    model_b = MLPStack(WIDTH, N_LAYERS, seed=9)
    model_b.load_state_dict(msd)
    opt_b = FusedLISA(model_b, seed=123, **kw)
    opt_b.load_state_dict(osd)
    assert opt_b.state_dict()["lisa"]["sampler"] == osd["lisa"]["sampler"]
    seq_b += train_lm(model_b, opt_b, data[7:])

    assert seq_b == seq and len(set(seq[6:])) >= 2, seq  # the resumed part draws a new set
    for x, y in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(x, y)
    assert opt_b.state_dict()["lisa"]["sampler"] == opt.state_dict()["lisa"]["sampler"]
    ever = set().union(*map(set, seq))
    after = block_params(model)
    for b in range(N_LAYERS):
        moved = any(not torch.equal(x, y) for x, y in zip(before[b], after[b]))
        assert moved == (b in ever), (b, sorted(ever))
    if sampler == "grad_norm":
        assert osd["lisa"]["grad_meter"]["n_steps"] == 1  # one step into the interval
    if sampler == "outlier":
        p = opt.sampler_probabilities()
        assert p[1] > p[6] > p[0], p  # 6 outliers vs 3 vs none


def test_step_closure_feeds_the_loss_like_observe_loss():
    data = regression_data(12)
    states = []
    for use_closure in (False, True):
        model = MLPStack(WIDTH, N_LAYERS)
        opt = FusedLISA(model, lr=1e-2, n_active_layers=2, switch_every=3, sampler="loss_feedback", backend="cpu")
        seq = train_lm(model, opt, data, use_closure)
        states.append((seq, opt.state_dict()["lisa"]["sampler"], [p.detach().clone() for p in model.parameters()]))
    assert states[0][0] == states[1][0] and states[0][1] == states[1][1]
    assert states[0][1]["intervals"] >= 3 and any(s != 0 for s in states[0][1]["scores"])
    assert all(torch.equal(a, b) for a, b in zip(states[0][2], states[1][2]))


@pytest.mark.parametrize("sampler,options,err,match", [
    ("grad_norm", {"temperature": 0}, ValueError, r"temperature=0"),
    ("grad_norm", {"floor": 0.5}, ValueError, r"floor=0.5.*\[0, 0.125\]"),
    ("outlier", {"score_lr": 1.0}, ValueError, r"\['score_lr'\] do not apply to sampler 'outlier'"),
    ("uniform", {"temperature": 2.0}, ValueError, r"do not apply to sampler 'uniform'"),
    ("loss_feedback", {"speed": 1}, ValueError, r"Unknown sampler_options \['speed'\]"),
    ("grad_norm", [("floor", 0.1)], TypeError, r"sampler_options must be a dict"),
    ("gradnorm", None, ValueError, r"Invalid sampler: 'gradnorm'.*grad_norm"),
])
def test_bad_sampler_options_raise_before_anything_changes(sampler, options, err, match):
    model = MLPStack(WIDTH, N_LAYERS)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(err, match=match):
        FusedLISA(model, n_active_layers=2, sampler=sampler, sampler_options=options)
    assert [p.requires_grad for p in model.parameters()] == flags
    FusedLISA(model, n_active_layers=2)  # the model is free for a new optimizer


def test_observe_loss_validation_and_state_dict_sampler_mismatch():
    model = MLPStack(WIDTH, N_LAYERS)
    opt = FusedLISA(model, n_active_layers=2, sampler="loss_feedback")
    with pytest.raises(ValueError, match=r"scalar loss.*\(2,\)"):
        opt.observe_loss(torch.ones(2))
    with pytest.raises(TypeError, match="got str"):
        opt.observe_loss("0.5")
    sd = opt.state_dict()
    opt.release()
    other = FusedLISA(model, n_active_layers=2, sampler="grad_norm")
    active = other.active_layers
    with pytest.raises(ValueError, match=r"saved with sampler='loss_feedback'.*uses 'grad_norm'"):
        other.load_state_dict(sd)
    assert other.active_layers == active


def test_lisa_callback_feeds_logged_losses_within_an_interval_and_logs_probabilities():
    """on_log hands the Trainer's "loss" to the optimizer unless the logged steps straddle a switch (that
    loss belongs to the interval already closed), and adds the probabilities to the logs."""
    pytest.importorskip("transformers")
    from lisa_fused.hf import LISACallback

    model = MLPStack(WIDTH, N_LAYERS)
    opt = FusedLISA(model, lr=1e-2, n_active_layers=2, switch_every=4, sampler="loss_feedback", backend="cpu")
    cb = LISACallback(opt)
    state = SimpleNamespace(log_history=[], global_step=0)
    args = SimpleNamespace(logging_steps=1, learning_rate=1e-2, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8)  # (the callback hands TrainingArguments' AdamW values on: the same)
    cb.on_train_begin(args, state, None)
    fed = []
    opt._sampler.observe_loss = lambda loss, active: fed.append((opt._global_step, loss))
    for x, y in regression_data(9):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        logs = {"loss": 1.0 / state.global_step, "step": state.global_step}
        state.log_history.append(dict(logs))
        cb.on_log(args, state, None, logs=logs)
        assert logs["lisa_sampler_probabilities"] == pytest.approx(opt.sampler_probabilities())
        assert state.log_history[-1]["lisa_sampler_probabilities"] == logs["lisa_sampler_probabilities"]
    assert [s for s, _ in fed] == [1, 2, 3, 5, 6, 7, 9]  # steps 4 and 8 switched: their loss is not fed


def test_meter_state_loads_into_another_slot_order():
    """A resumed optimizer may hold the same blocks in other slots: the saved sums are matched block by
    block (each block's params in their order), and a meter over other blocks is refused."""
    from lisa_fused.sampling import GradNormMeter

    saved = GradNormMeter([None, 3, 3, 1, 1])
    saved.add(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    meter = GradNormMeter([None, 1, 1, 3, 3])
    meter.load_state_dict(saved.state_dict())
    assert meter.sumsq.tolist() == [1.0, 4.0, 5.0, 2.0, 3.0] and meter.n_steps == 1
    assert meter.read([1, 3]) == saved.read([1, 3])
    with pytest.raises(ValueError, match=r"state is for segments \[None, 3, 3, 1, 1\]"):
        GradNormMeter([None, 1, 1, 2, 2]).load_state_dict(saved.state_dict())
