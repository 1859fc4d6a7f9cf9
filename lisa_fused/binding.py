"""Parameters <-> packed storage: bind, unbind, gradient views, collection, and the checks that the
binding still holds.

FusedLISA trains a parameter by making its `.data` a view into the packed buffer (PackedBuffers.param)
and, while autograd writes its gradient, its `.grad` a view into PackedBuffers.grad. Three things can
break that binding behind the optimizer's back; each is handled here:

* the model is moved or converted (`model.to(...)`, `.half()`, `.cuda()`; the Hugging Face Trainer calls
  `model.to(torch.device("cpu", 0))`): `Module._apply` keeps the Parameter objects and gives them new
  `.data`. `moved()` notices it (one data_ptr per bound param); rebuild.follow_move fills new buffers
  and `repoint()` binds the params to them.
* gradients written by someone else (a new `.grad` tensor, DDP, a manual assignment, `p.grad.data = g`,
  another dtype or device, a non-contiguous tensor): `collect()` notices that `.grad` is not the view it
  handed out (the same object, still over the same memory, contiguous) and copies it into the packed
  buffer. The binding keeps a private view of each grad slot, so a `.data` swap on the handed-out view
  cannot redirect the copy. Which params step follows torch exactly: a param steps iff its `.grad` is not
  None at step().
* another FusedLISA on the same parameters: `claim()` refuses while the other one lives, and takes the
  user's requires_grad flags back from one that was dropped without `release()`.

FSDP2 params (DTensors over FSDP's own storage) are bound by copy instead (`copy_mode`): their `.data` is
never re-pointed; grads are copied in and updated values copied back by the optimizer.
"""
from __future__ import annotations

import gc
import math
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .packing import PackedBuffers, PackedState

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: no DTensor params to meet
    DTensor = ()

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Parameter -> (weakref to the ParamBinding driving it, the requires_grad flag the user had).
_OWNERS = WeakIdKeyDictionary()


def local(t):
    """The rank-local tensor of a DTensor (an FSDP2 shard; its own storage under no_grad), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def claim_check(named_params) -> None:
    """Before a new FusedLISA looks at `requires_grad`: refuse params another live FusedLISA drives, and
    give back the user's flags on params a dropped (never released) one had frozen.

    Raises RuntimeError naming the first such param and `release()`.
    """
    stale = []
    for name, p in named_params:
        entry = _OWNERS.get(p)
        if entry is None:
            continue
        if entry[0]() is not None:
            gc.collect()  # an optimizer the user dropped may only be waiting in a reference cycle
        if entry[0]() is not None:
            raise RuntimeError(
                f"parameter {name!r} is driven by another live FusedLISA (its data and grad are views into "
                "that optimizer's packed buffers, and it froze the blocks it does not train): call "
                "release() on that optimizer first (or delete it), then build the new one")
        stale.append((p, entry[1]))
    for p, flag in stale:
        p.requires_grad_(flag)
        del _OWNERS[p]


class ParamBinding:
    """Which packed offset each trained parameter views, and the operations that keep it true.

    names, params, shapes: the trained parameters (param index i = position in these lists), their
    names and their (rank-local) shapes. state: packing.PackedState (its buffers are replaced by
    `repoint`); param i lives in the buffers of its partition, `state.buffers_of(i)`.
    copy_mode: FSDP2 DTensor params, bound by copy. The optimizer decides *where* (offsets); this class
    does the re-pointing and checking, and records each param's requires_grad flag for `release()`
    (`user_flags`: those flags, when `params` replace Parameter objects FusedLISA had already frozen).
    """

    def __init__(self, names, params, shapes, state: PackedState, copy_mode: bool, user_flags=None):
        self.names, self.params, self.shapes = names, params, shapes
        self.state = state
        self.copy_mode = copy_mode
        self.offset: dict[int, int] = {}  # bound param -> offset in its partition's buffers
        self._ptr: dict[int, int] = {}  # bound param -> data_ptr of its .data view
        self._gview: dict[int, torch.Tensor] = {}  # bound param -> private view of its grad slot
        self._pub: dict[int, torch.Tensor] = {}  # bound param -> the grad view handed out as .grad
        self._grad_ptr: dict[int, int] = {}  # bound param -> data_ptr of its grad slot
        self._hooks: dict[int, object] = {}
        self._check = None  # (bound params, their expected data_ptrs), rebuilt after a re-binding
        self._version: dict[int, int] = {}  # copy mode: bound param -> its shard's version counter when last synced
        me = weakref.ref(self)
        for k, p in enumerate(params):
            _OWNERS[p] = (me, p.requires_grad if user_flags is None else user_flags[k])

    def user_flags(self) -> list[bool]:
        """The requires_grad flag each param had before FusedLISA froze anything (what release() restores)."""
        return [_OWNERS[p][1] if p in _OWNERS else p.requires_grad for p in self.params]

    @property
    def bufs(self) -> PackedBuffers:
        """The buffers when there is one partition (one state format), else ValueError."""
        if len(self.state.bufs) != 1:
            raise ValueError(f"{len(self.state.bufs)} partitions (state formats {[str(f) for f in self.state.formats]}): "
                             "use state.bufs[k] or state.buffers_of(i)")
        return self.state.bufs[0]

    @property
    def device(self) -> torch.device:
        return self.state.bufs[0].param.device

    @property
    def dtype(self) -> torch.dtype:
        return self.state.bufs[0].param.dtype

    # -- binding ----------------------------------------------------------------------------------
    def view(self, buf, i, off):
        return buf[off:off + math.prod(self.shapes[i])].view(self.shapes[i])

    def bind(self, i, off, write_master):
        """Point param i's data (and its grad, if it has one) at offset `off` of its partition, copying its
        value in. A low-precision model's fp32 master is written only when asked: on a switch the slot's
        master still holds the leaving block's, which the store pages out first."""
        p = self.params[i]
        bufs = self.state.buffers_of(i)
        view = self.view(bufs.param, i, off)
        view.copy_(local(p).detach())
        if write_master and bufs.lowp is not None and bufs.master is not None:
            self.view(bufs.master, i, off).copy_(view)
        self.offset[i] = off
        self._check = None
        self._gview[i] = gv = self.view(bufs.grad, i, off)
        self._grad_ptr[i] = gv.data_ptr()
        if self.copy_mode:  # p keeps its own storage; step() copies grads in and values back
            self._version[i] = local(p)._version
            return
        p.data = view
        self._ptr[i] = view.data_ptr()
        if p.grad is not None:  # torch semantics: an existing grad stays a grad (now in the buffer)
            gv.copy_(p.grad)
            p.grad = self._public(i)
        if p.requires_grad and i not in self._hooks:
            self._hooks[i] = p.register_hook(_lazy_grad_hook(weakref.ref(self), i))

    def _public(self, i) -> torch.Tensor:
        """A fresh view of param i's grad slot to hand out as `.grad` (the private one stays ours)."""
        gv = self._gview[i]
        self._pub[i] = pub = gv.view(gv.shape)
        return pub

    def unbind(self, i):
        """Give param i storage of its own again (its packed slot is about to be reused)."""
        p = self.params[i]
        if not self.copy_mode:  # (in copy mode p's own storage already holds its latest value)
            p.data = p.detach().clone()
        p.grad = None
        self._drop(i)

    def _drop(self, i):
        del self.offset[i]
        self._version.pop(i, None)
        self._ptr.pop(i, None)
        self._grad_ptr.pop(i, None)
        self._gview.pop(i, None)
        self._pub.pop(i, None)
        hook = self._hooks.pop(i, None)
        if hook is not None:
            hook.remove()
        self._check = None

    def lazy_grad(self, i):
        """Autograd is about to accumulate into param i: if its .grad is None, make it a zeroed view into
        the packed buffer first, so backward writes there (no allocation, no copy at step)."""
        p = self.params[i]
        if p.grad is None:
            gv = self._gview.get(i)
            if gv is not None and p.data_ptr() == self._ptr.get(i):  # (a moved param is left to step())
                gv.zero_()
                p.grad = self._public(i)

    # -- gradients --------------------------------------------------------------------------------
    def is_view(self, i, g) -> bool:
        """True when `g` (param i's .grad) is the view this binding handed out, still over its slot."""
        return g is self._pub.get(i) and g.data_ptr() == self._grad_ptr[i] and g.is_contiguous()

    def collect(self, i) -> bool:
        """True iff param i has a gradient (torch's rule: `.grad is not None`), now in the packed buffer.
        A `.grad` that is not the handed-out view (a new tensor, a swapped `.data`, DDP's bucket view,
        another dtype/device, non-contiguous) is copied in, and `.grad` becomes the packed view again.
        RuntimeError naming the param for a gradient of another shape (nothing is changed)."""
        p = self.params[i]
        g = p.grad
        if g is None:
            return False
        if not self.copy_mode and self.is_view(i, g):
            return True
        src = local(g)
        if tuple(src.shape) != tuple(self.shapes[i]):
            raise RuntimeError(f"parameter {self.names[i]!r} has a .grad of shape {tuple(src.shape)}, but the "
                               f"parameter is {tuple(self.shapes[i])}: assign a gradient of the parameter's shape")
        self._gview[i].copy_(src)
        if not self.copy_mode:
            p.grad = self._public(i)
        return True

    def write_back(self, parts, enabled) -> None:
        """Copy mode, after the kernel: each stepped param's updated value from its packed segment into its
        own (FSDP2) storage. parts: per partition (Segments, param indices); enabled: which segments stepped."""
        for (segments, seg_params), on in zip(parts, enabled):
            for i, (off, n), e in zip(seg_params, segments.bounds, on):
                if e:
                    t = local(self.params[i])
                    t.copy_(self.state.buffers_of(i).param[off:off + n].view(self.shapes[i]))
                    self._version[i] = t._version

    def reread(self, force: bool = False) -> None:
        """Copy mode: give the packed params the values now in the params' own (FSDP2) storage, which someone
        may have written since the last step (a checkpoint loaded into the shards after construction, as the
        Trainer's and torch.distributed.checkpoint's resumes do); that value wins. Params without an fp32
        master of a low-precision param (or `force`, at load_state_dict): every bound param, one foreach copy
        per partition (no sync). With fp32 masters of low-precision params, re-reading the rounded params every
        step would lose the masters' precision, so between loads only params whose version counter moved (an
        in-place write through the param itself) are re-read, and their masters with them."""
        for k, bufs in enumerate(self.state.bufs):
            masters = bufs.lowp is not None and bufs.master is not None
            mine = [i for i in self.offset if self.state.part_of[i] == k]
            idx = mine if (force or not masters) else [i for i in mine
                                                       if local(self.params[i])._version != self._version.get(i)]
            if not idx:
                continue
            src = [local(self.params[i]).detach() for i in idx]
            torch._foreach_copy_([self.view(bufs.param, i, self.offset[i]) for i in idx], src)
            if masters:
                torch._foreach_copy_([self.view(bufs.master, i, self.offset[i]) for i in idx], src)
            for i, t in zip(idx, src):
                self._version[i] = t._version

    @torch.no_grad()
    def adopt_written_params(self) -> None:
        """Before the first step, with fp32 masters of low-precision params: a packed param that differs from
        its rounded master was written after construction (DeepSpeed's and DDP's broadcast of rank 0's weights
        into `.data`, weights loaded into the model), so its value becomes the master. (The masters equal the
        params at construction; re-checking every step would cost a pass over the buffers.)"""
        if self.copy_mode:
            self.reread(force=True)
            return
        chunk = 1 << 24  # ~11 B of temporaries per element: at most ~180 MB at a time, whatever the model
        for b in self.state.bufs:
            if b.master is None or b.lowp is None:
                continue
            for start in range(0, b.master.numel(), chunk):
                m, lp = b.master[start:start + chunk], b.lowp[start:start + chunk]
                m.copy_(torch.where(lp != m.to(lp.dtype), lp.float(), m))

    def check_grad_shapes(self, indices) -> None:
        """Before any state changes in step(): every .grad of params `indices` has its param's shape
        (RuntimeError naming the first that does not, as collect() would raise half-way)."""
        for i in indices:
            g = self.params[i].grad
            if g is not None and tuple(g.shape) != tuple(self.shapes[i]) and \
                    tuple(local(g).shape) != tuple(self.shapes[i]):
                raise RuntimeError(f"parameter {self.names[i]!r} has a .grad of shape {tuple(g.shape)}, but the "
                                   f"parameter is {tuple(self.shapes[i])}: assign a gradient of the parameter's shape")

    def zero_grad(self, set_to_none: bool):
        """torch.optim.Optimizer.zero_grad semantics over all trained params: None, or zeros in place."""
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        for bufs in self.state.bufs:
            bufs.grad.zero_()  # every bound view at once
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None and (self.copy_mode or g.data_ptr() != self._grad_ptr.get(i)):
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()

    # -- checks -----------------------------------------------------------------------------------
    def moved(self) -> bool:
        """True if a bound param no longer views its packed slot (the model was moved or converted).
        One data_ptr per bound param; in copy mode a dtype/device comparison per param."""
        if self.copy_mode:
            dev, dt = self.device, self.dtype
            return any(p.dtype != dt or p.device != dev for p in self.params)
        if self._check is None:
            idx = sorted(self._ptr)
            self._check = ([self.params[i] for i in idx], [self._ptr[i] for i in idx])
        bound, ptrs = self._check
        return list(map(torch.Tensor.data_ptr, bound)) != ptrs

    def check_unbound(self) -> None:
        """Before a switch binds parked params: all of them must still match the buffers (a partial
        model.to() that moved only inactive blocks would otherwise be undone silently). Raises
        RuntimeError naming the param (see target())."""
        dev, dt = self.device, self.dtype
        if any(p.dtype != dt or p.device != dev for p in self.params):
            self.target()
            raise RuntimeError(  # all params moved together while no bound param did: cannot happen
                f"FusedLISA: parameters moved to {local(self.params[0]).dtype} on {local(self.params[0]).device} "
                "but the bound ones did not")

    def target(self) -> tuple[torch.device, torch.dtype]:
        """Where the params went: the one device and dtype all of them now share. Raises RuntimeError
        naming a param that differs, or a dtype the kernels do not support, and the fix."""
        first = local(self.params[0])
        dev, dt = first.device, first.dtype
        for name, p in zip(self.names, self.params):
            t = local(p)
            if t.device != dev or t.dtype != dt:
                raise RuntimeError(
                    f"FusedLISA: parameter {name!r} is {t.dtype} on {t.device} but {self.names[0]!r} is {dt} on "
                    f"{dev}: a partial model.to() left the trained parameters on mixed devices/dtypes; move the "
                    "whole model to one device and dtype (or opt.release(), convert, and build a new FusedLISA)")
        if dt not in SUPPORTED_DTYPES:
            raise RuntimeError(
                f"FusedLISA: parameter {self.names[0]!r} was converted to {dt}, which the fused AdamW kernels do "
                f"not support ({', '.join(map(str, SUPPORTED_DTYPES))}): convert the model back (e.g. "
                "model.float()), or opt.release() and build a new optimizer for it")
        if self.copy_mode and (dev != self.device or dt != self.dtype):
            raise RuntimeError(
                f"FusedLISA: FSDP2 parameter {self.names[0]!r} moved to {dt} on {dev} (was {self.dtype} "
                f"on {self.device}); FusedLISA cannot follow a move of sharded params: move the model "
                "before fully_shard() and before building FusedLISA")
        return dev, dt

    # -- following a move ---------------------------------------------------------------------------
    def repoint(self, news: list[PackedBuffers]) -> None:
        """Make `news` (same layout, new device/dtype; rebuild.py filled them) the buffers and re-point every
        bound param's data and grad at them; an existing `.grad` (converted by Module._apply) is copied in."""
        self.state.bufs = news
        for i in sorted(self.offset):
            off, p, new = self.offset[i], self.params[i], news[self.state.part_of[i]]
            grad = p.grad
            p.grad = None
            self._drop(i)
            self.offset[i] = off
            p.data = self.view(new.param, i, off)
            self._ptr[i] = p.data_ptr()
            self._gview[i] = gv = self.view(new.grad, i, off)
            self._grad_ptr[i] = gv.data_ptr()
            if p.requires_grad:
                self._hooks[i] = p.register_hook(_lazy_grad_hook(weakref.ref(self), i))
            if grad is not None:
                gv.copy_(grad)
                p.grad = self._public(i)
        self._check = None

    # -- hand the model back ----------------------------------------------------------------------
    def release(self):
        """Every param gets its own storage (and its grad, if any, its own copy), the user's requires_grad
        flag back, no hooks, and no owner."""
        for i in list(self.offset):
            p = self.params[i]
            grad = p.grad
            if not self.copy_mode:
                p.data = p.detach().clone()
            self._drop(i)
            p.grad = None if grad is None else grad.detach().clone()
        for p in self.params:
            entry = _OWNERS.get(p)
            if entry is not None and entry[0]() is self:
                p.requires_grad_(entry[1])
                del _OWNERS[p]


def _lazy_grad_hook(ref, i):
    """A tensor hook (runs before AccumulateGrad) holding only a weak reference to the binding, so the
    hook never keeps a dropped optimizer alive."""
    def hook(_grad):
        binding = ref()
        if binding is not None:
            binding.lazy_grad(i)
    return hook
