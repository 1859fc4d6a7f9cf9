"""Samplers in isolation (lisa_fused/sampling/): the existing rules draw as before, the adaptive ones
learn what they claim (checked statistically or against hand-computed values), options are validated,
state round-trips, and under torch.distributed every rank ends up with rank 0's state."""
from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from lisa_fused import sampling as S
from lisa_fused.layers import find_layout
from helpers import MLPStack


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- the existing samplers are unchanged ------------------------------------------------------------------


def test_uniform_sampler_draws_exactly_like_uniform():
    for seed in range(3):
        g1, g2 = gen(seed), gen(seed)
        sampler = S.UniformSampler(7)
        for _ in range(25):
            assert sampler(7, 3, g1) == tuple(sorted(S.uniform(7, 3, g2)))
    assert S.UniformSampler(4).probabilities() == [0.25] * 4


def test_weight_norm_sampler_draws_exactly_like_weight_norm_sampler():
    norms = [1.0, 5.0, 0.5, 2.0, 3.0, 0.0]
    calls = iter(range(1000))

    def norms_fn():  # changes every call, as live weights do
        k = next(calls) // 2  # each draw reads once per implementation
        return [n * (1 + 0.1 * ((k + i) % 3)) for i, n in enumerate(norms)]

    old, new = S.weight_norm_sampler(norms_fn), S.WeightNormSampler(6, norms_fn)
    g1, g2 = gen(5), gen(5)
    for _ in range(25):
        assert tuple(sorted(old(6, 2, g1))) == new(6, 2, g2)
    assert new.probabilities()[5] == 0.0
    zero = S.WeightNormSampler(3, lambda: [0.0, 0.0, 0.0])
    assert sorted(zero(3, 3, gen())) == [0, 1, 2]


def test_callable_adapter_checks_answers():
    s = S.CallableSampler(6, lambda n, k, g: [4, 1])
    assert s(6, 2, gen()) == (1, 4) and s.probabilities() is None and "callable" in s.describe()
    with pytest.raises(ValueError, match=r"sampler returned \[1, 1\]"):
        S.CallableSampler(6, lambda n, k, g: [1, 1])(6, 2, gen())


# -- grad_norm ---------------------------------------------------------------------------------------------


def test_meter_reads_mean_over_params_of_rms_grad_norm():
    meter = S.GradNormMeter([None, 0, 0, 3])
    meter.add(torch.tensor([100.0, 9.0, 16.0, 4.0]))
    meter.add(torch.tensor([100.0, 16.0, 9.0, 0.0]))
    blocks, vals = meter.read([3, 0, 5])
    # block 0: params with sum of squares 25 and 25 over 2 steps -> sqrt(12.5) each; block 3: sqrt(4/2)
    assert blocks == [3, 0, 5]
    assert vals == pytest.approx([math.sqrt(2.0), math.sqrt(12.5), 0.0])
    with pytest.raises(ValueError, match="float32 of shape"):
        meter.add(torch.zeros(3))
    meter.reset([1, None])
    assert meter.read([1]) == ([], [])


def test_grad_norm_scores_follow_ema_prior_and_stale_decay():
    s = S.GradNormSampler(4, S.SamplerOptions(ema_decay=0.5, stale_decay=0.5, floor=0.0))
    assert s.probabilities() == [0.25] * 4  # nothing measured: uniform
    s.observe_grad_norms([], [])  # an interval without steps changes nothing
    with pytest.raises(ValueError, match=r"norms \[1.0\] must be 2 finite values"):
        s.observe_grad_norms([0, 1], [1.0])
    s.observe_grad_norms([0, 1], [2.0, 4.0])
    assert s.scores == [2.0, 4.0, None, None]
    assert s.effective_scores() == [2.0, 4.0, 4.0, 4.0]  # optimistic prior: the best seen score
    assert s.probabilities() == pytest.approx([2 / 14, 4 / 14, 4 / 14, 4 / 14])
    s.observe_grad_norms([1, 2], [8.0, 1.0])
    # block 1: 0.5*4 + 0.5*8 = 6; block 2 first seen: 1; block 0 (stale) moves half way to mean(2, 6, 1) = 3
    assert s.scores == pytest.approx([2.5, 6.0, 1.0, None])
    assert s.effective_scores()[3] == 6.0
    t = S.GradNormSampler(4, S.SamplerOptions(temperature=0.5, prior=1.0, floor=0.05))
    t.observe_grad_norms([0], [2.0])
    q = torch.tensor([4.0, 1.0, 1.0, 1.0]) / 7  # scores^(1/0.5)
    assert t.probabilities() == pytest.approx((0.05 + 0.8 * q).tolist())


def _grad_norm_run(seed, intervals=150, n=8, k=2, heavy=(2, 5)):
    """Blocks in `heavy` have 10x larger gradients; two params per block plus one always-trained."""
    sampler = S.GradNormSampler(n)
    g, noise = gen(seed), torch.Generator().manual_seed(1000 + seed)
    active = sampler(n, k, g)
    seq = [active]
    for _ in range(intervals):
        seg = [None] + [b for b in active for _ in range(2)]
        meter = S.GradNormMeter(seg)
        for _ in range(4):
            scale = torch.tensor([1.0] + [10.0 if b in heavy else 1.0 for b in seg[1:]])
            g_norm = scale * (1 + 0.2 * torch.rand(len(seg), generator=noise))
            meter.add(g_norm.square())
        sampler.observe_grad_norms(*meter.read(active))
        active = sampler(n, k, g)
        seq.append(active)
    return seq, sampler


def test_grad_norm_draws_large_gradient_blocks_more_often_and_every_block():
    seq, sampler = _grad_norm_run(seed=0)
    counts = [sum(b in s for s in seq) for b in range(8)]
    light = [c for b, c in enumerate(counts) if b not in (2, 5)]
    assert min(counts) >= 1, counts  # the floor keeps every block in play
    assert min(counts[2], counts[5]) > 2 * max(light), counts  # uniform: all about equal
    p = sampler.probabilities()
    assert min(p) >= 0.1 / 8 - 1e-12 and abs(sum(p) - 1) < 1e-12
    assert p[2] > 3 * p[0] and "grad_norm(" in sampler.describe()
    assert _grad_norm_run(seed=0)[0] == seq  # fixed seed: reproducible
    assert _grad_norm_run(seed=1)[0] != seq


# -- outlier -----------------------------------------------------------------------------------------------


def test_outlier_ratio_against_hand_computed():
    w1 = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 30.0]])  # |w|: five 1s and a 30
    w2 = torch.tensor([[1.0, 1.0], [-1.0, -9.0]])
    bias = torch.tensor([1000.0])  # 1-D: not a projection weight, ignored
    # pooled over the 10 entries of w1 and w2: mean |w| = (5 + 30 + 3 + 9) / 10 = 4.7
    blocks = [[("a.w1", w1), ("a.bias", bias), ("a.w2", w2)], [("b.bias", bias)], [("c.w", torch.ones(3, 3))]]
    # M = 1.5: threshold 7.05 -> 30 and 9 are outliers (2 of 10); M = 5: threshold 23.5 -> only 30
    assert S.block_outlier_ratios(blocks, 1.5) == [0.2, 0.0, 0.0]
    assert S.block_outlier_ratios(blocks, 5.0) == [0.1, 0.0, 0.0]
    bf = [[(n, p.bfloat16()) for n, p in blocks[0]]]
    assert S.block_outlier_ratios(bf, 1.5) == [0.2]
    with pytest.raises(ValueError, match="multiplier M=0"):
        S.block_outlier_ratios(blocks, 0)


def test_outlier_sampler_follows_live_weights():
    model = MLPStack(width=16, n_layers=4)
    layout = find_layout(model)
    sampler = S.build_sampler("outlier", layout, {"outlier_multiplier": 3.0})
    sampler(4, 1, gen())
    base = sampler.probabilities()
    assert min(base) >= 0.1 / 4 - 1e-12
    with torch.no_grad():  # a few huge entries in block 1
        model.blocks[1][0].weight[0, :8] = 50.0
    sampler(4, 1, gen())
    p = sampler.probabilities()
    assert p[1] == max(p) and p[1] > base[1] and sampler.ratios[1] > 0


# -- loss_feedback -----------------------------------------------------------------------------------------


def test_loss_feedback_update_on_scripted_losses():
    opts = dict(loss_smoothing=0.0, ema_decay=0.5, score_lr=0.5, floor=0.05)
    s = S.build_sampler("loss_feedback", find_layout(MLPStack(width=4, n_layers=3)), opts)
    g = gen()

    def interval(block, losses):
        for x in losses:
            s.observe_loss(x, [block])
        s(3, 1, g)  # the switch closes the interval

    interval(0, [10.0, 9.0, 8.0])  # R = (10 - 8) / 2 = 1; first interval: no advantage yet
    assert s.scores == [0.0, 0.0, 0.0] and s.baseline == 1.0
    interval(1, [5.0, 2.0])        # R = (8 - 2) / 2 = 3; a = 2, c = 2: block 1 += 0.5, then centred
    assert s.scores == pytest.approx([-1 / 6, 1 / 3, -1 / 6]) and s.baseline == 2.0
    interval(2, [torch.tensor(2.0), torch.tensor([2.0])])  # R = 0; a = -2, c = 2: block 2 -= 0.5
    assert s.scores == pytest.approx([0.0, 0.5, -0.5]) and s.baseline == 1.0
    q = torch.softmax(torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64), 0)
    assert s.probabilities() == pytest.approx((0.05 + 0.85 * q).tolist())
    with pytest.raises(ValueError, match="changed within an interval"):
        s.observe_loss(1.0, [0])
        s.observe_loss(1.0, [1])


def test_loss_feedback_favours_the_block_active_during_fast_descent(caplog):
    s = S.LossFeedbackSampler(4, S.SamplerOptions(loss_smoothing=0.5))
    g, loss = gen(), 10.0
    for k in range(24):
        block = k % 4
        for _ in range(8):
            loss -= 0.5 if block == 3 else 0.05
            s.observe_loss(loss, [block])
        s(4, 1, g)
    p = s.probabilities()
    assert p[3] == max(p) and p[3] > 2 * max(p[:3]), p
    with caplog.at_level(logging.WARNING, logger="lisa_fused"):
        s.observe_loss(float("nan"), [0])
        s(4, 1, g)
    assert "non-finite" in caplog.text and "without a finite loss" in caplog.text
    with pytest.raises(ValueError, match="scalar loss"):
        s.observe_loss(torch.ones(2), [0])


def test_loss_feedback_tensor_losses_match_floats_and_memory_is_bounded():
    a, b = S.LossFeedbackSampler(3), S.LossFeedbackSampler(3)
    g1, g2 = gen(), gen()
    for k in range(4):
        for step in range(300):  # more than one fold per interval
            x = 5.0 - 0.01 * step * (k + 1)
            a.observe_loss(x, [k % 3])
            b.observe_loss(torch.tensor(x, dtype=torch.float64), [k % 3])  # fp32 would round x
        assert len(b._pending) < S.LossFeedbackSampler._FOLD_EVERY
        assert a(3, 1, g1) == b(3, 1, g2)
    assert a.state_dict() == b.state_dict() and a.intervals == 4 and a.scores != [0.0] * 3


# -- options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, options, err, match", [
    ("grad_norm", {"temperature": 0}, ValueError, r"temperature=0: must be > 0"),
    ("grad_norm", {"temperature": float("inf")}, ValueError, r"temperature=inf"),
    ("grad_norm", {"floor": -0.1}, ValueError, r"floor=-0.1: must be in \[0, 1/N\]"),
    ("grad_norm", {"floor": 0.3}, ValueError, r"floor=0.3: must be in \[0, 1/N\] = \[0, 0.25\] for N=4"),
    ("grad_norm", {"ema_decay": 1.0}, ValueError, r"ema_decay=1.0: must be in \[0, 1\)"),
    ("grad_norm", {"prior": "min"}, ValueError, r"prior='min': must be 'max', 'mean' or a number > 0"),
    ("grad_norm", {"prior": -1.0}, ValueError, r"prior=-1.0"),
    ("grad_norm", {"stale_decay": 1.5}, ValueError, r"stale_decay=1.5: must be in \[0, 1\]"),
    ("grad_norm", {"ema_decay": True}, ValueError, r"ema_decay=True"),
    ("outlier", {"outlier_multiplier": 0.0}, ValueError, r"outlier_multiplier=0.0: must be > 0"),
    ("loss_feedback", {"loss_smoothing": 1}, ValueError, r"loss_smoothing=1: must be in \[0, 1\)"),
    ("loss_feedback", {"score_lr": "big"}, ValueError, r"score_lr='big'"),
    ("grad_norm", {"tempreature": 2.0}, ValueError, r"Unknown sampler_options \['tempreature'\]"),
    ("outlier", {"ema_decay": 0.9}, ValueError, r"\['ema_decay'\] do not apply to sampler 'outlier'"),
    ("uniform", {"temperature": 2.0}, ValueError, r"do not apply to sampler 'uniform', which takes no options"),
    ("uniform", S.SamplerOptions(floor=0.1), ValueError, r"\['floor'\] do not apply"),
    ("grad_norm", [("temperature", 1.0)], TypeError, r"must be a dict or SamplerOptions"),
    ("topk", None, ValueError, r"Invalid sampler: 'topk'"),
])
def test_options_validation(sampler, options, err, match):
    layout = find_layout(MLPStack(width=4, n_layers=4))
    with pytest.raises(err, match=match):
        S.build_sampler(sampler, layout, options)


def test_options_accepted_and_defaults():
    layout = find_layout(MLPStack(width=4, n_layers=4))
    s = S.build_sampler("grad_norm", layout, {"temperature": 2, "floor": 0.25, "prior": "mean"})
    assert s.options.temperature == 2 and s.probabilities() == [0.25] * 4
    assert S.SamplerOptions().floor_for(8) == pytest.approx(0.0125)
    assert isinstance(S.build_sampler(lambda n, k, g: [0], layout), S.CallableSampler)
    assert S.build_sampler("uniform", layout, S.SamplerOptions()).name == "uniform"


# -- state ------------------------------------------------------------------------------------------------


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the HF Trainer uses


@pytest.mark.parametrize("name", ["uniform", "weight_norm", "grad_norm", "outlier", "loss_feedback"])
def test_state_dict_round_trip_gives_identical_draws(name):
    model = MLPStack(width=8, n_layers=6)
    layout = find_layout(model)
    a = S.build_sampler(name, layout)
    g = gen(3)
    for k in range(5):  # learn something, and stop mid-interval
        active = a(6, 2, g)
        a.observe_grad_norms(active, [1.0 + b for b in active])
        for step in range(3):
            a.observe_loss(torch.tensor(5.0 - k - 0.3 * step * (0 in active)), active)
    state, gstate = _roundtrip(a.state_dict()), g.get_state()
    b = S.build_sampler(name, layout)
    b.load_state_dict(state)
    assert b.probabilities() == a.probabilities()
    ga, gb = gen(), gen()
    ga.set_state(gstate)
    gb.set_state(gstate)
    for k in range(6):
        da, db = a(6, 2, ga), b(6, 2, gb)
        assert da == db
        a.observe_grad_norms(da, [2.0] * 2)
        b.observe_grad_norms(db, [2.0] * 2)
        a.observe_loss(1.0 / (k + 1), da)
        b.observe_loss(1.0 / (k + 1), db)
    with pytest.raises(ValueError, match="sampler state is for"):
        S.build_sampler("uniform" if name != "uniform" else "grad_norm", layout).load_state_dict(state)


def test_meter_state_round_trip():
    m = S.GradNormMeter([None, 1, 1])
    m.add(torch.tensor([1.0, 2.0, 3.0]))
    m2 = S.GradNormMeter([None, 1, 1])
    m2.load_state_dict(_roundtrip(m.state_dict()))
    assert m2.read([1]) == m.read([1])
    with pytest.raises(ValueError, match="segments"):
        S.GradNormMeter([1, 1]).load_state_dict(m.state_dict())


# -- two ranks ---------------------------------------------------------------------------------------------


def _two_rank_worker(rank, path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=2)
    try:
        out = {}
        # Each rank learns from different losses; draw() makes both take rank 0's state and blocks.
        s = S.LossFeedbackSampler(5)
        g = gen(0)
        draws = []
        for k in range(6):
            active = s(5, 2, g)
            draws.append(active)
            for step in range(4):
                s.observe_loss(10.0 - k - step * (1 + rank) * (1 + active[0]), active)
        draws.append(s(5, 2, g))  # the last switch, too, leaves both ranks with rank 0's state
        out["draws"], out["state"] = draws, s.state_dict()
        # A weight sharded over the 2 ranks gives the same outlier ratio as the whole tensor.
        torch.manual_seed(0)
        w = torch.randn(7, 5)
        w[3, 2] = 40.0
        mesh = init_device_mesh("cpu", (2,))
        dw = distribute_tensor(w, mesh, [Shard(0)])
        out["sharded"] = S.block_outlier_ratios([[("w", dw)]], 2.0)
        out["whole"] = S.block_outlier_ratios([[("w", w)]], 2.0)
        torch.save(out, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_ranks_share_rank0_state_and_shard_outlier_ratios(tmp_path):
    # fork: the workers inherit this process's imports (a spawned one re-imports torch, ~10 s on 2 cores)
    torch.multiprocessing.start_processes(_two_rank_worker, args=(str(tmp_path),), nprocs=2, join=True,
                                          start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["draws"] == r1["draws"]
    assert r0["state"] == r1["state"] and r0["state"]["intervals"] > 0
    assert r0["sharded"] == r1["sharded"] == r0["whole"] and r0["whole"][0] > 0


def test_fused_lisa_builds_under_a_meta_default_device():
    """`with torch.device("meta"):` around model and optimizer (how memory is planned at 7B shapes) must not
    move the draw's factory calls onto meta: the default sampler used to fail with "Cannot copy out of meta"."""
    from lisa_fused import FusedLISA
    from helpers import tiny_llama

    with torch.device("meta"):
        model = tiny_llama(n_layers=4)
        opt = FusedLISA(model, n_active_layers=2, switch_every=1, seed=3)
        first = opt.active_layers
        opt._switch()
    assert len(first) == 2 and len(opt.active_layers) == 2
    assert opt.memory_stats()["device_bytes"] > 0
    assert all(p.is_meta for p in model.parameters())
