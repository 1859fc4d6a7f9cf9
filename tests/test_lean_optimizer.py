"""FusedLISA with lean state (moments= / master_weights=, kernels/contract.py) end to end.

* Every mode on a tiny Llama against an oracle that keeps each parameter's state in its own buffers
  (quant.state_buffers) and steps it alone through the same backend: bitwise, across switches, so the
  packing offsets, the paged rows (codes, scales, compensation), the param ids and step counts that key
  stochastic rounding are what the contract says. Kernel-level exactness against the pure-torch
  reference, and 8-bit / 4-bit trajectories against torchao, are in tests/test_lean_kernels.py.
* Resume mid-interval with a switch in between, bitwise, for every mode; loading into another setting.
* memory_stats at real model shapes on the meta device: the exact bytes of the formula, per setting.
"""
from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from helpers import lm_batch, tiny_llama
from lisa_fused import FusedLISA
from lisa_fused.kernels import Segments, adamw_packed_, backend_unavailable_reason, quant

MODES = [(m, w) for m in quant.FORMATS for w in quant.MASTER_WEIGHTS]
LR, WD, BETAS, EPS = 3e-3, 0.1, (0.9, 0.999), 1e-8


def mode_id(mode):
    return f"{mode[0]}-{mode[1]}"


def lm_step(model, opt, t):
    opt.zero_grad()
    x = lm_batch(t)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


class Oracle:
    """Per-parameter AdamW state in the lean format, each param stepped alone (one segment at offset 0).
    min_quantized_size: the small-tensor rule, written here again: under 8bit/4bit a param with fewer
    elements keeps fp32 moments."""

    def __init__(self, opt, backend, device, min_quantized_size=0):
        self.backend, self.master = backend, opt.master_weights
        self.seed = opt.seed % 2**32
        self.steps = [0] * len(opt._params)
        self.param, self.lowp, self.state, self.moments = [], [], [], []
        for p in opt._params:
            flat = p.detach().reshape(-1).clone()
            n = flat.numel()
            small = opt.moments in quant.BLOCK and n < min_quantized_size
            self.moments.append("fp32" if small else opt.moments)
            if self.master == "fp32":
                self.param.append(flat.float())
                self.lowp.append(None if p.dtype == torch.float32 else flat)
            else:
                self.param.append(flat)
                self.lowp.append(None)
            self.state.append(quant.state_buffers(n, self.moments[-1], self.master, p.dtype, device))

    def step(self, grads):
        b1, b2 = BETAS
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.steps[i] += 1
            s = self.steps[i]
            hp = torch.tensor([[LR / (1 - b1 ** s), 1 - LR * WD, math.sqrt(1 - b2 ** s), 1.0, i, s]],
                              dtype=torch.float64)
            st = dict(self.state[i])
            adamw_packed_(self.param[i], g.reshape(-1).clone(), st.pop("exp_avg"), st.pop("exp_avg_sq"),
                          Segments([(0, self.param[i].numel())]), hp, beta1=b1, beta2=b2, eps=EPS,
                          param_lowp=self.lowp[i], backend=self.backend, moments=self.moments[i],
                          master_weights=self.master, seed=self.seed, **st)

    def value(self, i):
        return self.lowp[i] if self.lowp[i] is not None else self.param[i]


def run_with_oracle(moments, master, backend, dtype=torch.bfloat16, steps=7, device="cpu", policy="host",
                    min_quantized_size=0, hidden=32):
    """min_quantized_size=0 (quantize every param): the tiny Llama's tensors are all under 4096 elements."""
    model = tiny_llama(dtype=dtype, hidden=hidden).to(device)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FusedLISA(model, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, n_active_layers=2, switch_every=3,
                    seed=5, moments=moments, master_weights=master, backend=backend, inactive_moments=policy,
                    min_quantized_size=min_quantized_size)
    oracle = Oracle(opt, backend, device, min_quantized_size)
    ever_active = set(opt.active_layers)
    for t in range(steps):
        opt.zero_grad()
        x = lm_batch(t).to(device)
        model(input_ids=x, labels=x).loss.backward()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in opt._params]
        opt.step()
        oracle.step(grads)
        ever_active |= set(opt.active_layers)
        for i, p in enumerate(opt._params):
            assert torch.equal(p.detach().reshape(-1), oracle.value(i)), (t, opt._names[i])
    return model, opt, oracle, init, ever_active


def check_trained_and_frozen(model, opt, init, ever_active):
    frozen = {n for b, blk in enumerate(opt.model_layout.blocks) if b not in ever_active for n, _ in blk}
    init = {n: t.to(opt.device) for n, t in init.items()}
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), init[n])
        assert changed == (n not in frozen), (n, "changed" if changed else "unchanged")
    assert frozen, "the schedule should leave a block untrained (4 blocks, gamma 2, 2 intervals)"


def backend_case(mode, backend, device="cpu"):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    reason = None if device == "cuda" else backend_unavailable_reason(backend, device)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(mode, backend, device, marks=marks, id=f"{mode_id(mode)}-{backend}-{device}")


# Every mode on the C++ backend (and on the GPU backends where a GPU is); on the slower pure-torch
# reference each moment format and each master mode once. (The Triton interpreter passes too, ~40 s a
# mode: the optimizer hands every backend the same arguments; tests/test_lean_kernels.py covers Triton.)
EACH_ONCE = (("fp32", "kahan"), ("bf16", "stochastic"), ("8bit", "fp32"), ("4bit", "kahan"))
ORACLE_CASES = ([backend_case(m, "cpu") for m in MODES] + [backend_case(m, "torch") for m in EACH_ONCE]
                + [backend_case(m, b, "cuda") for b in ("cuda", "triton") for m in MODES])


@pytest.mark.parametrize("mode,backend,device", ORACLE_CASES)
def test_every_mode_equals_per_param_oracle(mode, backend, device):
    model, opt, oracle, init, ever_active = run_with_oracle(*mode, backend, steps=5, device=device)
    check_trained_and_frozen(model, opt, init, ever_active)
    # the saved state is the oracle's state, format for format (codes, scales, bf16 moments, compensation)
    sd = opt.state_dict()
    assert sd["lisa"]["moments"] == mode[0] and sd["lisa"]["master_weights"] == mode[1]
    for i, entry in sd["state"].items():
        for key, ref in oracle.state[i].items():
            assert torch.equal(entry[key].reshape(-1), ref.cpu()), (opt._names[i], key)


@pytest.mark.parametrize("policy", ["host", "device", "drop"])
@pytest.mark.parametrize("mode", [("4bit", "kahan"), ("8bit", "fp32"), ("8bit", "stochastic")], ids=mode_id)
def test_small_tensor_rule_mixes_formats_and_equals_oracle(mode, policy):
    """hidden 64: embedding, head and projections have >= 4096 elements (quantized), norms 64 (fp32 moments):
    two partitions, paged together across switches, each param bitwise its own format's oracle."""
    if policy == "drop":
        pytest.skip("the oracle keeps state across switches; 'drop' resets it (covered without groups)")
    model, opt, oracle, init, ever_active = run_with_oracle(*mode, "cpu", steps=7, policy=policy,
                                                            min_quantized_size=4096, hidden=64)
    check_trained_and_frozen(model, opt, init, ever_active)
    formats = opt.state_formats()
    small = [n for n, p in model.named_parameters() if p.numel() < 4096]
    assert small and all(formats[n] == f"fp32/{mode[1]}" for n in small), formats
    assert all(formats[n] == f"{mode[0]}/{mode[1]}" for n, p in model.named_parameters() if p.numel() >= 4096)
    st = opt.memory_stats()
    assert st["small_tensor_numel"] == sum(p.numel() for n, p in model.named_parameters() if n in small)
    assert st["small_tensor_moment_bytes"] == 8 * st["small_tensor_numel"]
    sd = opt.state_dict()
    for i, entry in sd["state"].items():
        for key, ref in oracle.state[i].items():
            assert torch.equal(entry[key].reshape(-1), ref.cpu()), (opt._names[i], key)


@pytest.mark.parametrize("mode", [("4bit", "kahan"), ("8bit", "fp32")], ids=mode_id)
def test_device_policy_keeps_lean_rows_resident_and_exact(mode):
    model, opt, _, init, ever_active = run_with_oracle(*mode, "cpu", steps=7, policy="device")
    check_trained_and_frozen(model, opt, init, ever_active)
    st = opt.memory_stats()
    assert st["host_bytes"] == 0 and st["device_bytes"] > st["packed_bytes"]


@pytest.mark.parametrize("moments", quant.FORMATS)
def test_fp32_model_lean_moments_equal_oracle(moments):
    model, opt, _, init, ever_active = run_with_oracle(moments, None, "cpu", dtype=torch.float32, steps=4)
    assert opt.master_weights == "fp32"
    check_trained_and_frozen(model, opt, init, ever_active)


def test_cpu_backend_close_to_reference_backend():
    """Same grads, two backends: the reference's one deviation is torch's CPU sqrt (contract.py), so
    the two runs agree to a bf16 ulp per step, not bitwise, over several steps."""
    runs = [run_with_oracle("4bit", "stochastic", b, steps=4)[0] for b in ("torch", "cpu")]
    for (n, a), (_, b) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        assert err <= 4 * 2 ** -8, (n, err)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_resume_mid_interval_is_bitwise_exact(mode):
    moments, master = mode
    steps, save_at, K = 8, 4, 3  # a switch at step 3 before the save, one at 6 after it

    def fresh(seed):
        model = tiny_llama(seed=seed, dtype=torch.bfloat16)
        return model, FusedLISA(model, lr=LR, weight_decay=WD, n_active_layers=2, switch_every=K, seed=seed,
                                moments=moments, master_weights=master, backend="cpu", min_quantized_size=0)

    model, opt = fresh(0)
    for t in range(steps):
        lm_step(model, opt, t)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_state = opt.state_dict()["state"]

    model, opt = fresh(0)
    for t in range(save_at):
        lm_step(model, opt, t)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    model, opt = fresh(123)  # another init and seed: the SR seed must come from the checkpoint too
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    for t in range(save_at, steps):
        lm_step(model, opt, t)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[n]), n
    for i, entry in opt.state_dict()["state"].items():
        for key, t in entry.items():
            assert torch.equal(t, expected_state[i][key]), (opt._names[i], key)


def _trained(moments, master="fp32", steps=4):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = FusedLISA(model, lr=LR, n_active_layers=2, switch_every=3, moments=moments, master_weights=master,
                    backend="cpu", min_quantized_size=0)  # (every tensor of the tiny Llama is under 4096)
    for t in range(steps):
        lm_step(model, opt, t)
    return model, opt


@pytest.mark.parametrize("src,dst", [("8bit", "4bit"), ("4bit", "fp32"), ("fp32", "8bit"), ("bf16", "4bit")])
def test_load_into_other_moments_converts(src, dst, caplog):
    _, saved = _trained(src)
    sd = saved.state_dict()
    model, opt = _trained(dst, steps=0)
    with caplog.at_level(logging.WARNING, logger="lisa_fused"):
        opt.load_state_dict(sd)
    assert f"moments={src!r}" in caplog.text and f"moments={dst!r}" in caplog.text
    got = opt.state_dict()["state"]
    assert set(got) == set(sd["state"])
    for i, e in sd["state"].items():
        n = math.prod(opt._shapes[i])
        for which in ("exp_avg", "exp_avg_sq"):
            def decode(entry, fmt):
                if fmt in quant.BLOCK:
                    return quant.dequantize(entry[which], entry[which + "_scale"], fmt, which, n)
                return entry[which].reshape(-1).float()
            a, b = decode(e, src), decode(got[i], dst)
            if dst == "fp32":  # dequantize is exact in fp32
                assert torch.equal(a, b), (opt._names[i], which)
            else:  # one requantization: within the coarsest map step of the block's absmax
                assert (a - b).abs().max() <= a.abs().max() * 0.5 + 1e-30, (opt._names[i], which)
    for t in range(4, 7):  # and it trains on
        lm_step(model, opt, t)


def test_load_with_other_master_weights_is_refused_and_nothing_changes():
    _, saved = _trained("8bit", "kahan")
    model, opt = _trained("8bit", "stochastic")
    before = opt.state_dict()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="master_weights='kahan'.*master_weights='stochastic'"):
        opt.load_state_dict(saved.state_dict())
    after = opt.state_dict()
    assert after["lisa"]["active_layers"] == before["lisa"]["active_layers"]
    for i, e in before["state"].items():
        for k, t in e.items():
            assert torch.equal(after["state"][i][k], t)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n])


def test_damaged_codes_are_refused():
    _, saved = _trained("4bit")
    sd = saved.state_dict()
    i = next(iter(sd["state"]))
    sd["state"][i]["exp_avg"] = sd["state"][i]["exp_avg"][:-1]
    _, opt = _trained("4bit", steps=0)
    with pytest.raises(ValueError, match="exp_avg of"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("kwargs,dtype,msg", [
    (dict(moments="2bit"), torch.bfloat16, r"Invalid moments: '2bit'; choose one of \('fp32', 'bf16', '8bit', '4bit'\)"),
    (dict(master_weights="fp16"), torch.bfloat16, "Invalid master_weights: 'fp16'; choose one of"),
    (dict(master_weights="kahan"), torch.float32, "master_weights='kahan'.*torch.float32"),
    (dict(master_weights="stochastic"), torch.float32, "master_weights='stochastic'.*torch.float32"),
    (dict(master_weights="stochastic"), torch.float16, "needs torch.bfloat16 params.*torch.float16"),
])
def test_bad_state_options_name_the_value_and_touch_nothing(kwargs, dtype, msg):
    model = tiny_llama(dtype=dtype)
    flags = [p.requires_grad for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match=msg):
        FusedLISA(model, n_active_layers=2, **kwargs)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    FusedLISA(model, n_active_layers=2)  # nothing claimed by the refused one


def test_master_weights_default_and_fp16_kahan():
    assert FusedLISA(tiny_llama(dtype=torch.bfloat16), n_active_layers=2).master_weights == "fp32"
    model = tiny_llama(dtype=torch.float16)
    opt = FusedLISA(model, lr=LR, n_active_layers=2, switch_every=2, moments="8bit", master_weights="kahan",
                    backend="cpu")
    for t in range(3):
        lm_step(model, opt, t)
    bufs = opt._packed_state.bufs[0]
    assert bufs.compensation.dtype == torch.float16 and bufs.master is None
    assert opt.memory_stats()["master_bytes"] == 0


def test_paging_moves_the_lean_rows():
    """A switch pages codes + scales (+ compensation), not fp32 moments: the host store shrinks by the
    format's bytes per element."""
    sizes = {}
    for moments, master in (("fp32", "fp32"), ("8bit", "kahan"), ("4bit", "stochastic")):
        _, opt = _trained(moments, master, steps=7)
        st = opt.memory_stats()
        assert st["host_bytes"] > 0
        sizes[moments] = st["host_bytes"]
    # per paged element: fp32 moments + fp32 master 12 B; 8-bit 2 + 8/256 + 2 (comp); 4-bit 1 + 8/128
    assert sizes["8bit"] < sizes["fp32"] * (4.1 / 12) and sizes["4bit"] < sizes["fp32"] * (1.1 / 12)


class Stack(torch.nn.Module):
    """Every tensor 128 x 128 (a multiple of both block sizes, over torchao's 4096-element threshold),
    so that torchao quantizes each one as we do."""

    def __init__(self, n_blocks=4, width=128):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(width, width, bias=False)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(n_blocks))
        self.out = torch.nn.Linear(width, width, bias=False)


@pytest.mark.parametrize("fmt,ao_cls", [("8bit", "AdamW8bit"), ("4bit", "AdamW4bit")])
def test_trajectory_close_to_torchao_across_switches(fmt, ao_cls, monkeypatch):
    """FusedLISA (moments=8bit/4bit, paged across switches) and torchao's AdamW8bit/AdamW4bit over the same
    params, fed the same gradients (a frozen block gets none, so torchao skips it, as LISA does).
    The schemes differ in the nearest-code tie rule and in v's update (test_lean_kernels.py), so most
    elements differ by fp32 roundings and a few by a flipped code. Tolerance, in units of the largest
    distance a param travelled: mean |difference| < 1e-4, max < 2e-2."""
    ao = pytest.importorskip("torchao.optim")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # torchao compiles its step by default
    model = Stack()
    ao_params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    p0 = [p.detach().clone() for p in ao_params]
    opt = FusedLISA(model, lr=1e-3, weight_decay=0.01, n_active_layers=2, switch_every=3, moments=fmt,
                    backend="cpu")
    ao_opt = getattr(ao, ao_cls)(ao_params, lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.01)
    gen = torch.Generator().manual_seed(3)
    for t in range(12):
        for p, q in zip(model.parameters(), ao_params):
            g = torch.randn(p.shape, generator=gen) * (1.0 if t < 6 else 0.1)
            p.grad = g.clone() if p.requires_grad else None
            q.grad = g.clone() if p.requires_grad else None
        opt.step()
        ao_opt.step()
    ours = list(model.parameters())
    travelled = max((q - a).abs().max().item() for q, a in zip(ao_params, p0))
    d = torch.cat([(p.detach() - q.detach()).reshape(-1) for p, q in zip(ours, ao_params)]).abs()
    # measured: mean 5e-6 (8-bit) / 1.2e-6 (4-bit) of the distance travelled, max 7e-3 / 3e-3 (a code that
    # flips on a near-tie moves one element by a fraction of lr)
    assert d.mean() < 1e-4 * travelled and d.max() < 2e-2 * travelled, (d.mean(), d.max(), travelled)
    assert sum(not torch.equal(p.detach(), a) for p, a in zip(ours, p0)) >= 4  # inp, out and blocks trained


# ------------------------------------------------------------------------------ bytes at real shapes
SHAPES = ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "llama-3.2-1b"]
SETTINGS = [("fp32", "fp32"), ("bf16", "fp32"), ("8bit", "fp32"), ("8bit", "kahan"), ("4bit", "kahan"),
            ("4bit", "stochastic")]


def expected_bytes(model, layout_always, blocks, gamma, moments, master, min_quantized_size=4096):
    """The byte formula, from the model's parameter shapes alone: every trained tensor padded to 256
    elements. Under 8bit/4bit, tensors under min_quantized_size elements keep fp32 moments, in buffers of
    their own (a second slot layout). Per layout, T = always-trained elements + gamma * the largest
    block's; per element (only what the optimizer adds: the params and grads stay the model's): fp32 master
    4 (master_weights="fp32"), compensation 2 ("kahan"), moments 8 | 4 | 2 | 1 (fp32 | bf16 | 8bit | 4bit, 4-bit rounded up to whole bytes), scales
    2 * 4 B per 256 | 128 elements."""
    def padded(ps):
        return sum(-(-p.numel() // 256) * 256 for p in ps)

    def total(keep):
        return padded([p for p in layout_always if keep(p)]) + gamma * max(padded([p for p in b if keep(p)])
                                                                            for b in blocks)

    quantized = moments in quant.BLOCK
    small = (lambda p: p.numel() < min_quantized_size) if quantized else (lambda p: False)
    T, S = total(lambda p: not small(p)), total(small)
    mom = {"fp32": 8 * T, "bf16": 4 * T, "8bit": 2 * T, "4bit": 2 * -(-T // 2)}[moments] + 8 * S
    scales = 2 * 4 * -(-T // quant.BLOCK[moments]) if quantized else 0
    return {"master_bytes": 4 * (T + S) if master == "fp32" else 0,
            "compensation_bytes": 2 * (T + S) if master == "kahan" else 0, "moment_bytes": mom, "scale_bytes": scales}


@pytest.fixture(scope="module")
def meta_models():
    from lisa_fused.plan.models import load_config, meta_model

    return {name: meta_model(load_config(name), torch.bfloat16) for name in SHAPES}


@pytest.mark.parametrize("name", SHAPES)
def test_memory_stats_match_the_byte_formula_at_real_shapes(name, meta_models):
    model = meta_models[name]
    for moments, master in SETTINGS:
        for min_size in (4096, 0):
            opt = FusedLISA(model, n_active_layers=2, moments=moments, master_weights=master,  # buffers on meta
                            min_quantized_size=min_size)
            lay = opt.model_layout
            want = expected_bytes(model, [p for _, p in lay.always], [[p for _, p in b] for b in lay.blocks], 2,
                                  moments, master, min_size)
            st = opt.memory_stats()
            assert {k: st[k] for k in want} == want, (name, moments, master, min_size)
            assert st["device_bytes"] == sum(want.values())
            opt.release()


def test_leanest_setting_meets_lora_budget_at_llama3_8b(meta_models):
    """Issue 11's goal: at Llama-3-8B shape, gamma 2, the extra optimizer memory of the leanest setting
    is at most LoRA r=128's 5.0 GiB (adapter + grad + AdamW moments, 16 B per adapter param, fp32)."""
    cfg = meta_models["llama-3-8b"].config
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    r = 128
    lora = L * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # q, o; k, v; gate, up, down
    opt = FusedLISA(meta_models["llama-3-8b"], n_active_layers=2, moments="4bit", master_weights="stochastic")
    grads = sum(2 * p.numel() for p in opt._params if p.requires_grad)  # the trained params' bf16 grads, as LoRA's
    extra = opt.memory_stats()["device_bytes"] + grads
    opt.release()
    assert 16 * lora / 2**30 == pytest.approx(5.0, abs=0.05)
    assert extra <= 16 * lora, (extra / 2**30, 16 * lora / 2**30)


def test_model_conversion_with_master_free_state_is_refused():
    model, opt = _trained("8bit", "kahan", steps=2)
    model.float()
    with pytest.raises(RuntimeError, match="bfloat16 to torch.float32.*master_weights='kahan'"):
        opt.step()


def test_model_conversion_with_lean_moments_and_masters_is_followed():
    """bf16 -> fp32 with 8-bit moments: the codes and scales move as they are (paged ones too), the
    fp32 masters become the params, and training goes on from them."""
    model, opt = _trained("8bit", "fp32", steps=4)
    before = opt.state_dict()
    model.float()
    lm_step(model, opt, 4)  # follows the move, then steps
    assert opt.param_dtype == torch.float32 and opt._packed_state.bufs[0].exp_avg.dtype == torch.uint8
    after = opt.state_dict()
    moved = [i for i in before["state"] if opt._steps[i] == int(before["state"][i]["step"])]
    assert moved, "some params (parked blocks) did not step after the move"
    for i in moved:  # untouched state moved as it is
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            assert torch.equal(after["state"][i][key], before["state"][i][key]), (opt._names[i], key)


def test_bench_lean_methods():
    """`lisa-fused bench --methods lisa-8bit,lisa-4bit,lisa-4bit-sr` builds FusedLISA with those settings;
    lisa-4bit-sr on an fp32 run is an argument error naming --dtype."""
    from lisa_fused.bench import methods
    from lisa_fused.cli import build_parser, resolve_bench_args

    cfg = dict(lr=1e-3, lora_lr=1e-3, lora_rank=4, gamma=2, switch_every=2, seed=0)
    for name, want in (("lisa-8bit", ("8bit", "fp32")), ("lisa-4bit", ("4bit", "fp32")),
                       ("lisa-4bit-sr", ("4bit", "stochastic"))):
        setup = methods.build(name, tiny_llama(dtype=torch.bfloat16), cfg)
        assert (setup.optimizer.moments, setup.optimizer.master_weights) == want
        assert f"moments={want[0]!r}" in setup.describe
        lm_step(setup.model, setup.optimizer, 0)
        setup.optimizer.release()
    assert "lisa-8bit" not in methods.DEFAULT_METHODS
    args = build_parser().parse_args(["bench", "--methods", "lisa,lisa-4bit-sr", "--dtype", "float32"])
    with pytest.raises(SystemExit):
        resolve_bench_args(args)
