"""The final hidden state of a Llama-style backbone (Llama, Mistral, Qwen2, Qwen3) without
the transformers forward, for log-probs, values and the policy update.

The same operations as transformers' modules, called on the modules' own weights, with two
autograd functions that keep less for the backward:

- :class:`_RMSNormFn` saves the norm's input and the per-row ``rstd`` ``[N, 1]``, where the
  module's composite formula also keeps the normalised copy ``[N, H]``;
- :class:`_SwiGLUDownFn` computes ``down(silu(gate) · up)`` and saves ``gate`` and ``up``
  only, recomputing ``silu(gate) · up`` in the backward, where the modules keep ``silu(gate)``
  and the product too (two ``[N, intermediate]`` tensors per layer).

At Qwen2-0.5B's layer shapes that is 46% less activation memory per layer in the update,
for one extra elementwise pass in the backward. On CPU tensors of float32, bfloat16 or float16
the RMSNorm (forward and backward), the SwiGLU backward and RoPE on q / k (forward and
backward, :class:`_RoPEFn`) run as C++ kernels (csrc/cpu/train_layer.cpp): one pass where torch
takes a chain of elementwise ops, forwards bit for bit, gradients within rounding (1 thread,
h = 64, 16 × 37 tokens: the forward + backward 7.3 -> 6.0 ms). Elsewhere (float64, CUDA,
mixed dtypes under autocast, a backward run with ``create_graph``), and under
``use_backend("torch")``, the torch code runs. The
per-call work that does not depend on the layer (mask construction from a 2-D attention
mask, RoPE tables, output dataclasses, module calls) is done once or not at all.

The log-prob paths read the states before response tokens only: :func:`hidden_states` with
``columns`` / ``select`` skips the columns after the last of them and, in the last layer, the
queries before the first (CPU) and everything after attention outside the selected positions
(a DPO step at h = 64, V = 256, 1 thread: 63 -> 50 ms, the same loss to 6 digits). A packed
row (:class:`PackedSegments`: DPO's ``padding_free``, SFT's ``packing``) with ``select`` runs the
last layer's queries from each sequence's first selected position on (:meth:`PackedSegments.queries_from`):
a DPO step, 8 pairs, prompts of 512 tokens, responses 65-129, h = 64, 2 layers, V = 256, 1 thread,
median of 12: 424 -> 274 ms, the padded step's 284.

A packed row whose structure position ids cannot express, pairs sharing a prompt (DPO's and the
reward trainer's ``prefix_sharing``: ``[prompt, chosen, rejected]``, the rejected tokens attending
to the prompt and themselves only), takes a :class:`SharedPrefixSegments` (``segments=``): per
pair one causal sdpa over prompt + chosen and one over the prompt's and rejected's keys for the
rejected queries, and with ``select`` the last layer's queries from the first selected one of each
piece only (a DPO step, 8 pairs, prompts of 512 tokens, responses 65-129, h = 64, 2 layers,
V = 256, 1 thread, min of 12 alternating steps: 218 -> 144 ms, 71 -> 53 MiB extra peak). No transformers forward takes it: where this module does
not run, the callers refuse ``prefix_sharing``.

:func:`supported` says when a backbone is one this module computes exactly as transformers
does (plain ``nn.Linear`` projections, the families' own RMSNorm / MLP classes, sdpa or
eager attention, no hooks but FSDP2's, no sliding window shorter than the input); anything
else (peft adapters, kernel-library modules) runs the transformers forward, and so does
everything under ``rlhf_fast.ops.use_backend("torch")``. Activation checkpointing set up by
transformers (``gradient_checkpointing_enable``) is kept, in eval mode too when it is
non-reentrant: each layer runs under the checkpoint function transformers holds for it. Under DDP (without
``find_unused_parameters``) and FSDP2 this forward runs as the forward of the wrapper's call,
and each FSDP2-sharded layer as that layer's (:func:`call_as_forward`), so the wrappers'
gathering and gradient reduction are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

_BACKBONES = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")
_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_SILUS = ("SiLUActivation", "SiLU")


# --------------------------------------------------------------------------- C++ kernels

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _kernels():
    """The ops of csrc/cpu/train_layer.cpp (``rms_norm_fwd``, ``rms_norm_bwd``, ``silu_mul``,
    ``swiglu_bwd_``, ``rope`` as attributes), or None when rlhf_fast._C is not built or predates them."""
    from ..ops import _native

    if not _native.has_native():
        return None
    try:
        if not torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_fast::rope", "CPU"):
            return None
    except RuntimeError:  # no such op: a build older than these kernels
        return None
    for name, fake in _FAKES.items():
        _native.register_meta_and_autograd(name, fake)
    ops = torch.ops.rlhf_fast
    return types.SimpleNamespace(**{name: getattr(ops, name).default for name in _FAKES})


def _kernels_for(*tensors):
    """:func:`_kernels` when they run ``tensors`` (CPU, one dtype of float32 / bfloat16 /
    float16) and the torch backend is not forced, else None."""
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in _NATIVE_DTYPES or any(t.dtype != t0.dtype for t in tensors):
        return None
    from ..ops import _dispatch

    if _dispatch.forced_backend() == "torch":
        return None
    return _kernels()


def _rms_fwd_fake(x, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(*x.shape[:-1], 1, dtype=torch.float32))


def _rms_bwd_fake(grad, x, weight, rstd, need_dx, need_dw):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape[-1] if need_dw else 0))


def _rope_fake(q, k, cos, sin_signed, backward):
    def like(x):
        B, H, T, d = x.shape
        return x.new_empty(B, T, H, d).transpose(1, 2)

    return like(q), like(k)


_FAKES = {
    "rms_norm_fwd": _rms_fwd_fake,
    "rms_norm_bwd": _rms_bwd_fake,
    "silu_mul": lambda gate, up: torch.empty_like(gate, memory_format=torch.contiguous_format),
    "swiglu_bwd_": lambda grad, gate, up: torch.empty_like(gate, memory_format=torch.contiguous_format),
    "rope": _rope_fake,
}


# --------------------------------------------------------------------------- autograd functions


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    # transformers' norms compute in float32; float64 (tests, gradcheck) keeps its precision
    return torch.promote_types(x.dtype, torch.float32)


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """transformers' Llama RMSNorm (float32 statistics; weight times the normalised input cast
    back to x's dtype) and the per-row rstd ``[..., 1]`` (float32, float64 for float64 x)."""
    kernels = _kernels_for(x, weight)
    if kernels is not None:  # the same values (its row sums are at::sum's): [592, 64] 25 -> 15 us
        return kernels.rms_norm_fwd(x, weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and hasattr(torch.ops.aten, "_fused_rms_norm"):
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)  # one pass, same values
    xf = x.to(_stat_dtype(x))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm over the last dim that saves only its input and the rstd for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # in x's own precision whatever autocast says, as the module's ops (all on autocast's
        # float32 list or promoting) compute it
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                y, rstd = _rms_forward(x, weight, eps)
        else:
            y, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        # the C++ kernel, unless the backward is to be differentiated again (create_graph)
        kernels = None if torch.is_grad_enabled() else _kernels_for(x, weight, gy)
        if kernels is not None and rstd.dtype == torch.float32:
            need_dx, need_dw = ctx.needs_input_grad[:2]
            dx, dw = kernels.rms_norm_bwd(gy, x, weight, rstd, need_dx, need_dw)
            return dx if need_dx else None, dw if need_dw else None, None
        rstd = rstd.reshape(*x.shape[:-1], 1)  # [..., 1] whichever kernel produced it
        # y = w · x̂, x̂ = x · rstd: dx = rstd · (g·w - x̂ · mean(g·w·x̂)), dw = Σ_rows g·x̂
        acc = _stat_dtype(x)
        xh = x.to(acc) * rstd  # fresh buffers (xh, gw) are reused in place below
        gf = gy.to(acc)
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (gf * xh).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gw = gf * weight.to(acc)
            dot = (gw * xh).mean(-1, keepdim=True)
            dx = gw.sub_(xh.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dw, None


class _SwiGLUDownFn(torch.autograd.Function):
    """``F.linear(silu(gate) · up, weight, bias)`` that saves gate and up (not silu(gate) nor
    the product) and recomputes the product in the backward."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        act = F.silu(gate)  # a fresh buffer: the product in place, one [N, intermediate] buffer less
        return F.linear(act.mul_(up) if act.dtype == torch.promote_types(act.dtype, up.dtype) else act * up,
                        weight, bias)

    @staticmethod
    def backward(ctx, gy):
        gate, up, weight = ctx.saved_tensors
        # Under autocast the forward's matmul ran in a lower precision than the float32 weight
        # (gy's dtype); autocast is off in a backward, so the casts are explicit here
        w = weight.to(gy.dtype)
        up = up.to(gate.dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        kernels = None if torch.is_grad_enabled() else _kernels_for(gate, up)
        if kernels is not None:
            return _swiglu_backward_native(ctx, kernels, gy, gy2, gate, up, weight, w)
        act = F.silu(gate)
        d_gate = d_up = d_w = d_b = None
        if ctx.needs_input_grad[2]:
            d_w = gy2.t().mm((act * up).reshape(-1, up.shape[-1]).to(gy.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            d_b = gy2.sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # in place where a buffer is dead, so at most two [N, intermediate] temporaries are
            # live at once: this is where the update's memory peaks (all activations still held)
            d_prod = gy.matmul(w).to(gate.dtype)  # [..., intermediate]
            if ctx.needs_input_grad[1]:
                d_up = act.mul_(d_prod)  # act is not needed after this
            if ctx.needs_input_grad[0]:
                d_gate = torch.ops.aten.silu_backward.grad_input(d_prod.mul_(up), gate, grad_input=d_prod)
        return d_gate, d_up, d_w, d_b


def _swiglu_backward_native(ctx, kernels, gy, gy2, gate, up, weight, w):
    """:class:`_SwiGLUDownFn`'s backward with the C++ kernels: the product for the weight's
    gradient in one pass, then d_gate (in place of d_prod) and d_up in another; at most two
    ``[N, intermediate]`` temporaries live at once, as in the torch code."""
    d_gate = d_up = d_w = d_b = None
    if ctx.needs_input_grad[2]:
        prod = kernels.silu_mul(gate, up)
        d_w = gy2.t().mm(prod.reshape(-1, up.shape[-1]).to(gy.dtype)).to(weight.dtype)
        del prod
    if ctx.has_bias and ctx.needs_input_grad[3]:
        d_b = gy2.sum(0)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        d_prod = gy.matmul(w).to(gate.dtype)  # [..., intermediate], a fresh buffer
        d_up = kernels.swiglu_bwd_(d_prod, gate, up)
        d_gate = d_prod  # overwritten with d_gate
    return (d_gate if ctx.needs_input_grad[0] else None, d_up if ctx.needs_input_grad[1] else None, d_w, d_b)


class _RoPEFn(torch.autograd.Function):
    """RoPE (:func:`_rope`) on q and k by the C++ kernel, forward and backward (the transposed
    map: ``g·cos + roll(g·sin_signed)``); cos / sin_signed get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin_signed):
        ctx.save_for_backward(cos, sin_signed)
        return _rope_native(_kernels(), q, k, cos, sin_signed, False)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin_signed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable torch ops
            half = cos.shape[-1] // 2
            dq, dk = (g * c + torch.roll(g * s, half, -1)
                      for g, (c, s) in ((gq, _tail(cos, sin_signed, gq.shape[2])), (gk, (cos, sin_signed))))
        else:
            dq, dk = _rope_native(_kernels(), gq, gk, cos, sin_signed, True)
        return dq, dk, None, None


def _tail(cos: torch.Tensor, sin_signed: torch.Tensor, n: int):
    """The RoPE tables ``[.., T, d]`` of the last ``n`` positions (q's, when q holds only the
    last columns of k's; see :func:`_layer`)."""
    T = cos.shape[-2]
    return (cos, sin_signed) if n == T else (cos[..., T - n:, :], sin_signed[..., T - n:, :])


def _rope_native(kernels, q, k, cos, sin_signed, backward: bool):
    """The C++ RoPE of q ``[B, heads, Tq, d]`` and k ``[B, kv_heads, T, d]`` with cos /
    sin_signed ``[B or 1, 1, T, d]``; q holds the last ``Tq <= T`` positions of k's."""
    Tq = q.shape[2]
    if Tq == k.shape[2] or _rope_takes_tails():
        return kernels.rope(q, k, cos, sin_signed, backward)
    # a build whose kernel wants q, k and the tables of one length: each tensor on its own
    cq, sq = _tail(cos, sin_signed, Tq)
    return kernels.rope(q, q, cq, sq, backward)[0], kernels.rope(k, k, cos, sin_signed, backward)[0]


@functools.lru_cache(maxsize=None)
def _rope_takes_tails() -> bool:
    """Whether the C++ RoPE takes q / k shorter than the tables (the last positions of them)."""
    z = torch.zeros(1, 1, 2, 2)
    try:
        _kernels().rope(z[:, :, 1:], z, z, z, False)
    except (RuntimeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- support check


def _transformers_class(cls: type, names) -> bool:
    """``cls`` is one of transformers' own classes ``names``, not a same-named copy (remote
    code: ``transformers_modules.*``) whose forward may compute something else."""
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def _is_silu(act: nn.Module) -> bool:
    """``act`` is transformers' SiLUActivation or torch's nn.SiLU (not a same-named copy)."""
    cls = type(act)
    return cls.__name__ in _SILUS and cls.__module__.startswith(("transformers.", "torch.nn."))


def _plain_class(module: nn.Module, names, fsdp: bool = False) -> bool:
    """``module`` is one of the transformers classes ``names`` (:func:`_transformers_class`)
    with its own forward (not an instance-level replacement) and no hooks; with ``fsdp``,
    FSDP2's hooks are allowed (a sharded decoder layer: :func:`hidden_states` runs them
    through :func:`call_as_forward`)."""
    if not _transformers_class(_own_class(module), names) or "forward" in module.__dict__:
        return False
    if _fsdp_module(module) and not fsdp:
        return False
    forward_hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    return (all(_is_fsdp_hook(module, h) or idle_transformers_hook(h) for h in forward_hooks)
            and not module._backward_hooks and not module._backward_pre_hooks)


def _no_hooks(module: nn.Module) -> bool:
    """No forward or backward hooks on ``module`` (the functions below would skip them)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _own_class(module: nn.Module) -> type:
    """The class of ``module``, seen through the subclass ``fully_shard`` swaps in
    (``FSDP<Name>(FSDPModule, <Name>)``)."""
    cls = type(module)
    if _fsdp_module(module) and len(cls.__bases__) == 2:
        return cls.__bases__[1]
    return cls


def idle_transformers_hook(hook) -> bool:
    """Whether ``hook`` is one of transformers' output-capturing hooks: the first forward asked
    for hidden states or attentions installs them on the layers for good, and they record only
    inside such a forward (never inside ours, which calls no module), so they must not turn the
    fast path off for the rest of the run."""
    return (getattr(hook, "__module__", None) or "").startswith("transformers.utils.output_capturing")


def _is_fsdp_hook(module: nn.Module, hook) -> bool:
    # FSDP2's pre/post-forward hooks are bound methods of its per-module state object
    return _fsdp_module(module) and type(getattr(hook, "__self__", None)).__name__ == "FSDPState"


def call_as_forward(module: nn.Module, fn, *args):
    """``fn(*args)`` run as the forward of ``module`` through ``module.__call__``, so that the
    hooks of a DDP or FSDP2 wrapper run around it as around the module's own forward (DDP:
    buffer sync before, reducer preparation after; FSDP2: parameters gathered before,
    resharded after, gradient reduction hooked on ``args`` and the output)."""
    # DDP calls its inner module's forward; FSDP2's hooks sit on the module itself
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    if "forward" in inner.__dict__:
        raise ValueError("call_as_forward: the module already has an instance-level forward, which this call "
                         "would bypass")
    inner.forward = fn  # an instance attribute shadows the class's forward for this one call
    try:
        return module(*args)
    finally:
        del inner.forward


def _plain_linear(module: nn.Module) -> bool:
    """A bare ``nn.Linear``: no subclass, hooks or forward replaced on the instance (the
    functions below compute it from its weights, so they would skip any of those)."""
    return type(module) is nn.Linear and "forward" not in module.__dict__ and _no_hooks(module)


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def supported(base: nn.Module, seq_len: int) -> bool:
    """Whether :func:`hidden_states` computes ``base`` (a transformers backbone: LlamaModel,
    MistralModel, Qwen2Model, Qwen3Model) for ``seq_len``-token inputs exactly as its own
    forward does; False sends the caller to that forward."""
    from ..ops import _dispatch

    if _dispatch.forced_backend() == "torch" or not _plain_class(base, _BACKBONES) or _global_hooks():
        return False
    cfg = base.config
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager") or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    window = getattr(cfg, "sliding_window", None)
    if window is not None and seq_len > window:
        return False
    if base.training and getattr(cfg, "attention_dropout", 0.0):
        return False
    if getattr(base, "gradient_checkpointing", False) and _checkpoint_fn(base) is None:
        return False  # checkpointing on, but no function of transformers' to run a layer under
    if type(base.embed_tokens) is not nn.Embedding or "forward" in base.embed_tokens.__dict__ or \
            not _plain_class(base.norm, _RMS_NORMS):
        return False
    rotary = getattr(base, "rotary_emb", None)  # one per backbone (transformers >= 4.45)
    if rotary is None or rotary._forward_hooks or rotary._forward_pre_hooks:
        return False
    for layer in base.layers:
        a, mlp = layer.self_attn, layer.mlp
        if not (_plain_class(layer, _LAYERS, fsdp=True) and _plain_class(a, _ATTENTIONS)
                and _plain_class(mlp, _GATED_MLPS)):
            return False
        if not (_plain_class(layer.input_layernorm, _RMS_NORMS) and _plain_class(layer.post_attention_layernorm,
                                                                                  _RMS_NORMS)):
            return False
        if not all(_plain_linear(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj,
                                              mlp.down_proj)):
            return False
        if not _is_silu(mlp.act_fn) or not _no_hooks(mlp.act_fn) or \
                not (hasattr(a, "head_dim") and hasattr(a, "scaling")):
            return False
        if a.training and getattr(a, "attention_dropout", 0.0):
            return False  # transformers drops attention weights in a training-mode attention module
        for qk in ("q_norm", "k_norm"):  # Qwen3's per-head norms
            if hasattr(a, qk) and not _plain_class(getattr(a, qk), _RMS_NORMS):
                return False
        if getattr(a, "sliding_window", None) is not None and seq_len > a.sliding_window:
            return False
    return True


# --------------------------------------------------------------------------- forward


def _rms(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _RMSNormFn.apply(x, module.weight, float(module.variance_epsilon))


def _first_queries(lengths: Sequence[int], cols: torch.Tensor) -> List[int]:
    """Per piece of ``lengths`` (consecutive slices of a row), the offset in it of the first of
    the positions ``cols`` ``[N]`` int64 it holds, its length where it holds none (one sync)."""
    lengths = torch.tensor(lengths, dtype=torch.long, device=cols.device)
    ends = lengths.cumsum(0)
    piece = torch.searchsorted(ends, cols, right=True)
    return lengths.clone().scatter_reduce_(0, piece, cols - (ends - lengths)[piece], "amin").tolist()


class PackedSegments:
    """The attention "mask" of one packed row (``B == 1``, position ids restarting per
    sequence): the sequences' ``lengths`` in order. :func:`_attention` runs causal sdpa on each
    sequence's slice instead of one dense ``[T, T]`` block-diagonal mask, whose cost grows with
    T² (for a row of many short sequences, most of it spent on scores the mask then drops).
    ``first_queries`` (:meth:`queries_from`, set for the last layer of a ``select`` forward):
    per sequence, the first query computed; the outputs before it are zeros."""

    def __init__(self, lengths: List[int], seq: torch.Tensor):
        self.lengths = lengths
        self._seq = seq  # [1, T] sequence index of each position
        # per sequence, the first query whose output is needed; None: all of them
        self.first_queries: Optional[List[int]] = None

    def queries_from(self, cols: torch.Tensor) -> "PackedSegments":
        """The same sequences, their attention computing only the queries each needs for the
        positions ``cols`` ``[N]`` int64 (from each sequence's first such position on, the rows
        before it left 0; none for a sequence without one): the last layer of a ``select``
        forward, whose other rows are dropped (a DPO row's prompts cost their keys only)."""
        out = PackedSegments(self.lengths, self._seq)
        out.first_queries = _first_queries(self.lengths, cols)
        return out

    def dense(self) -> torch.Tensor:
        """The equivalent bool mask ``[1, 1, T, T]``: causal within each sequence."""
        T = self._seq.shape[-1]
        keys = (self._seq[:, :, None] == self._seq[:, None, :])[:, None]
        return keys & torch.ones(T, T, dtype=torch.bool, device=self._seq.device).tril_()


class SharedPrefixSegments:
    """The attention structure of one packed row (``B == 1``) of shared-prefix groups, which
    position ids cannot express: ``groups`` ``[(p, (l_1, l_2, ...)), ...]`` in row order, each
    laid out as ``[prefix (p tokens), branch 1 (l_1), branch 2 (l_2), ...]``. A prefix token
    attends to the prefix (causal); a branch token to the whole prefix and to its own branch
    (causal), never to another branch; each branch's position ids continue from the prefix's
    end (``p, p + 1, ...``), so each branch's states are those of ``prefix + branch`` as a row of
    its own. DPO's ``prefix_sharing``: a pair's prompt once, then chosen, then rejected
    (:func:`rlhf_fast.models.logprobs.pack_shared_rows`); the RL trainer's ``ppo.prefix_sharing``:
    a prompt once, then each of its group's answers. A group with ``p == 0`` is its
    branches as independent sequences; an empty branch (length 0) takes no token.

    :func:`_attention` runs, per group, one causal sdpa over ``prefix + branch 1`` and, for
    each further branch, its queries over ``cat(prefix, branch)`` keys with the mask causal
    aligned to the last key (a ``[l, p + l]`` block, not the dense ``[T, T]`` one).
    ``first_queries`` (:meth:`queries_from`, set for the last layer of a ``select`` forward):
    per piece, the first query computed; the outputs before it are zeros."""

    def __init__(self, groups: Sequence[Tuple[int, Sequence[int]]]):
        norm = []
        for g in groups:
            try:
                p, branches = int(g[0]), tuple(int(n) for n in g[1])
            except (TypeError, ValueError, IndexError):
                raise TypeError(f"groups must be (prefix length, (branch lengths, ...)) pairs, got {g!r}") from None
            if p < 0 or any(n < 0 for n in branches):
                raise ValueError(f"group lengths must be >= 0, got {g!r}")
            norm.append((p, branches))
        self.groups = norm
        self.total = sum(p + sum(b) for p, b in norm)
        # per piece (see pieces()), the first query whose output is needed; None: all of them
        self.first_queries: Optional[List[int]] = None

    def pieces(self) -> List[int]:
        """The lengths of the row's pieces, in order: per group ``p + l_1`` (the prefix and the
        first branch, one causal block), then ``l_2, l_3, ...``."""
        return [n for p, b in self.groups for n in (p + (b[0] if b else 0), *b[1:])]

    def queries_from(self, cols: torch.Tensor) -> "SharedPrefixSegments":
        """The same structure, its attention computing only the queries each piece needs for the
        positions ``cols`` ``[N]`` int64 (from each piece's first such position on, the rows
        before it left 0): the last layer of a ``select`` forward, whose other rows are dropped."""
        out = SharedPrefixSegments.__new__(SharedPrefixSegments)
        out.groups, out.total = self.groups, self.total
        out.first_queries = _first_queries(self.pieces(), cols)
        return out

    @property
    def max_len(self) -> int:
        """The longest row a branch (or a prefix alone) stands for: ``p + max(l_i)``."""
        return max((p + max(b, default=0) for p, b in self.groups), default=0)

    def position_ids(self, device=None) -> torch.Tensor:
        """``[1, T]`` int64: each prefix ``0 .. p-1``, each branch ``p .. p + l - 1``."""
        parts = [torch.arange(n, device=device) + (p if i else 0)
                 for p, b in self.groups for i, n in enumerate((p, *b))]
        return torch.cat(parts)[None] if parts else torch.zeros(1, 0, dtype=torch.long, device=device)

    def dense(self, device=None) -> torch.Tensor:
        """The equivalent bool mask ``[1, 1, T, T]``: key j is visible to query i when both are in
        one group, j is a prefix token or in i's branch, and j's position is not after i's."""
        group, branch = [], []
        for gi, (p, b) in enumerate(self.groups):
            for bi, n in enumerate((p, *b)):
                group += [gi] * n
                branch += [bi] * n  # 0: the prefix
        g = torch.tensor(group, dtype=torch.long, device=device)
        br = torch.tensor(branch, dtype=torch.long, device=device)
        pos = self.position_ids(device)[0]
        keys = (g[:, None] == g[None]) & ((br[None] == 0) | (br[:, None] == br[None])) & (pos[None] <= pos[:, None])
        return keys[None, None]


def _shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: SharedPrefixSegments,
                             scale: float) -> torch.Tensor:
    """:func:`_attention` under :class:`SharedPrefixSegments` (``q [1, heads, T, d]``, ``k, v [1,
    kv_heads, T, d]``): per group, one causal sdpa of prefix + first branch, then each further
    branch's queries over the prefix's and its own keys (prefix all visible, the branch causal).
    With ``seg.first_queries`` only each piece's queries from that one on (the rows before: 0)."""
    gqa = q.shape[1] != k.shape[1]
    lengths = seg.pieces()
    firsts = iter(seg.first_queries or [0] * len(lengths))
    # one split into the pieces: its backward is one cat, where a slice per piece would
    # zero-fill a [T]-long gradient each (quadratic in the number of pairs)
    pieces = zip(*(t.split(lengths, 2) for t in (q, k, v)))
    parts: List[torch.Tensor] = []
    for p, branches in seg.groups:
        qa, ka, va = next(pieces)
        _piece_attention(parts, qa, ka, va, next(firsts), scale, gqa)
        for _ in branches[1:]:
            qb, kb, vb = next(pieces)
            first = next(firsts)
            if p and first < qb.shape[2]:  # the prefix's keys, then the branch's own
                kb, vb = torch.cat([ka[:, :, :p], kb], 2), torch.cat([va[:, :, :p], vb], 2)
            _piece_attention(parts, qb, kb, vb, first, scale, gqa)
    return torch.cat(parts, 2)


def _piece_attention(parts: List[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int,
                     scale: float, gqa: bool) -> None:
    """Appends to ``parts`` the attention output ``[1, heads, l, d]`` of a piece's ``l`` queries,
    the last ``l`` of its keys (causal aligned to the last key): zeros for the queries before
    ``first``, then those from ``first`` on."""
    n = q.shape[2]
    if first:
        parts.append(q.new_zeros(q.shape[0], q.shape[1], min(first, n), v.shape[3]))
    if first < n:
        parts.append(_tail_attention(q[:, :, first:] if first else q, k, v, scale, gqa))


def _lower_right_bias(device: torch.device) -> bool:
    """Whether :func:`_tail_attention` passes torch's lower-right causal bias (off the CPU) rather
    than a bool mask (on the CPU)."""
    return device.type != "cpu"


def _tail_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, gqa: bool) -> torch.Tensor:
    """sdpa of ``m`` queries, the last ``m`` positions of the ``n >= m`` keys, causal aligned to
    the last key (query i sees keys up to n − m + i). On the CPU a bool ``[m, n]`` mask (its
    kernel takes a mask at no extra cost); elsewhere torch's lower-right causal bias, which keeps
    sdpa on its fused kernels with no mask tensor."""
    m, n = q.shape[2], k.shape[2]
    if m == n or m == 1:  # plain causal; one query sees every key
        return F.scaled_dot_product_attention(q, k, v, is_causal=m > 1, scale=scale, enable_gqa=gqa)
    if not _lower_right_bias(q.device):
        mask = torch.ones(m, n, dtype=torch.bool, device=q.device).tril_(n - m)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    if gqa:  # the fused kernels behind the bias take no grouped heads on every build
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(m, n), scale=scale)


def _key_mask(attention_mask: Optional[torch.Tensor], position_ids: torch.Tensor,
              T: int) -> Union[None, torch.Tensor, PackedSegments]:
    """The bool mask ``[B, 1, T, T]`` transformers builds for sdpa, or None where plain causal
    attention (sdpa's ``is_causal``) gives every attended position the same result, or, for
    one packed row, its :class:`PackedSegments`.

    With a 2-D attention mask: causal, and only attended keys (None when no row has a real
    token after a padding one). Without one, position ids that
    restart mark packed sequences (transformers' ``find_packed_sequence_indices``): causal
    within each. A query with no key to attend (a left-padding token) gets zeros from sdpa
    (torch >= 2.5), as in transformers.
    """
    device = position_ids.device
    if attention_mask is not None:
        am = attention_mask.bool()
        # no padding, or right padding only (SFT / reward / DPO batches): a real token's causal
        # keys are all real, so plain causal attention gives every real position the masked
        # result (sdpa's flash kernel instead of the masked one, no [B, 1, T, T] mask); a padding
        # position's output differs but reaches no real position and no loss
        if not bool((am[:, 1:] & ~am[:, :-1]).any()):
            return None
        keys = am[:, None, None, :]  # [B, 1, 1, T]
    else:
        first = position_ids[:, :1] - 1
        seq = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)  # [B, T]
        if not bool(seq[:, -1].any()):
            return None
        if seq.shape[0] == 1:
            return PackedSegments(torch.bincount(seq[0]).tolist(), seq)
        keys = (seq[:, :, None] == seq[:, None, :])[:, None]  # [B, 1, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril_()
    return keys & causal


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' ``x·cos + rotate_half(x)·sin`` with the negation of rotate_half's first
    half carried by ``sin_signed`` (exact), so rotate_half is a roll."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


def _rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
    """:func:`_rope` of ``q [B, heads, Tq, d]`` and ``k [B, kv_heads, T, d]`` (q: the last
    ``Tq <= T`` positions of k's; cos / sin_signed ``[B or 1, 1, T, d]`` are k's), by the C++
    kernel where it runs them (the same values; its outputs are laid out as [B, T, heads, d])."""
    kernels = _kernels_for(q, k, cos, sin_signed)
    if kernels is None or cos.requires_grad or sin_signed.requires_grad:
        return _rope(q, *_tail(cos, sin_signed, q.shape[2])), _rope(k, cos, sin_signed)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RoPEFn.apply(q, k, cos, sin_signed)
    return _rope_native(kernels, q, k, cos, sin_signed, False)


def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: PackedSegments,
                      scale: float) -> torch.Tensor:
    """:func:`_attention` under :class:`PackedSegments` (``q [1, heads, T, d]``, ``k, v [1,
    kv_heads, T, d]``): one causal sdpa per sequence; with ``seg.first_queries`` each sequence's
    queries from that one on only (the rows before: 0)."""
    gqa = q.shape[1] != k.shape[1]
    pieces = zip(*(t.split(seg.lengths, 2) for t in (q, k, v)))
    if seg.first_queries is None:
        parts = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=qi.shape[2] > 1, scale=scale,
                                                enable_gqa=gqa) for qi, ki, vi in pieces]
    else:
        parts = []
        for (qi, ki, vi), first in zip(pieces, seg.first_queries):
            _piece_attention(parts, qi, ki, vi, first, scale, gqa)
    return torch.cat(parts, 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Union[None, torch.Tensor, PackedSegments, SharedPrefixSegments],
               scale: float, repeat_kv: Optional[bool] = None) -> torch.Tensor:
    """sdpa of ``q [B, heads, T, d]`` over ``k, v [B, kv_heads, T, d]`` under ``mask`` (None:
    causal; :class:`PackedSegments`: causal within each sequence, one sdpa per sequence;
    :class:`SharedPrefixSegments`: per group, :func:`_shared_prefix_attention`).
    Grouped KV heads go to sdpa as they are (``enable_gqa``) except with a mask off the CPU
    (``repeat_kv=None``): CUDA's masked kernels take no grouped heads and sdpa would fall back
    to its math kernel, so the KV heads are repeated there, as transformers does."""
    if isinstance(mask, SharedPrefixSegments):
        return _shared_prefix_attention(q, k, v, mask, scale)
    if isinstance(mask, PackedSegments):
        return _packed_attention(q, k, v, mask, scale)
    if repeat_kv is None:
        repeat_kv = mask is not None and q.device.type != "cpu"
    if repeat_kv and q.shape[1] != k.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def hidden_states(base: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor], columns: Optional[Tuple[int, int]] = None,
                  select: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                  segments: Optional[SharedPrefixSegments] = None) -> torch.Tensor:
    """The final hidden state ``[B, T, H]`` (after the final norm, in the model's dtype) of a
    backbone for which :func:`supported` holds: ``base(input_ids, attention_mask,
    position_ids).last_hidden_state`` at every attended position, differentiable in the
    weights. input_ids ``[B, T]`` int; attention_mask ``[B, T]`` 0/1 or None; position_ids
    ``[B, T]`` or ``[1, T]`` int64, or None for ``0 .. T-1``.

    ``columns`` ``(a, b)``, ``0 <= a < b <= T``: only the states of columns ``[a, b)``,
    ``[B, b - a, H]`` (the log-prob head reads only the positions before response tokens).
    Attention is causal, so columns from ``b`` on are not computed at all, and the last layer
    computes its queries, attention output, MLP and the final norm on ``[a, b)`` only (its keys
    and values on ``[0, b)``): the same operations on fewer rows, so the same values up to
    float rounding (matmuls of other shapes may round differently).

    ``select`` ``(rows, cols)``, int64 index tensors ``[N]``: only the states
    ``h[rows, cols]`` ``[N, H]``, cols counted from ``a`` (the columns' start, 0 without
    ``columns``); the last layer then computes everything after its attention on those N rows
    only.

    The last layer's queries start at ``a`` on the CPU only: elsewhere its attention stays on
    sdpa's causal (flash) kernel over every column, which a mask for the shorter queries would
    take it off, and the columns before ``a`` are dropped after it.

    ``segments``: a :class:`SharedPrefixSegments` for a packed row (``B == 1``, attention_mask
    None, ``segments.total == T``) whose structure position ids cannot express (position_ids
    None: ``segments.position_ids()``); attention follows it (with ``columns`` cutting the row,
    through its dense mask)."""
    B, T = input_ids.shape
    if segments is not None:
        position_ids = _check_segments(segments, B, T, attention_mask, position_ids, input_ids.device)
    q0 = shift = 0
    # the RoPE tables of the whole row, cut below with the columns: dynamic and LongRoPE
    # frequencies depend on the call's longest position, as in transformers' forward of the row
    rope_pos, rope_T = position_ids, T
    if columns is not None:
        a, b = (int(c) for c in columns)
        if not 0 <= a < b <= T:
            raise ValueError(f"columns must be (a, b) with 0 <= a < b <= {T}, got {columns!r}")
        if b < T:
            input_ids = input_ids[:, :b]
            attention_mask = attention_mask[:, :b] if attention_mask is not None else None
            position_ids = position_ids[..., :b] if position_ids is not None else None
            T = b
        q0 = a if _short_queries(input_ids.device) else 0
        shift = a - q0  # columns still to drop after the last layer
        if select is not None and shift:
            select = (select[0], select[1] + shift)
    # the module itself, so that its hooks run: transformers' activation checkpointing adds one
    # that makes the embeddings require grad (enable_input_require_grads)
    h = base.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device)[None]
    position_ids = position_ids.expand(B, T)
    if rope_pos is None:
        rope_pos = torch.arange(rope_T, device=input_ids.device)[None]
    cos, sin = base.rotary_emb(h, rope_pos.expand(B, rope_T))  # [B, rope_T, d] in h's dtype
    cos, sin = (cos, sin) if rope_T == T else (cos[:, :T], sin[:, :T])
    half = cos.shape[-1] // 2
    cos, sin = cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, None]  # [B, 1, T, d]
    if segments is None:
        mask = _key_mask(attention_mask, position_ids, T)
    else:  # a row cut by columns: the dense rows and keys of the columns kept
        mask = segments if T == segments.total else segments.dense(input_ids.device)[..., :T, :T]
    layers = base.layers[:base.config.num_hidden_layers]  # as transformers: a shortened config drops layers
    last_mask = mask
    if isinstance(mask, (SharedPrefixSegments, PackedSegments)) and select is not None and q0 == 0 and \
            select[1].numel():
        last_mask = mask.queries_from(select[1])  # the last layer's queries: those select needs only
    for i, layer in enumerate(layers):
        run = _layer
        args = (cos, sin, mask) if (q0 == 0 and select is None) or i < len(layers) - 1 else \
            (cos, sin, last_mask, q0, select)
        ckpt = _checkpoint_fn(layer) or _checkpoint_fn(base)
        if ckpt is not None and torch.is_grad_enabled() and (layer.training or _non_reentrant(ckpt)) and \
                (getattr(layer, "gradient_checkpointing", False) or getattr(base, "gradient_checkpointing", False)):
            # transformers' activation checkpointing, with its function (and so the user's
            # use_reentrant choice): the layer's input kept, the layer recomputed in the backward.
            # Also in eval mode when non-reentrant, unlike transformers: an RL policy is kept in
            # eval mode (no dropout) while it trains, and recomputing changes no value (the
            # reentrant checkpoint would refuse autograd.grad, which transformers allows there).
            run = functools.partial(ckpt, run)
        if _fsdp_module(layer):  # sharded: gathered by its hooks for the forward and again for the backward
            # (hooks outside the checkpoint, as transformers does, so they do not run twice)
            h = call_as_forward(layer, lambda x, layer=layer, run=run, args=args: run(layer, x, *args), h)
        else:
            h = run(layer, h, *args)
    if not len(layers):  # no layer to drop the leading columns and pick the rows
        h = h[:, q0:] if q0 else h
        h = h[select] if select is not None else h
    if select is None and shift:
        h = h[:, shift:]
    return _rms(base.norm, h)


def _check_segments(segments, B: int, T: int, attention_mask, position_ids, device) -> torch.Tensor:
    """ValueError unless ``segments`` fits a ``[B, T]`` input (one row of ``segments.total``
    tokens, no attention mask); returns the position ids (``segments.position_ids()`` when None)."""
    if not isinstance(segments, SharedPrefixSegments):
        raise TypeError(f"segments must be a SharedPrefixSegments, got {type(segments).__name__}")
    if B != 1 or T != segments.total or attention_mask is not None:
        raise ValueError(f"segments describe one packed row of {segments.total} tokens without an attention mask, "
                         f"got input [{B}, {T}] and attention_mask {'set' if attention_mask is not None else 'None'}")
    return segments.position_ids(device) if position_ids is None else position_ids


def _short_queries(device: torch.device) -> bool:
    """Whether the last layer of a ``columns`` forward takes the queries of those columns only
    (with a causal mask aligned to the last key): on the CPU, whose sdpa kernel takes the mask
    at no extra cost."""
    return device.type == "cpu"


def _non_reentrant(ckpt) -> bool:
    return isinstance(ckpt, functools.partial) and ckpt.keywords.get("use_reentrant") is False


@functools.lru_cache(maxsize=None)
def _forward_reads_training(cls: type) -> bool:
    """Whether the ``forward`` of the layer class ``cls`` reads ``self.training`` itself (e.g. a
    functional dropout); True when its source cannot be read."""
    import inspect

    try:
        return "self.training" in inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):
        return True


@contextlib.contextmanager
def checkpointing_in_eval(model: nn.Module):
    """transformers' activation checkpointing of ``model``'s layers in eval mode too, as
    :func:`hidden_states` runs it, for a forward through transformers' own code (GPT-2, flash
    attention, MoE, ...): transformers checkpoints a layer only in training mode, and an RL
    policy (and critic) trains in eval mode (no dropout), so ``gradient_checkpointing`` did
    nothing there. Within the block each checkpointed decoder layer (non-reentrant, whose own
    forward reads no ``self.training``) is flagged training — the layer alone: its dropout and
    attention modules stay in eval mode, so no value changes — and put back after. Nothing
    changes without gradients, checkpointing or an eval-mode layer."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: its layers checkpoint through the model's forward
        GradientCheckpointingLayer = ()
    flipped = [m for m in model.modules()
               if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer) and not m.training
               and getattr(m, "gradient_checkpointing", False) and _non_reentrant(_checkpoint_fn(m))
               and not _forward_reads_training(type(m))] if torch.is_grad_enabled() else []
    for m in flipped:
        m.training = True
    try:
        yield
    finally:
        for m in flipped:
            m.training = False


def _checkpoint_fn(module: nn.Module):
    """The activation-checkpointing function transformers set on ``module`` (a partial of
    ``torch.utils.checkpoint.checkpoint``), or None."""
    fn = getattr(module, "_gradient_checkpointing_func", None)
    return fn if callable(fn) else None


def _layer(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           mask: Optional[torch.Tensor], q0: int = 0, select=None) -> torch.Tensor:
    """One decoder layer on ``h [B, T, H]`` (a function, so its intermediates die with it);
    with ``q0 > 0`` the output of columns ``[q0, T)`` only, ``[B, T - q0, H]`` (keys and values
    of every column, queries and everything after attention of those columns); with ``select``
    ``(rows, cols)`` (cols counted from q0) the output ``[N, H]`` of those positions only,
    everything after attention computed on them alone."""
    B, T = h.shape[:2]
    a = layer.self_attn
    d = a.head_dim
    x = _rms(layer.input_layernorm, h)
    Tq = T - q0
    q = F.linear(x[:, q0:] if q0 else x, a.q_proj.weight, a.q_proj.bias).view(B, Tq, -1, d)
    k = F.linear(x, a.k_proj.weight, a.k_proj.bias).view(B, T, -1, d)
    v = F.linear(x, a.v_proj.weight, a.v_proj.bias).view(B, T, -1, d)
    del x  # without autograd nothing else holds these: drop each as soon as it is used
    if hasattr(a, "q_norm"):
        q, k = _rms(a.q_norm, q), _rms(a.k_norm, k)
    q, k = _rope_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    if q0:
        # the queries' rows of the mask; plain causal becomes causal aligned to the last key
        if isinstance(mask, PackedSegments):  # queries of the last columns only: the dense rows
            mask = mask.dense()
        elif isinstance(mask, SharedPrefixSegments):
            mask = mask.dense(h.device)
        mask = (torch.ones(Tq, T, dtype=torch.bool, device=h.device).tril_(q0) if mask is None
                else mask[..., q0:, :])
        h = h[:, q0:]
    o = _attention(q, k, v.transpose(1, 2), mask, a.scaling).transpose(1, 2)  # [B, Tq, heads, d]
    del q, k, v
    if select is None:
        o = o.reshape(B, Tq, -1)
    else:  # the selected positions only, gathered from the attention output and the residual
        o, h = o[select].flatten(1), h[select]
    h = _residual(h, F.linear(o, a.o_proj.weight, a.o_proj.bias))
    del o
    return _residual(h, _mlp(layer.mlp, _rms(layer.post_attention_layernorm, h)))


def _residual(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``h + out`` for ``out`` a fresh projection output no backward reads: added in place
    into it where that gives h + out's dtype (the same values: IEEE addition commutes)."""
    # (not into a view: F.linear with a bias returns one, which autograd forbids modifying in
    # place as the output of _SwiGLUDownFn, Llama's mlp_bias)
    same = out.dtype == torch.promote_types(out.dtype, h.dtype) and out.shape == h.shape and not out._is_view()
    return out.add_(h) if same else h + out


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    down = mlp.down_proj
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad or down.weight.requires_grad
                                    or (down.bias is not None and down.bias.requires_grad)):
        return _SwiGLUDownFn.apply(gate, up, down.weight, down.bias)
    # nothing to differentiate (reference log-probs, values): in place, one [N, intermediate] less
    return F.linear(F.silu(gate, inplace=True).mul_(up), down.weight, down.bias)


__all__ = ["supported", "hidden_states", "call_as_forward", "SharedPrefixSegments"]
