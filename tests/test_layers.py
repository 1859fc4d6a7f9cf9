"""find_layout / block_weight_norms: the block stack of real HF decoders built from tiny configs, plain
modules with layers=, frozen and shared parameters, and the error messages for bad inputs."""
import math
import re

import pytest
import torch
from torch import nn

from lisa_fused.layers import ModelLayout, block_weight_norms, find_layout

transformers = pytest.importorskip("transformers")

N_LAYERS = 3
_DECODER = dict(vocab_size=100, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

# id -> (config factory, expected stack_path, expected number of blocks, tied embedding/head names)
HF_CASES = {
    "llama": (lambda: transformers.LlamaConfig(**_DECODER), "model.layers", N_LAYERS, None),
    "mistral": (lambda: transformers.MistralConfig(**_DECODER), "model.layers", N_LAYERS, None),
    "qwen2": (lambda: transformers.Qwen2Config(**_DECODER), "model.layers", N_LAYERS, None),
    "gemma": (lambda: transformers.GemmaConfig(**_DECODER, head_dim=8), "model.layers", N_LAYERS,
              ("model.embed_tokens.weight", "lm_head.weight")),
    "phi3": (lambda: transformers.Phi3Config(**_DECODER), "model.layers", N_LAYERS, None),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=N_LAYERS, n_head=4,
                                             n_positions=64, **_TOKENS),
             "transformer.h", N_LAYERS, ("transformer.wte.weight", "lm_head.weight")),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=N_LAYERS,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64, **_TOKENS),
                 "gpt_neox.layers", N_LAYERS, None),
    "opt": (lambda: transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=N_LAYERS,
                                           ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                           max_position_embeddings=64, **_TOKENS),
            "model.decoder.layers", N_LAYERS, ("model.decoder.embed_tokens.weight", "lm_head.weight")),
}


def _hf_model(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(HF_CASES[name][0]())


def _check_partition(model, layout):
    """Every trainable Parameter of `model` is listed exactly once in blocks + always, nothing else is,
    and every listed name really names that Parameter."""
    listed = [p for blk in layout.blocks for _, p in blk] + [p for _, p in layout.always]
    trainable = [p for p in model.parameters() if p.requires_grad]  # parameters() dedupes tied weights
    assert len(listed) == len({id(p) for p in listed}), "a Parameter is listed twice"
    assert {id(p) for p in listed} == {id(p) for p in trainable}
    by_name = dict(model.named_parameters(remove_duplicate=False))
    for blk in layout.blocks:
        for name, p in blk:
            assert by_name[name] is p
    for name, p in layout.always:
        assert by_name[name] is p


@pytest.mark.parametrize("arch", list(HF_CASES))
def test_hf_decoder_detected(arch):
    _, stack_path, n_blocks, tied = HF_CASES[arch]
    model = _hf_model(arch)
    layout = find_layout(model)
    assert isinstance(layout, ModelLayout)
    assert layout.stack_path == stack_path
    assert layout.stack is model.get_submodule(stack_path)
    assert layout.num_blocks == len(layout.blocks) == n_blocks
    _check_partition(model, layout)
    for i, blk in enumerate(layout.blocks):
        assert blk, f"block {i} has no parameters"
        assert all(name.startswith(f"{stack_path}.{i}.") for name, _ in blk)
        assert [n for n, _ in blk] == [f"{stack_path}.{i}.{n}" for n, _ in layout.stack[i].named_parameters()]
    always_names = [n for n, _ in layout.always]
    assert not any(n.startswith(stack_path + ".") for n in always_names)
    if tied is not None:
        first, second = tied
        assert model.get_parameter(first) is model.get_parameter(second)
        assert first in always_names and second not in always_names
    # explicit forms agree with detection
    for layers in (stack_path, model.get_submodule(stack_path)):
        explicit = find_layout(model, layers=layers)
        assert explicit.stack_path == stack_path
        assert [[n for n, _ in b] for b in explicit.blocks] == [[n for n, _ in b] for b in layout.blocks]
        assert [n for n, _ in explicit.always] == always_names


def test_gpt2_tied_head_is_one_parameter():
    model = _hf_model("gpt2")
    layout = find_layout(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    hits = [n for n, p in layout.always if p is model.lm_head.weight]
    assert hits == ["transformer.wte.weight"]
    assert [n for n, _ in layout.always] == [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]


class _DDPLike(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


class _WithHead(nn.Module):
    """A user's plain wrapper: a backbone plus its own classification head."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(32, 3)


@pytest.mark.parametrize("wrap, prefix", [
    pytest.param(_DDPLike, "module.", id="ddp_module"),
    pytest.param(lambda m: _DDPLike(_DDPLike(m)), "module.module.", id="ddp_twice"),
    pytest.param(_WithHead, "backbone.", id="plain_wrapper_with_head"),
])
def test_wrapped_model(wrap, prefix):
    model = wrap(_hf_model("llama"))
    layout = find_layout(model)
    assert layout.stack_path == prefix + "model.layers"
    assert layout.num_blocks == N_LAYERS
    assert layout.blocks[0][0][0].startswith(prefix + "model.layers.0.")
    _check_partition(model, layout)
    assert find_layout(model, layers=prefix + "model.layers").stack is layout.stack


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers helper
def test_peft_lora_blocks_hold_only_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_hf_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    layout = find_layout(model)
    assert layout.stack_path == "base_model.model.model.layers" and layout.num_blocks == N_LAYERS
    assert layout.always == ()  # base weights are frozen by peft
    assert all(len(blk) == 4 and all(".lora_" in n for n, _ in blk) for blk in layout.blocks)
    _check_partition(model, layout)


def test_encoder_decoder_picks_larger_stack():
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, **_TOKENS)
    model = transformers.T5ForConditionalGeneration(cfg)
    layout = find_layout(model)
    assert layout.stack_path == "decoder.block"  # decoder blocks also hold cross-attention
    assert layout.num_blocks == 2
    assert any(n.startswith("encoder.block.") for n, _ in layout.always)
    _check_partition(model, layout)


# -- plain modules ----------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)


class Tiny(nn.Module):
    """An embedding, a stack of 4 blocks, a head tied to the embedding, and a small distractor list."""

    def __init__(self, n=4, d=8):
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.heads = nn.ModuleList([nn.Linear(d, 1), nn.Linear(d, 1)])
        self.out = nn.Linear(d, 10, bias=False)
        self.out.weight = self.embed.weight


@pytest.mark.parametrize("layers", ["trunk.blocks", "object", None], ids=["path", "object", "detected"])
def test_plain_module(layers):
    model = Tiny()
    if layers == "object":
        layers = model.trunk.blocks
    layout = find_layout(model, layers=layers)
    assert layout.stack_path == "trunk.blocks" and layout.stack is model.trunk.blocks
    assert layout.num_blocks == 4
    assert [n for n, _ in layout.blocks[2]] == [
        "trunk.blocks.2.fc.weight", "trunk.blocks.2.fc.bias", "trunk.blocks.2.norm.weight", "trunk.blocks.2.norm.bias"]
    assert [n for n, _ in layout.always] == [
        "embed.weight", "heads.0.weight", "heads.0.bias", "heads.1.weight", "heads.1.bias"]
    _check_partition(model, layout)


def test_explicit_stack_may_be_small_or_mixed():
    model = Tiny()
    layout = find_layout(model, layers="heads")  # smaller than the detected stack, but asked for
    assert layout.stack_path == "heads" and layout.num_blocks == 2
    assert len(layout.always) == 1 + 4 * 4  # embedding + all four "blocks"
    mixed = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    layout = find_layout(mixed, layers="")  # the model itself is the stack
    assert layout.stack_path == "" and layout.num_blocks == 3
    assert [n for n, _ in layout.blocks[0]] == ["0.weight", "0.bias"] and layout.blocks[1] == ()
    assert layout.always == ()


def test_sequential_stack_with_named_children():
    model = nn.Module()
    model.emb = nn.Embedding(5, 8)
    model.body = nn.Sequential()
    for name in ("first", "second", "third"):
        model.body.add_module(name, Block())
    layout = find_layout(model)
    assert layout.stack_path == "body" and layout.num_blocks == 3
    assert layout.blocks[1][0][0] == "body.second.fc.weight"


def test_detection_takes_largest_share_not_first():
    model = nn.Module()
    model.small = nn.ModuleList(Block(4) for _ in range(6))  # more blocks, fewer parameters
    model.big = nn.ModuleList(Block(16) for _ in range(2))
    assert find_layout(model).stack_path == "big"


def test_detection_ignores_frozen_state():
    model = Tiny()
    model.trunk.blocks.requires_grad_(False)  # detection is structural; freezing does not move the stack
    layout = find_layout(model)
    assert layout.stack_path == "trunk.blocks"
    assert layout.num_blocks == 4 and all(blk == () for blk in layout.blocks)


# -- frozen and shared parameters -------------------------------------------------------------------------


def test_frozen_params_are_excluded():
    model = Tiny()
    model.embed.weight.requires_grad_(False)  # also freezes the tied head: same Parameter
    model.trunk.blocks[1].requires_grad_(False)  # a fully frozen block
    model.trunk.blocks[2].fc.bias.requires_grad_(False)
    layout = find_layout(model)
    assert layout.num_blocks == 4
    assert layout.blocks[1] == ()
    assert [n for n, _ in layout.blocks[2]] == [
        "trunk.blocks.2.fc.weight", "trunk.blocks.2.norm.weight", "trunk.blocks.2.norm.bias"]
    assert "embed.weight" not in [n for n, _ in layout.always]
    assert "out.weight" not in [n for n, _ in layout.always]
    _check_partition(model, layout)
    norms = block_weight_norms(layout)
    assert norms[1] == 0.0 and norms[0] > 0.0


def test_block_shared_with_outside_raises():
    model = Tiny()
    model.extra = nn.Linear(8, 8)
    model.extra.weight = model.trunk.blocks[3].fc.weight
    with pytest.raises(ValueError, match=r"block 3 and the always-trained part.*trunk\.blocks\.3\.fc\.weight.*extra\.weight"):
        find_layout(model)
    model.trunk.blocks[3].fc.weight.requires_grad_(False)  # frozen: never trained, so sharing is harmless
    find_layout(model)


def test_parameter_shared_between_blocks_raises():
    model = Tiny()
    model.trunk.blocks[2].fc.weight = model.trunk.blocks[0].fc.weight
    with pytest.raises(ValueError, match=r"block 0 and block 2.*trunk\.blocks\.0\.fc\.weight.*trunk\.blocks\.2"):
        find_layout(model)


def test_same_block_twice_raises():
    blk = Block()
    model = nn.Module()
    model.layers = nn.ModuleList([blk, Block(), blk])
    with pytest.raises(ValueError, match=r"block 0 and block 2"):
        find_layout(model)


def test_sharing_inside_one_block_is_fine():
    model = Tiny()
    blk = model.trunk.blocks[0]
    blk.fc2 = nn.Linear(8, 8)
    blk.fc2.weight = blk.fc.weight
    layout = find_layout(model)
    names = [n for n, _ in layout.blocks[0]]
    assert "trunk.blocks.0.fc.weight" in names and "trunk.blocks.0.fc2.weight" not in names
    _check_partition(model, layout)


class _Shortcut(nn.Module):
    """A wrapper that also reaches the block stack (and one block's attention) under names of its own."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.model.layers  # the same ModuleList under a second path
        self.first_attn = model.model.layers[0].self_attn  # a module inside block 0, reached from outside


def test_a_stack_reached_under_two_paths_is_one_stack():
    """Blocks are decided by module identity: the shortcut's names do not make block params "outside"
    (before: "shared between block 0 and the always-trained part ... untie it, or freeze it")."""
    model = _Shortcut(_hf_model("llama"))
    by_path = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    assert by_path["layers.0.mlp.up_proj.weight"] is by_path["model.model.layers.0.mlp.up_proj.weight"]  # two paths
    layout = find_layout(model)
    assert layout.num_blocks == N_LAYERS and layout.stack is model.layers
    _check_partition(model, layout)
    for b, blk in enumerate(layout.blocks):
        assert {id(p) for _, p in blk} == {id(p) for p in model.layers[b].parameters()}
    assert {n for n, _ in layout.always} == {"model.model.embed_tokens.weight", "model.model.norm.weight",
                                              "model.lm_head.weight"}
    explicit = find_layout(model, layers="layers")  # the stack named by its other path: the same blocks
    assert [[id(p) for _, p in b] for b in explicit.blocks] == [[id(p) for _, p in b] for b in layout.blocks]


def test_real_sharing_is_still_refused_when_the_stack_has_two_paths():
    model = _Shortcut(_hf_model("llama"))
    model.model.lm_head.weight = model.model.model.layers[1].mlp.down_proj.weight  # a real tie (shapes differ: fine here)
    with pytest.raises(ValueError, match=r"block 1 and the always-trained part.*down_proj\.weight.*lm_head\.weight"):
        find_layout(model)


# -- block_weight_norms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_weight_norms(dtype):
    model = Tiny().to(dtype)
    layout = find_layout(model)
    norms = block_weight_norms(layout)
    assert len(norms) == 4 and all(isinstance(x, float) for x in norms)
    for i, blk in enumerate(layout.blocks):
        expect = sum(math.sqrt(sum(float(v) ** 2 for v in p.detach().flatten().tolist())) for _, p in blk) / len(blk)
        assert norms[i] == pytest.approx(expect, rel=1e-5)
    with torch.no_grad():
        model.trunk.blocks[3].fc.weight.mul_(10)
    assert block_weight_norms(layout)[3] > norms[3]


# -- bad inputs -------------------------------------------------------------------------------------------


def _no_stack():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


def _foreign_list():
    return nn.ModuleList([Block(), Block()])


BAD_INPUTS = [
    pytest.param(_no_stack, None, ValueError, "ModuleList or nn.Sequential of >= 2 children of the same class",
                 id="no_stack_says_what_was_looked_for"),
    pytest.param(_no_stack, None, ValueError, 'FusedLISA(model, layers="model.layers")', id="no_stack_says_how"),
    pytest.param(lambda: nn.Linear(3, 3), None, ValueError, "found none", id="no_container_at_all"),
    pytest.param(lambda: nn.ModuleList([nn.ReLU(), nn.ReLU()]), None, ValueError, "the model itself (no parameters)",
                 id="parameterless_list_is_not_a_stack"),
    pytest.param(Tiny, "model.layers", ValueError, "'model.layers'", id="missing_path_names_path"),
    pytest.param(Tiny, "model.layers", ValueError, "'trunk.blocks' (ModuleList of 4 x Block",
                 id="missing_path_lists_candidates"),
    pytest.param(Tiny, "embed", ValueError, "resolves to Embedding, not an nn.ModuleList", id="path_to_non_container"),
    pytest.param(lambda: _DDPLike(nn.ModuleList()), "module", ValueError, "empty ModuleList", id="empty_stack"),
    pytest.param(Tiny, _foreign_list(), ValueError, "not inside the model", id="foreign_modulelist"),
    pytest.param(Tiny, [Block(), Block()], TypeError, "got list", id="python_list"),
    pytest.param(Tiny, 3, TypeError, "got int", id="int"),
    pytest.param(Tiny, Block(), TypeError, "got Block", id="plain_module"),
    pytest.param(lambda: "model", None, TypeError, "model must be an nn.Module, got str", id="model_not_module"),
]


@pytest.mark.parametrize("make_model, layers, exc, message", BAD_INPUTS)
def test_bad_inputs(make_model, layers, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        find_layout(make_model(), layers=layers)
