"""Decode steps of a Llama-style causal LM on a preallocated KV buffer, without the
transformers forward: :class:`_LlamaDecoder` (eager or static steps) and
:class:`_CUDAGraphStep` (a static step captured once as a CUDA graph).

A decode step of a small model is dispatch-bound: a few hundred operations on ``[B, H]``
activations, each of which costs a few microseconds of Python, module and dispatcher
overhead, more than its arithmetic. The decoder therefore calls the ops itself on the
modules' weights (no module calls, no output dataclasses, no mask or RoPE-table
construction per step) and keeps the activations two-dimensional. On the CPU, for a float32
model, each layer is one call of the C++ op ``rlhf_fast::llama_decode_layer``
(csrc/cpu/decode.cpp), which takes the modules' own weights (no copy); on a GPU the CUDA
graph removes the launch overhead instead. Modules of classes it does not know (quantised
linears, kernel-library norms) are called as they are, and such layers run the Python ops.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

# transformers' RMSNorm / gated MLP classes of the Llama family (the training forward's list):
# the same formula each, written out in _RMSNorm / _Layer.mlp; other classes (Liger's, a hub
# kernel's) are called as they are
from ..models.llama_forward import (_ATTENTIONS, _BACKBONES, _GATED_MLPS, _LAYERS, _RMS_NORMS, _is_silu, _own_class,
                                    _rms_forward, _transformers_class)


class _RMSNorm:
    """transformers' Llama RMSNorm written out (float32 statistics, weight times the
    normalised input cast back to the input dtype), on ``x [B, H]``."""

    def __init__(self, module: nn.Module):
        self.weight, self.eps = module.weight, float(module.variance_epsilon)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the training forward's formula, whose float32 path is one fused kernel instead of six:
        # a GPU decode step runs two norms per layer, each a few microseconds of launch-bound work
        return _rms_forward(x, self.weight, self.eps)[0]


def _norm(module: nn.Module):
    """``module`` as a function of ``x [B, H]``: an :class:`_RMSNorm` for transformers'
    Llama-family RMSNorm, else the module itself."""
    if not _transformers_class(type(module), _RMS_NORMS) or "forward" in module.__dict__:
        return module
    return _RMSNorm(module)


def _linear(module: nn.Module):
    """``module`` as a function of ``x [B, in]``: ``F.linear`` on its weights for a plain
    ``nn.Linear`` (no module call), else the module itself (a subclass, or a forward set on
    the instance)."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return module
    weight, bias = module.weight, module.bias
    return lambda x: F.linear(x, weight, bias)


# Stack q / k / v and gate / up into one copied matrix each when a layer's projection
# weights are at most this many bytes: a small model's decode matmuls are dispatch-bound, so
# three calls -> one is a third of the time, while the copy (made once per generate call) is
# negligible; a larger model's matmuls are bound by reading the weights, which stacking does
# not change, and the copy would double their memory. 4 MiB: a hidden size of ~256.
_STACK_MAX_BYTES = 4 << 20


def _as_in_out(mods: List[nn.Linear], stack: bool):
    """The weights of ``mods`` (sharing one input) as ``x @ w`` operands ``[in, out]``: one
    contiguous stacked copy when ``stack``, else each weight's transposed view (no copy);
    with one bias (or None) per operand."""
    if not stack or len(mods) == 1:
        return [m.weight.detach().t() for m in mods], [None if m.bias is None else m.bias.detach() for m in mods]
    w = torch.cat([m.weight.detach() for m in mods]).t().contiguous()
    if all(m.bias is None for m in mods):
        return [w], [None]
    return [w], [torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                            for m in mods])]


class _Layer:
    """One decoder layer's weights and functions, gathered once per decoder."""

    def __init__(self, layer: nn.Module):
        a, mlp = layer.self_attn, layer.mlp
        self.head_dim, self.scaling = a.head_dim, a.scaling
        self.attn, self.mlp_module = a, mlp
        self.q, self.k, self.v, self.o = (_linear(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        self.norm1, self.norm2 = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        # Qwen3: an RMSNorm over each head's q / k before RoPE
        self.q_norm = _norm(a.q_norm) if hasattr(a, "q_norm") else None
        self.k_norm = _norm(a.k_norm) if hasattr(a, "k_norm") else None
        # transformers' gated MLP written out below; other MLP classes are called as they are
        self.gated = _transformers_class(type(mlp), _GATED_MLPS) and "forward" not in mlp.__dict__
        self.act = None
        if self.gated:
            # transformers' SiLUActivation or torch's nn.SiLU; anything else is called as it is
            self.act = F.silu if _is_silu(mlp.act_fn) else mlp.act_fn
            self.gate, self.up, self.down = (_linear(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))

    def native_args(self) -> Optional[tuple]:
        """The weight arguments of :func:`torch.ops.rlhf_fast.llama_decode_layer` (norms, eps,
        qkv, qkv_bias, o, o_bias, gate_up, gate_up_bias, down, down_bias), or None when this
        layer is not the float32 RMSNorm + SiLU-gated layer of plain CPU linears that op
        computes. Stacked copies (see ``_STACK_MAX_BYTES``) are made here, once per call. The
        op's trailing arguments are :meth:`native_head_norms`."""
        if not self.gated or self.act is not F.silu:
            return None
        norms = (self.norm1, self.norm2)
        head_norms = () if self.q_norm is None else (self.q_norm, self.k_norm)
        if not all(isinstance(n, _RMSNorm) and n.weight.dtype == torch.float32 for n in norms + head_norms):
            return None
        if head_norms and self.q_norm.eps != self.k_norm.eps:
            return None
        a, mlp = self.attn, self.mlp_module
        qkv, gate_up = [a.q_proj, a.k_proj, a.v_proj], [mlp.gate_proj, mlp.up_proj]
        linears = qkv + [a.o_proj] + gate_up + [mlp.down_proj]
        if not all(type(m) is nn.Linear and "forward" not in m.__dict__ and m.weight.dtype == torch.float32
                   and m.weight.device.type == "cpu" for m in linears):
            return None
        stack = sum(m.weight.numel() * 4 for m in linears) <= _STACK_MAX_BYTES
        (o,), (o_b,) = _as_in_out([a.o_proj], False)
        (down,), (down_b,) = _as_in_out([mlp.down_proj], False)
        return ([n.weight.detach() for n in norms], [n.eps for n in norms], *_as_in_out(qkv, stack), o, o_b,
                *_as_in_out(gate_up, stack), down, down_b)

    def native_head_norms(self) -> tuple:
        """The op's ``q_norm, k_norm, qk_eps`` arguments: Qwen3's per-head norms, or None."""
        if self.q_norm is None:
            return None, None, 1e-6
        return self.q_norm.weight.detach(), self.k_norm.weight.detach(), self.q_norm.eps

    def qk(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
        """The rotated queries and keys ``[B, heads, d]`` of the normed input ``x [B, H]``."""
        B, d = x.shape[0], self.head_dim
        q, k = self.q(x).view(B, -1, d), self.k(x).view(B, -1, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return _rope(q, cos, sin_signed), _rope(k, cos, sin_signed)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.mlp_module(x)
        return self.down(self.act(self.gate(x)) * self.up(x))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' ``x·cos + rotate_half(x)·sin`` for ``x [B, heads, d]``: rotate_half(x)
    is ``x`` rolled by d/2 with the first half negated, and the negation lives in
    ``sin_signed`` (exact: -a·b == a·-b), so it is a roll and three elementwise ops."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


def _native_layers(layers: List[_Layer], norm) -> Optional[List[tuple]]:
    """Each layer's arguments to the C++ CPU op ``rlhf_fast::llama_decode_layer`` (a whole
    layer's decode step in one call), or None to run the Python ops: when a layer or the final
    norm is not one the op computes, when the extension is not built, or when the op backend
    is forced to the PyTorch reference (``rlhf_fast.ops.use_backend("torch")``)."""
    from ..ops import _dispatch

    if _dispatch.forced_backend() == "torch" or not isinstance(norm, _RMSNorm) or norm.weight.dtype != torch.float32:
        return None
    if not _dispatch.backend_available("cpp")[0]:
        return None
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_fast::llama_decode_layer", "CPU"):
        return None
    args = [L.native_args() for L in layers]
    return None if any(a is None for a in args) else args


def _has_forward_hooks(model: nn.Module, gathered: bool) -> bool:
    """Whether a forward hook or pre-hook would see a forward of ``model`` or of one of its
    submodules (an activation-steering hook on a layer, a probe on an MLP), or a global module
    hook any forward: the decoder and its C++ op read the layers' weights without calling the
    modules, so such hooks would be skipped. Not counted: transformers' output-capturing hooks
    (installed on the layers by the first forward asked for hidden states or attentions, and
    idle in any other forward, such as the decoder's), and with ``gathered`` FSDP2's own hooks
    (its parameters are already gathered for the call)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    from rlhf_fast.models.llama_forward import idle_transformers_hook

    ignored = ("torch.distributed.fsdp.",) if gathered else ()
    for m in model.modules():
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            if not (idle_transformers_hook(hook) or (getattr(hook, "__module__", None) or "").startswith(ignored)):
                return True
    return False


def _own_forward(module: nn.Module, names, *, compiled_ok: bool = False) -> bool:
    """Whether ``module`` (seen through FSDP2's subclass) is one of transformers' classes
    ``names`` and runs its class's forward: the decoder computes the backbone, its layers and
    their attention from the weights, so a forward set on the instance (an attention patch such
    as SelfExtend's, steering by method patching) would be skipped. ``compiled_ok``: the
    class's own forward compiled in place by the trainers' ``torch_compile``
    (:func:`rlhf_fast.trainers.compile.compile_module`) computes the same and is allowed."""
    if not _transformers_class(_own_class(module), names):
        return False
    if "forward" not in module.__dict__:
        return True
    from ..trainers.compile import compiled

    return compiled_ok and compiled(module)


class _LlamaDecoder:
    """Decode steps of a Llama-style causal LM (Llama, Mistral, Qwen2, Qwen3: pre-norm, RoPE, sdpa)
    on a preallocated ``[B, kv_heads, P + R, d]`` KV buffer.

    The operations of the transformers forward written out on the modules' weights (see the
    module docstring), without the per-call work that does not depend on the step: the
    growing ``torch.cat`` of DynamicCache, the mask construction, the RoPE tables (computed
    once for positions ``0 .. P + R - 1``), module calls and the output dataclasses.

    ``static``: every step has the same shapes and no Python-int index, so it can be captured
    once as a CUDA graph (:class:`_CUDAGraphStep`): keys / values are written at a column given
    as a tensor and attention reads the whole zero-initialised buffer under the mask (columns
    not yet written are masked). Otherwise attention reads only the columns written so far,
    which is cheaper eagerly.
    """

    _CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    _LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")

    @classmethod
    def supported(cls, model, *, gathered: bool = False) -> bool:
        """Whether ``model`` is a bare (no peft / DDP wrapper, no forward hooks on it or on any
        submodule, no global module hooks) full-attention Llama-style LM on sdpa, in eval mode,
        whose RoPE does not depend on the sequence length, and whose model, backbone, layers and
        attention modules are transformers' classes running their own forwards
        (:func:`_own_forward`; norms, MLPs and linears of other kinds are called as they are).
        ``gathered``: ``model`` is an FSDP2 model whose parameters
        :func:`rlhf_fast.distributed.gathered_params` holds gathered; its class is then FSDP's
        subclass, and FSDP's own hooks have nothing left to do."""
        from ..models.logprobs import unwrap

        if unwrap(model) is not model or model.training:
            return False
        classes = [type(model)]
        if gathered:  # fully_shard swaps in a subclass of (FSDPModule, the model's class)
            classes = [b for b in type(model).__bases__ if b.__name__ != "FSDPModule"]
        # transformers' own classes (a same-named remote-code class may compute something else)
        if not any(_transformers_class(c, cls._CLASSES) for c in classes) or "forward" in model.__dict__:
            return False
        if _has_forward_hooks(model, gathered):
            return False
        cfg = model.config
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or not _own_forward(model.model, _BACKBONES, compiled_ok=True) or not all(
                _own_forward(layer, _LAYERS) and _own_forward(layer.self_attn, _ATTENTIONS) for layer in layers):
            return False
        # RoPE whose frequencies depend on the sequence length seen so far ("dynamic" NTK,
        # "longrope"): transformers recomputes them as the sequence grows, while the decoder
        # builds one table for all P + R positions up front (and that call would leave the
        # module's frequencies set for P + R before the prefill)
        rope = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", "default")
        rope_types = rope.values() if isinstance(rope, dict) else (rope,)
        if any(t in cls._LENGTH_DEPENDENT_ROPE for t in rope_types):
            return False
        return (layers is not None and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and getattr(cfg, "sliding_window", None) is None and getattr(cfg, "pretraining_tp", 1) == 1
                and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ()))
                and all(hasattr(layer.self_attn, "head_dim") for layer in layers))

    # prompts of at most this many tokens are prefilled by the C++ op when it runs the decode:
    # its attention is plain loops, cheap for a few dozen tokens (where the transformers forward
    # costs a millisecond of Python overhead at a small model's size) but not for long prompts
    NATIVE_PREFILL_MAX = 64

    def __init__(self, model, B: int, P: int, R: int, *, static: bool = False):
        """Decode ``B`` rows of prompts of ``P`` columns for up to ``R`` tokens; the KV buffers
        are filled by :meth:`load_cache` (a transformers prefill) or :meth:`prefill`."""
        base = model.model
        self.model, self.static, self.B, self.P, self.R = model, static, B, P, R
        self.layers = [_Layer(layer) for layer in base.layers[:model.config.num_hidden_layers]]
        self.embed = base.embed_tokens
        self.norm = _norm(base.norm)
        self.head = _linear(model.lm_head)
        self.native = None if static else _native_layers(self.layers, self.norm)
        self.K: List[torch.Tensor] = []
        self.V: List[torch.Tensor] = []
        w = self.embed.weight if hasattr(self.embed, "weight") else next(model.parameters())
        cos, sin = base.rotary_emb(w.new_empty(0), torch.arange(P + R, device=w.device)[None])
        half = cos.shape[-1] // 2
        self.cos = cos[0]  # [P + R, d]
        self.sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)

    def load_cache(self, cache) -> None:
        """Take the prompt's keys / values from a transformers cache (rows already repeated
        to ``B``) into the preallocated ``[B, kv_heads, P + R, d]`` buffers."""
        # static: masked columns are still multiplied by a zero weight, so they must hold no NaN
        alloc = torch.Tensor.new_zeros if self.static else torch.Tensor.new_empty
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # [B, kv_heads, P, d]
            kb = alloc(k, (self.B, k.shape[1], self.P + self.R, k.shape[3]))
            vb = alloc(v, (self.B, v.shape[1], self.P + self.R, v.shape[3]))
            kb[:, :, :self.P] = k
            vb[:, :, :self.P] = v
            self.K.append(kb)
            self.V.append(vb)

    def prefills(self, P: int) -> bool:
        """Whether :meth:`prefill` runs prompts of ``P`` columns (the C++ op is live and the
        prompt is short: ``NATIVE_PREFILL_MAX``)."""
        return self.native is not None and P <= self.NATIVE_PREFILL_MAX

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int) -> torch.Tensor:
        """Run the left-padded prompts ``[Bp, P]`` (``B = Bp · n``) through the C++ op, one call
        per layer for all their tokens, and fill the KV buffers with each prompt's keys / values
        repeated ``n`` times; returns the last column's logits repeated, ``[B, V]``. Positions
        count attended tokens, as transformers' prefill here; a pad token attends to nothing
        (zeros, not NaN) and is never attended to."""
        from ..models.logprobs import default_position_ids

        Bp, P = prompt_ids.shape
        pos = default_position_ids(prompt_mask).reshape(-1)
        cos, sin, keys = self.cos[pos], self.sin_signed[pos], prompt_mask.bool().contiguous()
        h = self._embed(prompt_ids.reshape(-1))  # [Bp P, H]
        cfg = self.model.config
        n_kv, d = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, self.layers[0].head_dim
        k, v = h.new_empty(Bp, n_kv, P, d), h.new_empty(Bp, n_kv, P, d)  # one prompt copy, repeated below
        for L, args in zip(self.layers, self.native):
            h = torch.ops.rlhf_fast.llama_decode_layer(h, *args, k, v, cos, sin, keys, 0, L.scaling,
                                                       *L.native_head_norms())
            kb = h.new_empty(self.B, n_kv, P + self.R, d)
            vb = h.new_empty(self.B, n_kv, P + self.R, d)
            kb[:, :, :P] = k.repeat_interleave(n, dim=0)
            vb[:, :, :P] = v.repeat_interleave(n, dim=0)
            self.K.append(kb)
            self.V.append(vb)
        return self._native_logits(h.view(Bp, P, -1)[:, -1].contiguous()).repeat_interleave(n, dim=0)

    def _native_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, V]`` of the last layer's output ``h [N, H]`` (final RMSNorm in C++)."""
        return self.head(torch.ops.rlhf_fast.rms_norm(h, self.norm.weight.detach(), self.norm.eps))

    def _embed(self, tok: torch.Tensor) -> torch.Tensor:
        if type(self.embed) is nn.Embedding and "forward" not in self.embed.__dict__:
            e = self.embed
            return F.embedding(tok, e.weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return self.embed(tok[:, None])[:, 0]

    def step(self, tok: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, col) -> torch.Tensor:
        """Logits ``[B, V]`` after feeding ``tok [B]`` at KV column ``col`` with position ids
        ``pos [B, 1]`` and the boolean key mask ``mask [B, 1, 1, col + 1]``; when ``static``,
        ``col`` is an int64 tensor ``[1]`` and ``mask`` is ``[B, 1, 1, P + R]``."""
        B = tok.shape[0]
        h = self._embed(tok)  # [B, H]
        if self.native is not None:  # one C++ op per layer (see _native_layers)
            cos, sin, keys = self.cos[pos[:, 0]], self.sin_signed[pos[:, 0]], mask.reshape(B, -1)
            for i, (L, args) in enumerate(zip(self.layers, self.native)):
                h = torch.ops.rlhf_fast.llama_decode_layer(h, *args, self.K[i], self.V[i], cos, sin, keys, col,
                                                           L.scaling, *L.native_head_norms())
            return self._native_logits(h)
        cos, sin = self.cos[pos], self.sin_signed[pos]  # [B, 1, d]: broadcast over heads
        for i, L in enumerate(self.layers):
            d = L.head_dim
            x = L.norm1(h)
            q, k = L.qk(x, cos, sin)
            v = L.v(x).view(B, -1, d)
            if self.static:
                keys = self.K[i].index_copy_(2, col, k.unsqueeze(2))
                values = self.V[i].index_copy_(2, col, v.unsqueeze(2))
            else:
                self.K[i][:, :, col] = k
                self.V[i][:, :, col] = v
                keys, values = self.K[i][:, :, :col + 1], self.V[i][:, :, :col + 1]
            # grouped-query attention of one new token: the G query heads that share a KV head
            # become G query rows of that head (heads h = j·G .. j·G + G - 1 read KV head j, as
            # transformers' repeat_kv), so no backend repeats the keys / values G times
            kv_heads = keys.shape[1]
            o = F.scaled_dot_product_attention(q.reshape(B, kv_heads, -1, d), keys, values, attn_mask=mask,
                                               dropout_p=0.0, scale=L.scaling)
            h = h + L.o(o.reshape(B, -1))  # [B, kv_heads, G, d] is [B, heads·d] in head order
            h = h + L.mlp(L.norm2(h))
        return self.head(self.norm(h))


class _CUDAGraphStep:
    """A static :class:`_LlamaDecoder` step captured once as a CUDA graph and replayed for
    every token. A decode step of a small model at a modest batch is launch-bound (a few
    hundred kernels of microseconds each, every one launched from Python); a replay launches
    them all at once.

    Built on the first decode step's inputs: two eager warm-up steps on a side stream (writing
    the same keys / values the captured step writes), the capture, then one replay whose logits
    must match the eager ones, else RuntimeError (the caller falls back to eager steps). The
    graph reads ``mask`` (the caller's ``[B, 1, 1, P + R]`` buffer, updated in place) and its
    own copies of the token, position and column.
    """

    def __init__(self, decoder: "_LlamaDecoder", tok: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, col: int):
        self.tok, self.pos = tok.clone(), pos.clone()
        self.col = torch.full((1,), col, dtype=torch.long, device=tok.device)
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device=tok.device)
        side.wait_stream(torch.cuda.current_stream(tok.device))
        # capture_begin / capture_end rather than the torch.cuda.graph context, which empties
        # the caching allocator first: the log-prob and update phases would then have to
        # cudaMalloc their (large) blocks again after every generate call
        with torch.cuda.stream(side):
            for _ in range(2):  # cuBLAS / sdpa pick and allocate their workspaces outside the capture
                eager = decoder.step(self.tok, mask, self.pos, self.col)
            side.synchronize()  # as torch.cuda.graph does: nothing of the warm-up still in flight
            self.graph.capture_begin()
            try:
                self.out = decoder.step(self.tok, mask, self.pos, self.col)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(tok.device).wait_stream(side)
        self.graph.replay()
        if not torch.allclose(self.out, eager, rtol=1e-3, atol=1e-3):
            raise RuntimeError("the CUDA-graph decode step does not reproduce the eager step's logits")

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, col: int) -> torch.Tensor:
        """Logits ``[B, V]`` (the graph's output buffer, overwritten by the next call)."""
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.col.fill_(col)
        self.graph.replay()
        return self.out
