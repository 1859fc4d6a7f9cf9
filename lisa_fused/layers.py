"""Find the structure LISA needs in a model: the stack of transformer blocks, and everything else.

LISA always trains every parameter outside the block stack (embeddings, LM head, final norm, ...) and
samples a few blocks of the stack at a time. `find_layout` splits a model's trainable parameters that
way; `block_weight_norms` summarises each block for the "weight_norm" sampler.

Detection rule (`layers=None`)
------------------------------
Candidates are the modules anywhere in the model's tree (so DDP-style ``.module`` wrappers, peft
wrappers and plain user wrappers are searched through) that are an ``nn.ModuleList`` or an
``nn.Sequential`` with at least 2 children, all of exactly the same class, and that hold at least one
parameter. The stack is the candidate holding the most parameter elements (each Parameter counted once,
frozen ones included, so detection does not depend on what was frozen). Ties go to the candidate met
first in ``model.named_modules()`` order. For encoder-decoder models this picks the larger stack
(the decoder, for T5 and BART); the other stack's parameters are then treated as always-trained.
Pass ``layers=`` to choose a stack yourself.

Which parameters count
----------------------
Only parameters with ``requires_grad=True`` at call time are trainable and listed: a parameter the user
froze beforehand (a frozen embedding, peft's frozen base weights) appears in neither `blocks` nor
`always`. Call `find_layout` before anything (the optimizer included) flips ``requires_grad`` on blocks.
A block whose parameters are all frozen is still a block: it keeps its index, with an empty tuple of
parameters, so block indices always match positions in the stack.

Which block a parameter belongs to is decided by module identity, not by its name: it lies in block i
when a module that registers it is block i (``stack[i]``) or a module inside it, whatever attribute path
reaches that module. So a stack (or a block, or a module inside a block) that the model also reaches
under a second name (a wrapper's shortcut, ``self.blocks = self.model.layers``) is still one stack, and
its parameters are not "outside".

A trainable Parameter reachable under several names is listed once, under its first name in
``model.named_parameters(remove_duplicate=False)`` order (e.g. GPT-2's tied ``transformer.wte.weight``
and ``lm_head.weight`` appear once, as ``transformer.wte.weight``). Sharing is fine inside one block and
outside the stack; a trainable Parameter that modules of a block and of the outside both register, or
modules of two blocks, raises ValueError, since it cannot be both always-trained and sampled (or
sampled twice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelLayout", "find_layout", "block_weight_norms"]

NamedParams = tuple[tuple[str, nn.Parameter], ...]

_USAGE = 'e.g. FusedLISA(model, layers="model.layers") or FusedLISA(model, layers=model.model.layers)'


@dataclass(frozen=True, eq=False)
class ModelLayout:
    """Where a model's trainable parameters sit, as LISA sees them.

    blocks:     one entry per child of the stack, in stack order; each is a tuple of
                (qualified name, Parameter) pairs in ``named_parameters`` order. Names are relative to
                the model given to `find_layout` (``"model.layers.3.mlp.up_proj.weight"``).
    always:     the trainable (name, Parameter) pairs outside the stack, each Parameter once.
    stack_path: dotted path of the stack from the model (``""`` when the model is the stack itself).
    stack:      the stack module (an nn.ModuleList or nn.Sequential); ``stack[i]`` is block i.
    """

    blocks: tuple[NamedParams, ...]
    always: NamedParams
    stack_path: str
    stack: nn.Module

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        sizes = [sum(p.numel() for _, p in blk) for blk in self.blocks]
        always = sum(p.numel() for _, p in self.always)
        return (f"ModelLayout(stack_path={self.stack_path!r}, num_blocks={self.num_blocks}, "
                f"block_numel={sizes}, always={len(self.always)} params / {always} elements)")


def find_layout(model: nn.Module, layers: str | nn.Module | None = None) -> ModelLayout:
    """Split `model`'s trainable parameters into the block stack and the always-trained rest.

    layers: None to detect the stack (see the module docstring for the rule); a dotted path from
    `model` (``"model.layers"``, resolved with ``get_submodule``); or the nn.ModuleList / nn.Sequential
    object itself, which must be inside `model`. An explicit stack may have a single child and mixed
    classes; a detected one may not.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layers is None:
        stack_path, stack = _detect_stack(model)
    elif isinstance(layers, str):
        stack_path, stack = _resolve_path(model, layers)
    elif isinstance(layers, (nn.ModuleList, nn.Sequential)):
        stack_path, stack = _locate_module(model, layers)
    else:
        raise TypeError(
            f"layers must be None, a dotted path (str) or an nn.ModuleList / nn.Sequential inside the "
            f"model, got {type(layers).__name__}; {_USAGE}")
    if len(stack) == 0:
        raise ValueError(f"layers={stack_path!r} is an empty {type(stack).__name__}: no blocks to sample")

    # Which block each trainable Parameter lies in, by module identity (not by name: a stack reached under
    # several attribute paths, a wrapper's shortcut, is one stack), then its names in named_parameters order.
    places = _places(model, stack)
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            params[id(p)] = p
            names.setdefault(id(p), []).append(name)

    blocks: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(stack))]
    always: list[tuple[str, nn.Parameter]] = []
    for key in names:  # dicts keep first-seen order: named_parameters order
        where = places[key]
        if len(where) > 1:
            why = ("it cannot be both always trained and sampled with a block" if None in where
                   else "blocks are sampled independently, so it cannot belong to more than one")
            raise ValueError(
                f"a trainable parameter is shared between "
                f"{' and '.join(_describe_place(x) for x in sorted(where, key=_place_order))} "
                f"under the names {names[key]}: {why}. Untie it, or freeze it (requires_grad=False) first")
        (place,) = where
        entry = (names[key][0], params[key])
        (always if place is None else blocks[place]).append(entry)

    return ModelLayout(blocks=tuple(tuple(b) for b in blocks), always=tuple(always),
                       stack_path=stack_path, stack=stack)


def block_weight_norms(layout: ModelLayout) -> list[float]:
    """Each block's mean weight norm, for the "weight_norm" sampler.

        norm_i = (1 / |P_i|) * sum_{p in P_i} ||p||_F,   ||p||_F = sqrt(sum_j p_j^2)

    where P_i are block i's trainable parameters in `layout` (biases and norm weights included, each
    tensor weighing the same whatever its size). Norms are accumulated in fp32 whatever the storage
    dtype. A block with no trainable parameters gets 0.0.
    """
    flat: list[torch.Tensor] = []
    owner: list[int] = []
    for i, blk in enumerate(layout.blocks):
        for _, p in blk:
            norm = torch.linalg.vector_norm(p.detach(), dtype=torch.float32)
            if hasattr(norm, "full_tensor"):  # an FSDP2 (DTensor) shard: the whole tensor's norm, one all-reduce
                norm = norm.full_tensor()
            flat.append(norm)
            owner.append(i)
    values = host_floats(flat)  # one host transfer per device rather than one sync per parameter
    sums = [0.0] * layout.num_blocks
    counts = [0] * layout.num_blocks
    for i, v in zip(owner, values):
        sums[i] += v
        counts[i] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts)]


def host_floats(values: list[torch.Tensor]) -> list[float]:
    """0-d tensors (on any devices) to host floats, one stacked transfer per device."""
    out = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for j, v in enumerate(values):
        by_device.setdefault(v.device, []).append(j)
    for idx in by_device.values():
        for j, v in zip(idx, torch.stack([values[j] for j in idx]).cpu().tolist()):
            out[j] = v
    return out


# -- stack detection -----------------------------------------------------------------------------------


def _places(model: nn.Module, stack: nn.Module) -> dict[int, set[int | None]]:
    """{id(Parameter): the blocks it lies in (None: outside the stack)} for every trainable Parameter.

    A Parameter lies where the modules that register it (``module._parameters``) lie: in block i if such a
    module is block i or inside it (by identity, whatever path reaches it), outside the stack otherwise (a
    parameter registered on the stack container itself counts as outside). Two places mean real sharing."""
    inside: dict[int, set[int]] = {}  # id(module) -> the blocks it is part of
    for b, blk in enumerate(_children(stack)):
        if blk is not None:
            for m in blk.modules():
                inside.setdefault(id(m), set()).add(b)
    places: dict[int, set[int | None]] = {}
    for m in model.modules():  # each module object once, however many paths reach it
        for p in m._parameters.values():
            if p is not None and p.requires_grad:
                places.setdefault(id(p), set()).update(inside.get(id(m), {None}))
    return places


def _describe_place(place: int | None) -> str:
    return "the always-trained part" if place is None else f"block {place}"


def _place_order(place: int | None) -> int:
    return 1 << 62 if place is None else place  # blocks first, then the outside


def _containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]


def _children(module: nn.Module) -> list[nn.Module | None]:
    """A container's children by position, repeats included (children() skips a repeated module)."""
    return list(module._modules.values())


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts a shared tensor once


def _why_not_candidate(module: nn.Module) -> str | None:
    """None if `module` qualifies as a block stack, else the reason it does not."""
    children = _children(module)
    if len(children) < 2:
        return f"{len(children)} child"
    classes = {type(c) for c in children}
    if len(classes) > 1:
        return "mixed classes " + ", ".join(sorted(c.__name__ for c in classes))
    if _numel(module) == 0:
        return "no parameters"
    return None


def _shape(module: nn.Module) -> str:
    children = _children(module)
    classes = sorted({type(c).__name__ for c in children})
    kind = "/".join(classes) if classes else "nothing"
    return f"{type(module).__name__} of {len(children)} x {kind}, {_numel(module)} params"


def _describe(path: str, module: nn.Module) -> str:
    return f"{path!r} ({_shape(module)})" if path else f"the model itself ({_shape(module)})"


def _candidate_list(model: nn.Module) -> str:
    found = [_describe(n, m) for n, m in _containers(model)]
    if not found:
        return "none"
    more = f", ... ({len(found) - 10} more)" if len(found) > 10 else ""
    return ", ".join(found[:10]) + more


def _detect_stack(model: nn.Module) -> tuple[str, nn.Module]:
    best: tuple[int, str, nn.Module] | None = None
    rejected: list[str] = []
    for path, module in _containers(model):
        why = _why_not_candidate(module)
        if why is not None:
            rejected.append(f"{path!r} ({why})" if path else f"the model itself ({why})")
            continue
        size = _numel(module)
        if best is None or size > best[0]:
            best = (size, path, module)
    if best is None:
        seen = "; containers seen: " + ", ".join(rejected[:10]) if rejected else ""
        raise ValueError(
            f"could not find the stack of transformer blocks in {type(model).__name__}: looked for an "
            f"nn.ModuleList or nn.Sequential of >= 2 children of the same class holding parameters and "
            f"found none{seen}. Pass the stack with layers=, {_USAGE}")
    return best[1], best[2]


def _resolve_path(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"layers={path!r} is not a submodule of {type(model).__name__} ({err}); "
            f"ModuleList/Sequential candidates found: {_candidate_list(model)}") from None
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"layers={path!r} resolves to {type(module).__name__}, not an nn.ModuleList or nn.Sequential of "
            f"blocks; ModuleList/Sequential candidates found: {_candidate_list(model)}")
    return path, module


def _locate_module(model: nn.Module, stack: nn.Module) -> tuple[str, nn.Module]:
    for path, module in model.named_modules():
        if module is stack:
            return path, module
    raise ValueError(
        f"layers= ({_shape(stack)}) is not inside "
        f"the model ({type(model).__name__}); pass a module of this model, or a dotted path. "
        f"ModuleList/Sequential candidates found: {_candidate_list(model)}")
