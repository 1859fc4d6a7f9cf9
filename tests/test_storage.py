"""The model stays the user's: FusedLISA never changes what a parameter or gradient *is*.

* every param keeps the storage it had before FusedLISA was built, through construction, backward, step
  and switch (set_to_none True and False), fp32 and bf16; no two params and no two grads share storage;
* the savers that key on storage (accelerate's save_model / save_state, safetensors' save_model,
  save_pretrained with safetensors, torch.save of the state_dict) write complete checkpoints, and a resume
  from each (model weights + FusedLISA's state_dict) continues bitwise like the uninterrupted run;
* a parameter whose shape changes (resize_token_embeddings, tied and untied) is followed: the overlapping
  rows keep their state, new rows start as a fresh AdamW would, and training goes on.
"""
from __future__ import annotations

import pytest
import torch

from lisa_fused import FusedLISA

from helpers import lm_batch, tiny_llama

STEPS, RESUME_AT, SWITCH = 8, 5, 2


def storages(model) -> dict[str, int]:
    return {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}


def assert_own_storage(model, before: dict, when: str) -> None:
    now = storages(model)
    assert now == before, f"{when}: a parameter's storage changed: " + \
        ", ".join(n for n in now if now[n] != before[n])
    seen: dict[int, str] = {}
    for n, p in model.named_parameters():  # (named_parameters lists a tied param once)
        assert p.untyped_storage().data_ptr() not in seen, f"{when}: {n} shares storage with {seen.get(p.untyped_storage().data_ptr())}"
        seen[p.untyped_storage().data_ptr()] = n
    grads: dict[int, str] = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            ptr = p.grad.untyped_storage().data_ptr()
            assert ptr not in grads and ptr not in seen, f"{when}: the grad of {n} shares storage"
            grads[ptr] = n


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_in_place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_params_and_grads_keep_their_own_storage(dtype, set_to_none):
    model = tiny_llama(n_layers=4, dtype=dtype)
    before = storages(model)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FusedLISA(model, lr=1e-2, n_active_layers=1, switch_every=SWITCH, seed=3)
    assert_own_storage(model, before, "after construction")
    seen_active = set()
    for step in range(STEPS):
        seen_active.update(opt.active_layers)
        model(lm_batch(step), labels=lm_batch(step)).loss.backward()
        assert_own_storage(model, before, f"after backward {step}")
        opt.step()
        assert_own_storage(model, before, f"after step {step}" + (" (a switch)" if (step + 1) % SWITCH == 0 else ""))
        opt.zero_grad(set_to_none=set_to_none)
        assert_own_storage(model, before, f"after zero_grad {step}")
    opt.release()
    assert_own_storage(model, before, "after release")
    for n, p in model.named_parameters():  # it trained: the embedding and head, and the blocks it drew
        block = int(n.split(".")[2]) if n.startswith("model.layers.") else None
        moved = not torch.equal(p.detach(), values[n])
        assert moved == (block is None or block in seen_active), n


# ------------------------------------------------------------------------------ checkpoints
def _batches(n):
    return [lm_batch(100 + k) for k in range(n)]


def _train(model, opt, batches):
    for x in batches:
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def _fresh(dtype, seed=0):
    model = tiny_llama(n_layers=4, dtype=dtype, seed=seed)
    return model, FusedLISA(model, lr=1e-2, weight_decay=0.1, n_active_layers=2, switch_every=SWITCH, seed=5,
                            backend="cpu")


def _save_load(how, model, opt, tmp_path, dtype):
    """Save `model` (trained, driven by `opt`) with saver `how` and build a new model from what was written:
    (new model, number of tensors in the file, number the model has)."""
    import safetensors.torch as st

    expected = len(model.state_dict())
    new = tiny_llama(n_layers=4, dtype=dtype, seed=99)  # other values: the load must overwrite them all
    if how == "torch.save":
        torch.save(model.state_dict(), tmp_path / "m.pt")
        sd = torch.load(tmp_path / "m.pt")
        new.load_state_dict(sd)
        return new, len(sd), expected
    if how == "safetensors.save_model":
        st.save_model(model, str(tmp_path / "m.safetensors"))
        missing, unexpected = st.load_model(new, str(tmp_path / "m.safetensors"))
        assert not missing and not unexpected, (missing, unexpected)
        return new, len(st.load_file(str(tmp_path / "m.safetensors"))), expected - _tied(model)
    if how == "save_pretrained":
        from transformers import LlamaForCausalLM

        model.save_pretrained(tmp_path / "hf", safe_serialization=True)
        n = len(st.load_file(str(tmp_path / "hf" / "model.safetensors")))
        # .to(dtype) as tiny_llama does: the rotary inv_freq buffer (not saved) is then bf16 in both models
        return LlamaForCausalLM.from_pretrained(tmp_path / "hf").to(dtype), n, expected - _tied(model)
    if how == "accelerate.save_model":
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        acc.save_model(model, tmp_path / "acc")
        sd = st.load_file(str(tmp_path / "acc" / "model.safetensors"))
        new.load_state_dict(sd, strict=False)
        return new, len(sd), expected - _tied(model)
    raise AssertionError(how)


def _tied(model) -> int:
    return sum(1 for _ in model.state_dict()) - len({t.untyped_storage().data_ptr() for t in model.state_dict().values()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("how", ["torch.save", "safetensors.save_model", "save_pretrained", "accelerate.save_model"])
def test_savers_write_complete_checkpoints_and_resume_bitwise(how, dtype, tmp_path):
    batches = _batches(STEPS)
    ref_model, ref_opt = _fresh(dtype)
    _train(ref_model, ref_opt, batches)

    model, opt = _fresh(dtype)
    _train(model, opt, batches[:RESUME_AT])
    osd = opt.state_dict()
    new, n_saved, n_expected = _save_load(how, model, opt, tmp_path, dtype)
    assert n_saved == n_expected, f"{how} wrote {n_saved} tensors of {n_expected}"
    for (n, p), q in zip(model.state_dict().items(), new.state_dict().values()):
        assert torch.equal(p, q), f"{how}: {n} was not saved exactly"
    opt.release()
    del model, opt
    new_opt = FusedLISA(new, lr=1e-2, weight_decay=0.1, n_active_layers=2, switch_every=SWITCH, seed=5,
                        backend="cpu")
    new_opt.load_state_dict(osd)
    _train(new, new_opt, batches[RESUME_AT:])
    for (n, p), q in zip(ref_model.named_parameters(), new.parameters()):
        assert torch.equal(p, q), f"{how}: resumed run differs at {n}"


def test_accelerate_save_state_load_state_resume_bitwise(tmp_path):
    from accelerate import Accelerator

    batches = _batches(STEPS)
    ref_model, ref_opt = _fresh(torch.float32)
    _train(ref_model, ref_opt, batches)

    acc = Accelerator(cpu=True)
    model, opt = _fresh(torch.float32)
    model, popt = acc.prepare(model, opt)
    _train(model, popt, batches[:RESUME_AT])
    acc.save_state(tmp_path / "state")
    import safetensors.torch as st

    saved = st.load_file(str(tmp_path / "state" / "model.safetensors"))
    assert len(saved) == len(model.state_dict()), f"save_state wrote {len(saved)} of {len(model.state_dict())}"
    opt.release()

    acc2 = Accelerator(cpu=True)
    model2, opt2 = _fresh(torch.float32, seed=99)
    model2, popt2 = acc2.prepare(model2, opt2)
    acc2.load_state(tmp_path / "state")
    _train(model2, popt2, batches[RESUME_AT:])
    for (n, p), q in zip(ref_model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), f"save_state/load_state resume differs at {n}"


# ------------------------------------------------------------------------------ resized parameters
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_token_embeddings_is_followed(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    opt = FusedLISA(model, lr=1e-2, n_active_layers=1, switch_every=2, backend="cpu")
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    emb = model.get_input_embeddings().weight
    before = opt.state[emb]
    model.resize_token_embeddings(64)
    assert model.get_input_embeddings().weight.shape[0] == 64
    x2 = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    old_rows = emb.detach()[:61].clone()
    model(x2, labels=x2).loss.backward()
    opt.step()  # follows the resize: no internal error
    after = opt.state[model.get_input_embeddings().weight]
    assert after["exp_avg"].shape == (64, 32)
    assert int(after["step"]) == int(before["step"]) + 1
    # the old rows kept their moments (decayed by one step), the new rows started from zero
    torch.testing.assert_close(after["exp_avg"][:61], before["exp_avg"] * 0.9
                               + 0.1 * model.get_input_embeddings().weight.grad[:61], rtol=1e-5, atol=1e-8)
    grad_new = model.get_input_embeddings().weight.grad[61:]
    torch.testing.assert_close(after["exp_avg"][61:], 0.1 * grad_new, rtol=1e-5, atol=1e-8)
    assert not torch.equal(model.get_input_embeddings().weight.detach()[:61], old_rows)
    if not tied:
        head = model.get_output_embeddings().weight
        assert head.shape[0] == 64 and opt.state[head]["exp_avg"].shape == (64, 32)
    for _ in range(3):  # and it keeps training, across a switch
        model.zero_grad()
        model(x2, labels=x2).loss.backward()
        opt.step()
