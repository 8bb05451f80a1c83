"""Activation offloading: the tensors the forward saves for the backward wait in host memory.

TRL's ``activation_offloading`` (``trl.models.activation_offloading``, from torchtune), in its
single-stream form: under :func:`activation_offloading`, every tensor autograd saves that lives
on an accelerator and holds at least ``min_offload_size`` bytes is copied to (pinned) CPU memory
when the forward saves it, and copied back when the backward reads it, so the device holds the
activations of one op at a time in the backward instead of the whole forward's. Kept as they
are: tensors below the threshold (not worth a transfer), tensors off the accelerator, the
model's weights and views of them (they stay on the device anyway: a host copy would free
nothing, and bring back a second device copy in the backward), broadcast views (their copy would
be larger than their storage), and whatever is saved inside the output head or a
:func:`keep_on_device` region — the head runs last in the forward and first in the backward, so
its tensors would go out and come straight back.

The copies run on the current stream, in order with the compute: nothing overlaps. TRL overlaps
them on a side stream (600 more lines of events and stashes); see the note in
:class:`ActivationOffload`.

With activation checkpointing (non-reentrant, as :func:`~rlhf_fast.models.loading.enable_activation_checkpointing`
sets it up) the checkpointed blocks save only their inputs under these hooks, and those are what is
offloaded; the recomputation in the backward runs under the checkpoint's own hooks, which are
innermost, so it is not offloaded again.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, List, Optional, Set

import torch
from torch import nn

# TRL's default (OffloadActivations.min_offload_size): a smaller tensor is not worth a transfer
MIN_OFFLOAD_SIZE = 1024

# Depth of the regions whose saved tensors stay where they are (head modules, keep_on_device):
# thread-local, as the forward that saves them runs on the thread that entered the region
_keep = threading.local()


def _keep_depth() -> int:
    return getattr(_keep, "depth", 0)


@contextlib.contextmanager
def keep_on_device():
    """A region whose saved tensors :func:`activation_offloading` leaves where they are (TRL's
    ``NoOpManager`` around the output head). Nothing happens when no offloading is active, so the
    code that computes an output head may always run under it. Unlike
    ``torch.autograd.graph.disable_saved_tensors_hooks`` it does not raise inside hooks, and
    unlike pushing identity hooks it leaves hooks pushed inside it (activation checkpointing) alone."""
    _keep.depth = _keep_depth() + 1
    try:
        yield
    finally:
        _keep.depth -= 1


def on_accelerator(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on a device whose memory offloading saves: anything but the CPU (and
    ``meta``, which holds no data). The default ``offloadable`` predicate."""
    return t.device.type not in ("cpu", "meta")


def _is_broadcast(t: torch.Tensor) -> bool:
    # an expanded view: a contiguous copy would materialise every repeat
    return any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride()))


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill a span of its storage with no gap, whatever
    the order of its dimensions (a transpose is dense, a slice of columns is not)."""
    expected = 1
    for s, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if s != expected:
            return False
        expected *= n
    return True


def _storage_ptr(t: torch.Tensor) -> Optional[int]:
    t = getattr(t, "_local_tensor", t)  # a DTensor parameter (FSDP2): its local shard
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no accessible storage (a fake or sharded-away tensor)
        return None
    return ptr or None


def _head_modules(model: nn.Module) -> List[nn.Module]:
    """The output heads of ``model`` (inside peft / DDP wrappers) that run as modules: the LM
    head (``get_output_embeddings()``) and a reward model's ``score`` / ``classifier``."""
    from rlhf_fast.models.logprobs import unwrap

    m = unwrap(model)
    heads = []
    out = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    for h in (out, getattr(m, "score", None), getattr(m, "classifier", None)):
        if isinstance(h, nn.Module) and all(h is not k for k in heads):
            heads.append(h)
    return heads


def _enter_head(*_):
    _keep.depth = _keep_depth() + 1


def _leave_head(*_):
    _keep.depth -= 1


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """The saved-tensor hooks of :func:`activation_offloading`; enter it around a forward (and
    its backward, as TRL's ``training_step``: the backward's unpacking does not need it, and
    nothing is packed in it). Re-enterable: one instance serves every step.

    ``offloaded`` / ``offloaded_bytes``: how many saved tensors (and their bytes) went to the host
    since construction; ``kept``: how many stayed where they were.

    On streams: each copy is queued on the current stream, so the device runs each device-to-host
    copy between the forward's kernels and each host-to-device copy just before the backward
    kernel that reads it: the copies' time adds to the step's (the host never blocks). TRL's
    default overlaps them on a second stream, keeping a few activations alive on the device until
    their copy is done; that is the thing to add if a GPU profile shows the copies on the critical
    path (not measured: no GPU was available when this was written)."""

    def __init__(self, model: nn.Module, *, min_offload_size: int = MIN_OFFLOAD_SIZE, pin_memory: bool = True,
                 offloadable: Optional[Callable[[torch.Tensor], bool]] = None):
        self.model = model
        self.min_offload_size = min_offload_size
        self.pin_memory = pin_memory
        self.offloadable = offloadable or on_accelerator
        self.offloaded = self.offloaded_bytes = self.kept = 0
        self._weight_storages: Set[int] = set()
        self._handles = []
        for head in _head_modules(model):
            self._handles.append(head.register_forward_pre_hook(_enter_head))
            self._handles.append(head.register_forward_hook(_leave_head, always_call=True))
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        # read each time: FSDP2 and .to() give the weights new storage between steps
        self._weight_storages = {p for p in map(_storage_ptr, self._weights()) if p is not None}
        return super().__enter__()

    def _weights(self):
        yield from self.model.parameters()
        yield from self.model.buffers()

    def remove(self) -> None:
        """Take the head-region hooks off the model's head modules."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _is_weight(self, t: torch.Tensor) -> bool:
        """A parameter, a view of one (a Linear saves ``weight.t()``), or a tensor on the storage
        of a parameter or buffer: it stays on the device whatever we do."""
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return True
        return _storage_ptr(t) in self._weight_storages

    def _keeps(self, t: torch.Tensor) -> bool:
        return (_keep_depth() > 0 or type(t) is not torch.Tensor or t.layout != torch.strided
                or not self.offloadable(t) or t.nbytes < self.min_offload_size
                or self._is_weight(t) or _is_broadcast(t))

    def _pack(self, t: torch.Tensor):
        # (type(t) is not torch.Tensor also keeps parameters, subclasses such as DTensor and
        # float8 tensors, as TRL does, whose copies would not be theirs)
        if self._keeps(t):
            self.kept += 1
            # with saved-tensor hooks autograd no longer checks at the backward that a saved
            # tensor was not changed in place since ("modified by an inplace operation"): a kept
            # tensor is the live one, so its version is kept to check as plain autograd does
            return t, t._version
        pin = self.pin_memory and t.device.type != "cpu"
        # a dense tensor keeps its strides (so the backward's kernels see what they saw); a
        # strided view with gaps comes back contiguous, as in TRL
        if _is_dense(t):
            host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
        else:
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        # Asynchronous copy on the current stream, then the device tensor is let go: safe because
        # the copy is queued after the kernels that wrote t (stream order), and the caching
        # allocator hands t's block only to later work on this same stream, which runs after the
        # copy. The pinned block comes from the caching host allocator, which records the copy's
        # event and does not reuse the block before it completes; the host never reads it.
        host.copy_(t.detach(), non_blocking=True)
        self.offloaded += 1
        self.offloaded_bytes += t.nbytes
        return host, t.device

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        t, where = packed
        if not isinstance(where, torch.device):  # kept: (the tensor, its version when saved)
            if t._version != where:
                raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an "
                                   f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
                                   f"expected version {where} instead (under activation_offloading)")
            return t
        host, device = packed
        # Queued on the current stream, which autograd sets to the stream of the node's forward
        # (where the copy out was queued), before the backward kernels that read it; dropping
        # host right after is safe by the host allocator's recorded event (see _pack).
        return host.to(device, non_blocking=True)


def activation_offloading(model: nn.Module, *, min_offload_size: int = MIN_OFFLOAD_SIZE, pin_memory: bool = True,
                          offloadable: Optional[Callable[[torch.Tensor], bool]] = None) -> ActivationOffload:
    """A context manager under which the forward's saved activations wait in host memory until
    the backward (TRL's ``get_act_offloading_ctx_manager``, single stream).

    ``model``: its parameters and buffers (and views of them) are never offloaded, and what its
    output head saves stays too: hooks on ``get_output_embeddings()`` and a ``score`` /
    ``classifier`` head mark their forward as a :func:`keep_on_device` region (a head computed
    without calling its module is kept only inside such a region of its own). A saved tensor goes to
    the host when it lives where ``offloadable(tensor)`` holds (default :func:`on_accelerator`:
    any device but the CPU) and holds at least ``min_offload_size`` bytes (int >= 0, TRL's 1024);
    ``pin_memory``: into pinned host memory (faster, asynchronous copies). Dtypes and shapes come
    back as they went; values bit for bit. A kept tensor changed in place between the forward and
    the backward raises autograd's own error ("modified by an inplace operation"), as without the
    hooks; an offloaded one comes back with the values the forward saved.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_offload_size, bool) or not isinstance(min_offload_size, int) or min_offload_size < 0:
        raise ValueError(f"min_offload_size must be an int >= 0 (bytes), got {min_offload_size!r}")
    if not isinstance(pin_memory, bool):
        raise TypeError(f"pin_memory must be a bool, got {type(pin_memory).__name__}")
    if offloadable is not None and not callable(offloadable):
        raise TypeError(f"offloadable must be a callable tensor -> bool or None, got {type(offloadable).__name__}")
    return ActivationOffload(model, min_offload_size=min_offload_size, pin_memory=pin_memory, offloadable=offloadable)


def offloads_on(device: torch.device) -> bool:
    """Whether activations produced on ``device`` would be offloaded (:func:`on_accelerator`)."""
    return on_accelerator(torch.empty(0, device=device))


__all__ = ["ActivationOffload", "activation_offloading", "keep_on_device", "on_accelerator", "offloads_on",
           "MIN_OFFLOAD_SIZE"]
