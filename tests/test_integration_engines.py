"""FusedLISA on the engines users launch, 2 CPU processes (gloo): accelerate's FSDP2 prepare, the Hugging
Face Trainer with fsdp_version 2 and with DeepSpeed ZeRO-0, DeepSpeed's engine, and
torch.distributed.checkpoint. One torchrun launch runs every scenario of tests/_engines_worker.py; each
test checks one. Every training check asserts that the trained params moved, the never-active blocks did
not, the ranks agree and the optimizer's device bytes are those of the active set."""
from __future__ import annotations

import os

import pytest
import torch

import _dist_worker as W
from helpers import MLPStack, run_two_processes
from test_integration_distributed import assert_trained_changed_frozen_kept, scenario

if os.environ.get("CI") == "true":  # CI installs the [dist] extra: these tests must run there, not skip
    import accelerate  # noqa: F401
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")  # pip install ".[dist]"

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]

TIMEOUT_S = 600


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Launch the 2-process group once: ({scenario: (rank0, rank1)}, output folder)."""
    out = tmp_path_factory.mktemp("engines")
    return run_two_processes("_engines_worker.py", out, TIMEOUT_S, {"OMP_NUM_THREADS": "1"}), out


@pytest.fixture(scope="module")
def results(launch):
    return launch[0]


def assert_trained_on_active_set_only(r0, r1):
    """Ranks agree bitwise, the run spans a switch, params of blocks ever active and outside the stack moved
    and the others did not, and the optimizer's device bytes stayed those of the packed active set."""
    assert r0["seq"] == r1["seq"] and len(set(r0["seq"])) > 1, r0["seq"]
    assert torch.equal(r0["params"], r1["params"])
    assert_trained_changed_frozen_kept(r0)


def assert_active_set_bytes(res):
    want, whole_model = res["expected_bytes"]
    assert set(res["mem"]) == {want}, (res["mem"], want)
    assert want < whole_model  # no state for the inactive blocks' shards appeared


def test_accelerate_fsdp2_prepare_after_fused_lisa(results):
    """Accelerator(fsdp_plugin=FSDP2) + prepare(model, FusedLISA): accelerate shards the model after the
    optimizer exists (cpu_ram_efficient_loading: through the meta device and rank 0's weights) and
    assigns the DTensor params; FusedLISA rebinds to them and trains as one process over both batches."""
    r0, r1 = scenario(results, "accelerate_fsdp2")
    ref, _ = scenario(results, "lm_reference")
    for res in (r0, r1):
        assert res["dtensor"] and res["in_place"] and res["same_params"]
        assert_active_set_bytes(res)
        assert res["expected_bytes"][0] < res["bytes_unsharded"]  # the rank-local shards, not the full set
    assert_trained_on_active_set_only(r0, r1)
    assert r0["seq"] == ref["seq"]
    # (Adam normalises the grads: reduction-order noise in a near-zero grad moves a weight by up to ~1e-5)
    torch.testing.assert_close(r0["params"], ref["params"], rtol=1e-5, atol=5e-5)


def test_accelerate_fsdp2_mixed_precision_is_refused(results):
    r0, _ = scenario(results, "accelerate_fsdp2_mixed_precision_refused")
    assert "sharded the model with FSDP2 and MixedPrecisionPolicy(param_dtype=torch.bfloat16) after FusedLISA had " \
           "frozen the inactive blocks" in r0["error_text"], r0["error_text"]
    assert "train with fp32 params there" in r0["error_text"]


def test_trainer_fsdp2_with_factory_trains_and_resumes_bitwise(results):
    """TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2, SHARDED_STATE_DICT}) and
    optimizer_cls_and_kwargs=(FusedLISAFactory, ...): six steps spanning switches; a checkpoint at step 3
    (accelerate's DCP save of model and optimizer) resumed in a fresh Trainer ends bitwise equal."""
    r0, r1 = scenario(results, "trainer_fsdp2")
    full0, full1, resumed = r0["full"], r1["full"], r0["resumed"]
    for res in (full0, full1, resumed, r1["resumed"]):
        assert res["in_place"] and res["global_step"] == 6
        assert_active_set_bytes(res)
    assert_trained_on_active_set_only(full0, full1)
    assert resumed["seq"] == full0["seq"][3:]
    assert torch.equal(resumed["params"], full0["params"])
    assert torch.equal(r1["resumed"]["params"], full0["params"])


def test_trainer_fsdp2_refuses_the_optimizers_argument(results):
    r0, _ = scenario(results, "trainer_fsdp2_optimizers_refused")
    assert "Passing `optimizers` is not allowed if PyTorch FSDP is enabled" in r0["error_text"], r0["error_text"]


@pytest.mark.parametrize("name", ["dcp_fsdp2", "dcp_fsdp2_grad_norm"])
def test_dcp_resume_mid_interval_is_bitwise(results, name):
    """fully_shard + FusedLISA, 3 steps (a switch every 2: state of blocks that left is paged), then
    get_optimizer_state_dict -> dcp.save -> a fresh model and FusedLISA (other seeds) -> dcp.load ->
    set_optimizer_state_dict -> 5 more steps: bitwise the uninterrupted run. DCP's zero-gradient init step
    did not run (the step count is what was trained), and the state is one DTensor row per parameter."""
    r0, r1 = scenario(results, name)
    for res in (r0, r1):
        assert res["saved_step"] == 3 and res["template_step"] == 0
        assert res["state_keys"] == [] and res["rows_dtensor"] and res["rows_for_all"]
        assert res["global_step"] == 3 and res["active"] == res["saved_active"]
        assert res["seq"] == res["ref_seq"] and len(set(res["seq"])) > 1
        assert torch.equal(res["params"], res["ref_params"])
    assert torch.equal(r0["params"], r1["params"])
    assert_trained_changed_frozen_kept(r0)


def test_dcp_resume_under_ddp_is_bitwise(results):
    """DDP (replicated params: plain tensors, which DCP writes once for all ranks), the same round trip."""
    r0, r1 = scenario(results, "dcp_ddp")
    for res in (r0, r1):
        assert res["saved_step"] == 3 and res["template_step"] == 0 and res["state_keys"] == []
        assert not res["rows_dtensor"] and res["rows_for_all"] and res["global_step"] == 3
        assert res["seq"] == res["ref_seq"] and torch.equal(res["params"], res["ref_params"])
    assert torch.equal(r0["params"], r1["params"])
    assert_trained_changed_frozen_kept(r0)


def test_full_optimizer_state_dict_as_the_trainer_saves_it_resumes_bitwise(results):
    """The Trainer's FULL_STATE_DICT optimizer path under FSDP2: full_state_dict + cpu_offload, torch.save
    on rank 0, torch.load(weights_only=True) on rank 0, set_optimizer_state_dict(broadcast_from_rank0)."""
    r0, r1 = scenario(results, "dcp_fsdp2_full_state_dict")
    for res in (r0, r1):
        assert res["global_step"] == 8 and res["seq"] == res["ref_seq"]
        assert torch.equal(res["params"], res["ref_params"])
    assert_trained_changed_frozen_kept(r0)


@pytest.fixture
def one_process_group():
    """A gloo process group of world size 1 in this process (what FusedLISA's DCP layout keys on)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _dcp_load_plain(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    target = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(target, checkpoint_id=str(path))
    set_model_state_dict(model, target["model"])
    set_optimizer_state_dict(model, opt, target["optim"])


def test_dcp_saved_on_two_ranks_loads_on_one(launch, one_process_group):
    """Consolidated: the 2-rank FSDP2 checkpoint loads into one unsharded process (DCP reshards the DTensor
    rows) and continues as the one-process run over the whole batches."""
    results, out = launch
    saved, _ = scenario(results, "dcp_fsdp2")
    model = MLPStack(W.WIDTH, W.N_LAYERS, seed=1)
    opt = W.make_opt(model, rank=9)
    _dcp_load_plain(out / "dcp_fsdp2", model, opt)
    assert opt._global_step == 3 and opt.active_layers == saved["saved_active"]
    data = W.batches(8)
    seq = W.train(model, opt, data[3:], rank=0, world=1)
    ref_model = MLPStack(W.WIDTH, W.N_LAYERS, seed=0)
    ref_seq = W.train(ref_model, W.make_opt(ref_model, rank=0), data, rank=0, world=1)
    assert seq == ref_seq[3:]
    torch.testing.assert_close(W.flat(model), W.flat(ref_model), rtol=1e-5, atol=1e-6)


def test_dcp_grad_norm_sums_per_rank_refuse_another_world_size(launch, one_process_group):
    """grad_norm under FSDP2 keeps each rank's sums of its shards' squares for the interval in progress:
    a load on another world size fails, naming both world sizes."""
    _, out = launch
    model = MLPStack(W.WIDTH, W.N_LAYERS, seed=1)
    opt = W.make_opt(model, rank=9, sampler="grad_norm")
    with pytest.raises(ValueError, match="saved on 2 ranks .* cannot be loaded on 1 ranks"):
        _dcp_load_plain(out / "dcp_fsdp2_grad_norm", model, opt)


@pytest.mark.parametrize("name", ["deepspeed_zero0", "deepspeed_zero0_bf16_model"])
def test_deepspeed_zero0_steps_fused_lisa(results, name):
    """deepspeed.initialize(model, optimizer=FusedLISA) at ZeRO stage 0 (fp32 model, and a bf16 model with
    DeepSpeed's bf16 off: FusedLISA keeps the fp32 masters): the engine keeps FusedLISA as its optimizer;
    the fp32 run equals one process over the whole batches."""
    r0, r1 = scenario(results, name)
    for res in (r0, r1):
        assert res["engine_optimizer"] == "FusedLISA"
        assert set(res["mem"]) == {res["packed_bytes"]} and res["packed_bytes"] < res["full_bytes"]
    assert_trained_on_active_set_only(r0, r1)
    if name == "deepspeed_zero0":
        model = MLPStack(W.WIDTH, W.N_LAYERS, seed=0)
        seq = W.train(model, W.make_opt(model, rank=0), W.batches(), rank=0, world=1)
        assert r0["seq"] == seq
        torch.testing.assert_close(r0["params"], W.flat(model), rtol=1e-5, atol=1e-6)


def test_trainer_deepspeed_zero0_with_factory(results):
    """TrainingArguments(deepspeed={"zero_optimization": {"stage": 0}}) and FusedLISAFactory: transformers'
    deepspeed_init builds FusedLISA through the factory and DeepSpeed steps it."""
    r0, r1 = scenario(results, "trainer_deepspeed_zero0")
    assert r0["wrapped"] == "DeepSpeedEngine" and r0["global_step"] == r1["global_step"] == 6
    assert_trained_on_active_set_only(r0, r1)  # (rank 0's snapshot: the weights the engine broadcasts)


def test_deepspeed_zero0_with_deepspeed_bf16_is_refused(results):
    r0, r1 = scenario(results, "deepspeed_refused")
    for res in (r0, r1):
        text = res["zero0_bf16"]
        assert text.startswith("FusedLISA cannot run under DeepSpeed ZeRO stage 0 with fp16 or bf16 enabled"), text
        assert "supported instead: DeepSpeed ZeRO stage 0 with fp16 and bf16 disabled" in text and "FSDP2" in text


@pytest.mark.parametrize("name, says", [
    ("zero2_8bit", ["ZeRO stage 2 does not support", "moments='8bit'", "use moments='fp32'"]),
    ("zero3_offload", ["ZeRO stage 3 does not support", "zero_optimization.offload_optimizer", "turn it off"]),
    ("zero2_bf16_model", ["ZeRO stage 2 does not support", "torch.bfloat16 model with DeepSpeed's bf16 off",
                          "bf16: {enabled: true}"])])
def test_what_fused_lisa_does_not_support_under_zero_is_refused(results, name, says):
    """Under ZeRO 1-3 (tests/test_zero_fused.py trains there): the options it does not support, each named
    with the fix, at deepspeed.initialize."""
    r0, r1 = scenario(results, "deepspeed_refused")
    for res in (r0, r1):
        for piece in says:
            assert piece in res[name], res[name]


def test_trainer_deepspeed_refuses_the_optimizers_argument(results):
    """Under DeepSpeed the Trainer would drop optimizers= and train AdamW; LISACallback refuses at init."""
    r0, _ = scenario(results, "trainer_deepspeed_optimizers_refused")
    assert "the Trainer drops that optimizer" in r0["error_text"] and "FusedLISAFactory" in r0["error_text"]


def assert_example_trained(out):
    assert_trained_changed_frozen_kept({"seq": [tuple(out["ever_active"])], "changed": out["changed"]})
    assert out["global_step"] == 6


def test_fsdp2_example(results):
    """examples/train_fsdp2.py: the Trainer and the accelerate loop shard for real (DTensor params) and
    train the active set only; the accelerate loop's DCP checkpoint at step 3 resumes bitwise."""
    r0, r1 = scenario(results, "example_fsdp2")
    for res in (r0, r1):
        for mode in ("trainer", "full", "resumed"):
            assert res[mode]["sharded"], mode
            assert_example_trained(res[mode])
    assert torch.equal(r0["full"]["params"], r1["full"]["params"])
    assert torch.equal(r0["resumed"]["params"], r0["full"]["params"])
    assert r0["resumed"]["losses"] == r0["full"]["losses"][3:]


def test_deepspeed_example(results):
    """examples/train_deepspeed.py: ZeRO-0 through deepspeed.initialize and through the Trainer, and ZeRO-3
    through deepspeed.initialize, train the active set (rank 0 checks its params against the weights the
    engine broadcast)."""
    r0, r1 = scenario(results, "example_deepspeed")
    for mode in ("engine", "trainer", "zero3"):
        assert_example_trained(r0[mode])
        assert torch.equal(r0[mode]["params"], r1[mode]["params"])
