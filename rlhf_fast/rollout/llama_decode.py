"""Decode steps of a Llama-style causal LM on a preallocated KV buffer, without the
transformers forward: :class:`_LlamaDecoder` (eager or static steps) and
:class:`_CUDAGraphStep` (a static step captured once as a CUDA graph).

A decode step of a small model is dispatch-bound: a few hundred operations on ``[B, H]``
activations, each of which costs a few microseconds of Python, module and dispatcher
overhead, more than its arithmetic. The decoder therefore calls the ops itself on the
modules' weights (no module calls, no output dataclasses, no mask or RoPE-table
construction per step) and keeps the activations two-dimensional. On the CPU it also packs
the projections that share an input (q / k / v, gate / up) into one pre-transposed matrix,
built once per :meth:`HFRolloutEngine.generate` call, so a layer runs four matmuls instead
of seven; on a GPU the copy would cost memory (the MLP weights of a 7B model are GBs) and
the CUDA graph already removes the launch overhead, so the projections stay separate there.
Modules of classes it does not know (quantised linears, kernel-library norms) are called as
they are.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

# transformers' RMSNorm / gated MLP classes of the supported families: the same formula each,
# written out in _rms_norm / _Layer.mlp; other classes (Liger's, a hub kernel's) are called
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
_SILUS = ("SiLUActivation", "SiLU")


class _RMSNorm:
    """transformers' Llama RMSNorm written out (float32 statistics, weight times the
    normalised input cast back to the input dtype), on ``x [B, H]``."""

    def __init__(self, module: nn.Module):
        self.weight, self.eps = module.weight, float(module.variance_epsilon)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(module: nn.Module):
    """``module`` as a function of ``x [B, H]``: an :class:`_RMSNorm` for transformers'
    Llama-family RMSNorm, else the module itself."""
    if type(module).__name__ not in _RMS_NORMS or "forward" in module.__dict__:
        return module
    return _RMSNorm(module)


class _Projections:
    """The linear layers ``mods`` applied to one input ``x [B, H]``; returns their outputs.

    ``pack`` (plain ``nn.Linear`` layers only): one ``[H, sum(out)]`` contiguous copy of the
    stacked, transposed weights (and biases), so the layers are one ``mm`` / ``addmm``."""

    def __init__(self, mods: List[nn.Module], pack: bool):
        self.mods = mods
        self.plain = all(type(m) is nn.Linear for m in mods)
        self.sizes = [m.weight.shape[0] for m in mods] if self.plain else None
        self.wt: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None
        if self.plain and pack:
            self.wt = torch.cat([m.weight for m in mods]).t().contiguous()
            if any(m.bias is not None for m in mods):
                self.bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                                       for m in mods])

    @property
    def packed(self) -> bool:
        return self.wt is not None

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """The packed layers' outputs side by side, ``[B, sum(out)]``."""
        return torch.mm(x, self.wt) if self.bias is None else torch.addmm(self.bias, x, self.wt)

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.packed:
            return list(self.joint(x).split(self.sizes, -1))
        if self.plain:
            return [F.linear(x, m.weight, m.bias) for m in self.mods]
        return [m(x) for m in self.mods]


class _Layer:
    """One decoder layer's weights and functions, gathered once per decoder."""

    def __init__(self, layer: nn.Module, pack: bool):
        a, mlp = layer.self_attn, layer.mlp
        self.head_dim, self.scaling = a.head_dim, a.scaling
        self.n_q = a.q_proj.weight.shape[0] // a.head_dim if type(a.q_proj) is nn.Linear else None
        self.qkv = _Projections([a.q_proj, a.k_proj, a.v_proj], pack)
        self.o = _Projections([a.o_proj], pack)
        self.norm1, self.norm2 = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        gated = type(mlp).__name__ in _GATED_MLPS and "forward" not in mlp.__dict__
        self.mlp_module = None if gated else mlp
        if gated:
            self.act = F.silu if type(mlp.act_fn).__name__ in _SILUS else mlp.act_fn
            self.gate_up = _Projections([mlp.gate_proj, mlp.up_proj], pack)
            self.down = _Projections([mlp.down_proj], pack)

    def native_args(self) -> Optional[tuple]:
        """The weights :func:`torch.ops.rlhf_fast.llama_decode_layer` takes, or None when this
        layer is not the float32, packed, RMSNorm + SiLU-gated layer that op computes."""
        if self.mlp_module is not None or self.act is not F.silu or not (self.qkv.packed and self.o.packed
                                                                          and self.gate_up.packed and self.down.packed):
            return None
        if not (isinstance(self.norm1, _RMSNorm) and isinstance(self.norm2, _RMSNorm)):
            return None
        ts = (self.norm1.weight, self.qkv.wt, self.o.wt, self.norm2.weight, self.gate_up.wt, self.down.wt)
        if any(t.dtype != torch.float32 for t in ts):
            return None
        return (self.norm1.weight.detach(), self.norm1.eps, self.qkv.wt, self.qkv.bias, self.o.wt, self.o.bias,
                self.norm2.weight.detach(), self.norm2.eps, self.gate_up.wt, self.gate_up.bias, self.down.wt,
                self.down.bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_module is not None:
            return self.mlp_module(x)
        g, u = self.gate_up(x)
        return self.down(self.act(g) * u)[0]


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


class _LlamaDecoder:
    """Decode steps of a Llama-style causal LM (Llama, Mistral, Qwen2: pre-norm, RoPE, sdpa)
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
    ``pack``: pack the projections that share an input (default: on the CPU).
    """

    _CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    @classmethod
    def supported(cls, model, *, gathered: bool = False) -> bool:
        """Whether ``model`` is a bare (no peft / DDP wrapper, no forward hooks) full-attention
        Llama-style LM on sdpa, in eval mode. ``gathered``: ``model`` is an FSDP2 model whose
        parameters :func:`rlhf_fast.distributed.gathered_params` holds gathered; its class is
        then FSDP's subclass and its hooks are FSDP's, which have nothing left to do."""
        from ..models.logprobs import unwrap

        if unwrap(model) is not model or model.training:
            return False
        classes = [type(model)]
        if gathered:  # fully_shard swaps in a subclass of (FSDPModule, the model's class)
            classes = [b for b in type(model).__bases__ if b.__name__ != "FSDPModule"]
        if not any(c.__name__ in cls._CLASSES for c in classes):
            return False
        if not gathered and (model._forward_hooks or model._forward_pre_hooks):  # they see the forward
            return False
        cfg = model.config
        layers = getattr(getattr(model, "model", None), "layers", None)
        return (layers is not None and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and getattr(cfg, "sliding_window", None) is None and getattr(cfg, "pretraining_tp", 1) == 1
                and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ()))
                and all(hasattr(layer.self_attn, "head_dim") for layer in layers))

    def __init__(self, model, cache, B: int, P: int, R: int, *, static: bool = False, pack: Optional[bool] = None):
        base = model.model
        self.model, self.static = model, static
        pack = (next(model.parameters()).device.type == "cpu") if pack is None else pack
        self.layers = [_Layer(layer, pack) for layer in base.layers]
        self.embed = base.embed_tokens
        self.norm = _norm(base.norm)
        self.head = _Projections([model.lm_head], pack=False)  # V × H: too large to copy per call
        self.native = None if static else _native_layers(self.layers, self.norm)
        self.K, self.V = [], []
        # static: masked columns are still multiplied by a zero weight, so they must hold no NaN
        alloc = torch.Tensor.new_zeros if static else torch.Tensor.new_empty
        for layer in cache.layers:  # the prompt's (repeated) keys / values go first
            k, v = layer.keys, layer.values  # [B, kv_heads, P, d]
            kb = alloc(k, (B, k.shape[1], P + R, k.shape[3]))
            vb = alloc(v, (B, v.shape[1], P + R, v.shape[3]))
            kb[:, :, :P] = k
            vb[:, :, :P] = v
            self.K.append(kb)
            self.V.append(vb)
        cos, sin = base.rotary_emb(self.K[0], torch.arange(P + R, device=self.K[0].device)[None])
        half = cos.shape[-1] // 2
        self.cos = cos[0]  # [P + R, d]
        self.sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)

    def _embed(self, tok: torch.Tensor) -> torch.Tensor:
        if type(self.embed) is nn.Embedding:
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
                h = torch.ops.rlhf_fast.llama_decode_layer(h, *args, self.K[i], self.V[i], cos, sin, keys, col, L.n_q,
                                                           L.scaling)
            return self.head(torch.ops.rlhf_fast.rms_norm(h, self.norm.weight.detach(), self.norm.eps))[0]
        cos, sin = self.cos[pos], self.sin_signed[pos]  # [B, 1, d]: broadcast over heads
        for i, L in enumerate(self.layers):
            d = L.head_dim
            x = L.norm1(h)
            if L.qkv.packed:  # q and k side by side: one RoPE for both
                y = L.qkv.joint(x)
                n_qk = L.n_q + self.K[i].shape[1]
                qk = _rope(y[:, :n_qk * d].view(B, n_qk, d), cos, sin)
                q, k, v = qk[:, :L.n_q], qk[:, L.n_q:], y[:, n_qk * d:].view(B, -1, d)
            else:
                q, k, v = L.qkv(x)
                q, k, v = _rope(q.view(B, -1, d), cos, sin), _rope(k.view(B, -1, d), cos, sin), v.view(B, -1, d)
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
            h = h + L.o(o.reshape(B, -1))[0]  # [B, kv_heads, G, d] is [B, heads·d] in head order
            h = h + L.mlp(L.norm2(h))
        return self.head(self.norm(h))[0]


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
