"""`lisa-fused plan`: optimizer bytes pinned exactly (torch's documented AdamW state, FusedLISA on a real
model), the fake-tensor allocation tracker, the JSON, presets, and one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lisa_fused import FusedLISA
from lisa_fused.cli import main
from lisa_fused.plan import LISA_SETTINGS, Planner, load_config, meta_model, parse_size, preset_names
from lisa_fused.plan.planner import LORA_TARGETS
from lisa_fused.plan.trace import AllocationTracker

MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)


def micro_planner(dtype=torch.float32, **kw) -> Planner:
    return Planner(LlamaConfig(**MICRO), dtype, 2, 8, target="cpu", lora_rank=4, gamma=2, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_adamw_state_is_torchs_documented_state(dtype):
    # torch.optim.AdamW keeps exp_avg and exp_avg_sq like the param and a float32 scalar step per param;
    # the step also needs each param's grad.
    row = micro_planner(dtype).full()
    params = list(LlamaForCausalLM(LlamaConfig(**MICRO)).to(dtype).parameters())
    param_bytes = sum(p.numel() for p in params) * dtype.itemsize
    assert row.weights_bytes == param_bytes
    assert row.state_bytes == 3 * param_bytes + 4 * len(params)
    assert row.host_bytes == 0 and row.activation_bytes > 0


def test_lora_state_counts_only_adapters():
    row = micro_planner().lora()
    # rank 4 on q,k,v,o (32x32) and gate,up (32->64), down (64->32): A is r x in, B is out x r.
    per_layer = 4 * (4 * (32 + 32)) + 2 * 4 * (32 + 64) + 4 * (64 + 32)
    n_adapter = 3 * per_layer
    assert row.state_bytes == 3 * 4 * n_adapter + 4 * 2 * 7 * 3
    base = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**MICRO)).parameters()) * 4
    assert row.weights_bytes == base + 4 * n_adapter


@pytest.mark.parametrize("policy", ["host", "device", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lisa_state_equals_a_real_fusedlisa_after_every_block_was_active(policy, dtype):
    planner = micro_planner(dtype)
    row = planner.lisa({"inactive_moments": policy})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MICRO)).to(dtype)
    opt = FusedLISA(model, n_active_layers=2, switch_every=1, inactive_moments=policy)
    x = torch.randint(0, MICRO["vocab_size"], (2, 8))
    seen, left = set(opt.active_layers), set()  # steady state: every block has been active and has left
    for _ in range(60):
        model(input_ids=x, labels=x).loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        trainable = [p.requires_grad for p in model.parameters()]
        opt.step()
        changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        assert any(changed) and not any(c and not t for c, t in zip(changed, trainable))
        active = set(opt.active_layers)
        opt.zero_grad()
        left |= seen - active
        seen |= active
        if len(left) == MICRO["num_hidden_layers"]:
            break
    stats = opt.memory_stats()
    assert row.state_bytes == stats["device_bytes"]
    assert row.host_bytes == stats["host_bytes"]
    if policy != "drop":
        assert stats["store_bytes"] > 0
    own = sum(p.numel() * p.element_size() for p in model.parameters()
              if p.untyped_storage().nbytes() == p.numel() * p.element_size())
    assert row.weights_bytes == own


def test_tracker_counts_new_storages_once_and_frees_them():
    a = torch.ones(1000)
    with AllocationTracker() as tr:
        tr.preexisting([a])
        b = a * 2          # +4000
        v = b.view(10, 100)  # a view: no new bytes
        c = v + 1          # +4000: peak 8000
        del b, v           # 4000
        d = c.sum()        # scalar: 4004
        del c              # 4
    assert tr.peak == 8000 and tr.live == 4
    del d


def test_gradient_checkpointing_lowers_traced_activations():
    config = LlamaConfig(**dict(MICRO, num_hidden_layers=4))
    plain = Planner(config, torch.float32, 2, 64, target="cpu", gamma=2).lisa_activations(2)
    ckpt = Planner(config, torch.float32, 2, 64, target="cpu", gamma=2, gradient_checkpointing=True).lisa_activations(2)
    assert 0 < ckpt < 0.8 * plain


def test_presets_build_on_meta():
    assert {"llama-2-7b", "llama-3-8b", "qwen2.5-7b", "mistral-7b", "llama-3.2-1b", "gemma-2-9b"} <= set(preset_names())
    sizes = {n: sum(p.numel() for p in meta_model(load_config(n), torch.bfloat16).parameters()) / 1e9
             for n in ("llama-2-7b", "llama-3-8b", "gemma-2-9b", "llama-3.2-1b")}
    assert sizes["llama-2-7b"] == pytest.approx(6.74, abs=0.01)
    assert sizes["llama-3-8b"] == pytest.approx(8.03, abs=0.01)
    assert sizes["gemma-2-9b"] == pytest.approx(9.24, abs=0.01)
    assert sizes["llama-3.2-1b"] == pytest.approx(1.24, abs=0.01)


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("80GB") == 80 * 10**9 and parse_size("16G") == 16 * 2**30
    assert parse_size("1e9B") == 10**9
    with pytest.raises(ValueError, match=r"--gpu-mem '24': give a unit, e.g. 24GiB"):
        parse_size("24")
    for bad in ("-5GiB", "lots", "3 parsecs"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_size(bad)


def test_plan_cli_table_and_json(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    LlamaConfig(**MICRO).to_json_file(cfg)
    out = tmp_path / "plan.json"
    assert main(["plan", str(tmp_path), "--device", "cpu", "--dtype", "fp32", "--batch-size", "2", "--seq-len",
                 "8", "--methods", "full,lisa", "--gpu-mem", "1GiB", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| full " in text and "inactive_moments=host" in text
    plan = json.loads(out.read_text())
    assert plan["n_blocks"] == 3 and plan["target"] == plan["traced_on"] == "cpu" and plan["gpu_mem_bytes"] == 2**30
    full, lisa = plan["rows"][0], plan["rows"][1]
    for row in plan["rows"]:
        assert row["peak_bytes"] == (row["weights_bytes"] + row["state_bytes"] + row["activation_bytes"]
                                     + row["host_bytes"])  # a cpu target: the host store is the same RAM
        assert row["fits"] is True and row["max_batch_size"] > 2
    assert lisa["max_gamma"] == 3 and full["max_gamma"] is None
    assert lisa["kwargs"] == {"inactive_moments": "host"}
    assert full["peak_at"] and lisa["peak_at"]  # e.g. "optimizer step", "LM head + loss"
    assert "act+temp peaks in" in text and full["peak_at"] in text


def test_plan_cli_max_gamma_and_batch_respect_the_limit(tmp_path, capsys):
    # A cuda target (traced on CPU here): the host store is not in the peak, so a larger gamma costs more.
    LlamaConfig(**MICRO).to_json_file(tmp_path / "config.json")
    main(["plan", str(tmp_path), "--device", "cuda", "--dtype", "fp32", "--batch-size", "2", "--seq-len", "8",
          "--methods", "lisa", "--json", str(tmp_path / "a.json")])
    row = json.loads((tmp_path / "a.json").read_text())["rows"][0]
    limit = row["peak_bytes"] + 1  # gamma 2 fits, gamma 3 (more state) does not
    main(["plan", str(tmp_path), "--device", "cuda", "--dtype", "fp32", "--batch-size", "2", "--seq-len", "8",
          "--methods", "lisa", "--gpu-mem", f"{limit}B", "--json", str(tmp_path / "b.json")])
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["fits"] and row["max_gamma"] == 2 and row["max_batch_size"] == 2
    capsys.readouterr()
    main(["plan", str(tmp_path), "--device", "cuda", "--dtype", "fp32", "--methods", "lisa", "--gpu-mem", "1KiB",
          "--json", str(tmp_path / "c.json")])
    row = json.loads((tmp_path / "c.json").read_text())["rows"][0]
    assert not row["fits"] and row["max_gamma"] == 0 and row["max_batch_size"] == 0
    out = capsys.readouterr().out
    assert "nothing fits 0.0 GiB" in out and "try --gradient-checkpointing" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("| lisa "))
    assert [c.strip() for c in line.split("|")[8:10]] == ["none", "none"], line  # max batch, max gamma


BAD = [
    (["plan", "llama-9000"], "MODEL 'llama-9000': not a preset"),
    (["plan", "no/such/config.json"], "MODEL 'no/such/config.json': no such file or folder"),
    (["plan", "/"], "MODEL '/': has no config.json"),
    (["plan", "tiny", "--gpu-mem=-5GiB"], "--gpu-mem: '-5GiB': must be > 0"),
    (["plan", "tiny", "--gpu-mem", "-5GiB"], "--gpu-mem: '-5GiB': must be > 0"),  # not "expected one argument"
    (["plan", "tiny", "--gpu-mem", "5 parsecs"], "'5 parsecs': not a size"),
    (["plan", "tiny", "--methods", "full,adam"], "give distinct methods from full,lora,lisa"),
    (["plan", "tiny", "--gamma", "9"], "--gamma 9: must be in 1..8"),
    (["plan", "tiny", "--dtype", "int8"], "invalid choice: 'int8'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_plan_bad_input_is_one_line_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no usage block


def test_plan_unreadable_config_and_model_without_causal_lm(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["plan", str(tmp_path)])
    assert f"MODEL {str(tmp_path)!r}: cannot read" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(SystemExit):
        main(["plan", str(tmp_path / "config.json")])
    assert "model_type 't5': no causal LM to build" in capsys.readouterr().err


# Six blocks at hidden 256: deep enough that a middle block is neither end of its run.
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_activations_from_one_and_two_blocks_equal_a_full_depth_trace(checkpointing):
    # The planner traces 1- and 2-block copies and extrapolates; here the 6-block model is traced whole.
    # Target cuda: foreach AdamW, whose step temporaries grow with the number of blocks too.
    planner = Planner(LlamaConfig(**SMALL), torch.float32, 2, 32, target="cuda", lora_rank=8, gamma=2,
                      gradient_checkpointing=checkpointing)
    adamw = lambda m: planner._adamw([p for p in m.parameters() if p.requires_grad])  # noqa: E731

    full_peak = max(planner._events(planner._meta(), adamw).values())
    grads = step_state(planner._meta(), adamw)[1]
    assert planner.full().activation_bytes == full_peak - grads

    model = planner._meta()
    stack = model.get_submodule(planner.stack_path)
    lora_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=list(LORA_TARGETS)))
    lora_grads = sum(p.numel() * 4 for p in lora_model.parameters() if p.requires_grad)
    lora_peak = max(planner._trace(lora_model, stack, adamw)[0].values())
    assert planner.lora().activation_bytes == lora_peak - lora_grads
    for gamma in (2, 6):  # frozen blocks below active ones; every block active
        whole = max(planner._lisa_trace(6 - gamma, gamma).values())
        assert planner.lisa_activations(gamma) == whole > 0


def step_state(model, optimizer_fn) -> tuple[int, int]:
    """Reference: (optimizer state, grads) bytes of a full-depth meta `model` after one real step on meta
    grads, counted by hand, independent of the planner's fake 1- and 2-block traces."""
    opt = optimizer_fn(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.empty_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    return state, sum(p.numel() * p.element_size() for p in trainable)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_full_bytes_from_one_and_two_blocks_equal_the_full_depth_model(target):
    planner = Planner(LlamaConfig(**SMALL), torch.bfloat16, 2, 8, target=target)
    model = planner._meta()
    state, grads = step_state(model, lambda m: planner._adamw(list(m.parameters())))
    row = planner.full()
    assert row.state_bytes == state + grads
    assert row.weights_bytes == sum(p.numel() * 2 for p in model.parameters())


def test_lora_bytes_from_one_and_two_blocks_equal_the_full_depth_model():
    planner = Planner(LlamaConfig(**SMALL), torch.float32, 2, 8, target="cpu", lora_rank=8)
    model = get_peft_model(planner._meta(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                       target_modules=list(LORA_TARGETS)))
    state, grads = step_state(model, lambda m: planner._adamw([p for p in m.parameters() if p.requires_grad]))
    row = planner.lora()
    assert row.state_bytes == state + grads and row.weights_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_lisa_state_is_affine_in_gamma_below_every_block():
    # The largest-gamma search interpolates FusedLISA's bytes between gamma = n//2 and n//2+1; here every
    # gamma is built for real, for every setting the installed FusedLISA accepts.
    planner = Planner(LlamaConfig(**SMALL), torch.bfloat16, 2, 8, target="cuda", gamma=2)
    checked = 0
    for kwargs in LISA_SETTINGS:
        try:
            planner._lisa_state(dict(kwargs), 4)
        except (TypeError, ValueError, NotImplementedError):
            continue
        checked += 1
        for gamma in range(1, 6):
            assert planner._lisa_state_affine(dict(kwargs), gamma) == planner._lisa_state(dict(kwargs), gamma), \
                (kwargs, gamma)
    assert checked >= 3


def _golden_rows():
    """Fixed rows shaped like llama-3-8b's at batch 1 x 1024 (the GiB `lisa-fused plan` printed)."""
    from lisa_fused.plan.planner import Row, Skipped

    gib = 2**30

    def row(method, setting, w, s, a, h, peak_at, kwargs=None, fits=None, max_batch=None, max_gamma=None):
        return Row(method, setting, int(w * gib), int(s * gib), int(a * gib), int(h * gib), int((w + s + a) * gib),
                   fits, max_batch, max_gamma, kwargs or {}, peak_at)

    rows = [row("full", "torch.optim.AdamW, all parameters", 14.96, 44.87, 14.96, 0, "optimizer step", fits=False,
                max_batch=0),
            row("lora", "peft r=128, all 7 projections; AdamW", 16.21, 3.75, 9.33, 0, "LM head + loss", fits=False,
                max_batch=0),
            row("lisa", "gamma=2 inactive_moments=host", 12.19, 22.16, 5.87, 78.0, "LM head + loss",
                {"inactive_moments": "host"}, False, 0, 0),
            row("lisa", "gamma=2 inactive_moments=device", 12.19, 95.28, 5.87, 0, "LM head + loss",
                {"inactive_moments": "device"}, False, 0, 0),
            row("lisa", "gamma=2 inactive_moments=host, moments=4bit, master_weights=stochastic", 12.19, 7.01, 5.87,
                6.91, "LM head + loss", {"inactive_moments": "host", "moments": "4bit", "master_weights": "stochastic"},
                False, 0, 0),
            row("badam", "one block at a time (ascending), fp32 master of it, embedding and head frozen; AdamW", 14.96,
                2.84, 5.37, 0, "LM head + loss", fits=True, max_batch=1)]
    skipped = [Skipped("lisa", "inactive_moments=host, moments=8bit, master_weights=kahan",
                       "FusedLISA: master_weights='kahan' needs bf16 params")]
    return rows, skipped


PLAN_TITLE = "llama-3-8b (llama, 32 blocks), bfloat16, batch 1 x seq 1024; predicted for cuda"
PLAN_GOLDEN = """\
llama-3-8b (llama, 32 blocks), bfloat16, batch 1 x seq 1024; predicted for cuda
lisa (the reference): peak 40.22 GiB = weights 12.19 GiB + state 22.16 GiB + act+temp 5.87 GiB, 78.00 GiB paged to host;
  does not fit 24.0 GiB
full: 1.9x the peak (74.79 GiB), 2.0x the state; does not fit 24.0 GiB
lora r=128: 0.73x the peak (29.29 GiB), 0.17x the state; does not fit 24.0 GiB
lisa-device: 2.8x the peak (113.34 GiB), 4.3x the state; does not fit 24.0 GiB
lisa-4bit-sr: 0.62x the peak (25.07 GiB), 0.32x the state; does not fit 24.0 GiB
badam: 0.58x the peak (23.17 GiB), 0.13x the state; fits 24.0 GiB

GiB:
| row          | weights | state | act+temp |   peak |  host | fits 24.0 | max batch | max gamma |
|--------------|---------|-------|----------|--------|-------|-----------|-----------|-----------|
| full         |   14.96 | 44.87 |    14.96 |  74.79 |  0.00 |        NO |      none |         - |
| lora r=128   |   16.21 |  3.75 |     9.33 |  29.29 |  0.00 |        NO |      none |         - |
| lisa         |   12.19 | 22.16 |     5.87 |  40.22 | 78.00 |        NO |      none |      none |
| lisa-device  |   12.19 | 95.28 |     5.87 | 113.34 |  0.00 |        NO |      none |      none |
| lisa-4bit-sr |   12.19 |  7.01 |     5.87 |  25.07 |  6.91 |        NO |      none |      none |
| badam        |   14.96 |  2.84 |     5.37 |  23.17 |  0.00 |       yes |         1 |         - |

weights: the model's parameters (LoRA: + adapters; LISA: minus the params it trains, which sit in its packed buffer and
  count in state)
state: grads + moments + masters + scales (FusedLISA: memory_stats() after every block was active once; BAdam: its
  AdamW's moments and the fp32 master of its one block, + that block's grads)
act+temp: traced peak of forward, backward and optimizer step (logits and loss included; where it peaks: below, per row)
peak: weights + state + act+temp
host: LISA's paged state, in pinned host memory
fits: peak <= --gpu-mem; max batch / max gamma: the largest that fit (none: not even 1; - : no --gpu-mem, or not LISA)

rows:
full: torch.optim.AdamW, all parameters; act+temp peaks in optimizer step
lora r=128: peft r=128, all 7 projections; AdamW; act+temp peaks in LM head + loss
lisa: a leaving block's moments are paged to pinned host memory (FusedLISA's default) [gamma=2 inactive_moments=host];
  act+temp peaks in LM head + loss
lisa-device: every block's moments stay on the device: published LISA (the axolotl, ms-swift and LMFlow callbacks under
  torch AdamW) once every block has been drawn [gamma=2 inactive_moments=device]; act+temp peaks in LM head + loss
lisa-4bit-sr: paged like lisa, block-wise 4-bit moments (as torchao AdamW4bit), no fp32 master: stochastically rounded
  bf16 updates [gamma=2 inactive_moments=host, moments=4bit, master_weights=stochastic]; act+temp peaks in LM head +
  loss
badam: one block at a time (ascending), fp32 master of it, embedding and head frozen; AdamW; act+temp peaks in LM head +
  loss
skipped lisa inactive_moments=host, moments=8bit, master_weights=kahan: FusedLISA: master_weights='kahan' needs bf16
  params
"""


def test_plan_printout_is_golden_and_fits_120_columns():
    from lisa_fused.plan.report import WIDTH, format_plan

    rows, skipped = _golden_rows()
    text = format_plan(PLAN_TITLE, rows, skipped, 24 * 2**30, "cuda")
    assert text + "\n" == PLAN_GOLDEN
    assert max(len(line) for line in text.splitlines()) <= WIDTH


def test_plan_rows_are_named_like_the_bench_and_say_what_they_match():
    from lisa_fused.plan.report import reference, row_name, row_note

    rows, _ = _golden_rows()
    assert [row_name(r) for r in rows] == ["full", "lora r=128", "lisa", "lisa-device", "lisa-4bit-sr", "badam"]
    assert reference(rows) is rows[2]
    assert "published LISA (the axolotl, ms-swift and LMFlow callbacks" in row_note(rows[3])
    assert row_note(rows[4]).endswith("[gamma=2 inactive_moments=host, moments=4bit, master_weights=stochastic]")


def test_badam_row_is_its_real_optimizer_and_extrapolates_exactly():
    pytest.importorskip("badam", reason='BAdam is not installed: pip install "badam==1.4"')
    from lisa_fused.plan import badam as badam_plan
    from lisa_fused.plan.kept import storage_bytes

    config = LlamaConfig(**dict(MICRO, num_hidden_layers=5))
    planner = Planner(config, torch.float32, 2, 8, target="cpu")
    row = planner.badam()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = badam_plan.block_optimizer(model)
    x = torch.randint(0, MICRO["vocab_size"], (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    block0 = {n: p for n, p in model.named_parameters() if n.startswith("model.layers.0.")}
    numel = sum(p.numel() for p in block0.values())
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(block0), "BAdam trains block 0 only: embedding, head and the other blocks stay"
    # an fp32 master + exp_avg + exp_avg_sq per element, a 4-byte step per tensor; plus the block's grads
    kept = sum(storage_bytes(badam_plan.kept_tensors(opt)).values())
    assert kept == 12 * numel + 4 * len(block0)
    assert row.state_bytes == kept + 4 * numel
    assert row.weights_bytes == 4 * sum(p.numel() for p in model.parameters())
    # traced at 2 and 3 blocks and extrapolated: the same as a trace of all 5
    whole, _ = badam_plan._trace(planner, 5)
    assert row.activation_bytes == max(whole.values()) - 4 * numel
