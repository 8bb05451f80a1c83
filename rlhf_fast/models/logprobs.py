"""Per-token log-probs and the policy loss of a Hugging Face causal LM without its logits.

The backbone gives the final hidden state ``[B, T, H]`` (after the final norm); the LM head
is applied inside :func:`rlhf_fast.ops.fused_linear_logprobs` /
:func:`rlhf_fast.ops.fused_linear_policy_loss`, which never hold the ``[B, T, V]`` logits.

Alignment convention shared by every trainer: all ``[B, T]`` tensors are aligned to
``input_ids`` positions; ``logp[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``, 0 at
``t = 0`` and wherever ``response_mask`` is 0.
"""

from __future__ import annotations

import functools
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from rlhf_fast import ops
from rlhf_fast.models.activation_offload import keep_on_device
from rlhf_fast.models import llama_forward, lm_head, moe_aux
from rlhf_fast.ops import _dispatch

# Model types whose attention builds the block-diagonal mask from per-sequence position ids
# (transformers' masking_utils), checked packed == padded in tests/test_models.py.
PACKED_TESTED = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2"})

# More model types whose forward keeps packed sequences apart, checked packed == padded in
# tests/test_review_forward_families.py. Any other model type runs a packed row through the
# padded forward (:func:`packed_states`; the same values, without the padding-free speed-up):
# OPT, Bloom and MPT, for example, build their masks without the position ids, so one packed row
# would let each sequence attend to the ones before it.
PACKED_CHECKED = frozenset({"gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere", "gpt_neox",
                            "qwen2_moe", "qwen3_moe", "mixtral", "starcoder2", "phi", "stablelm", "falcon"})

# Rows of logits the Python chunk loop materialises at once when the op runs on the
# PyTorch reference (which holds all rows of logits it is given): 4M logits = 16 MB fp32.
_REFERENCE_CHUNK_ELEMS = 1 << 22


def _honour_context(fn):
    """Let wrappers such as ``AdapterDisabledReference`` (attributes ``rlhf_wrapped`` and
    ``rlhf_context()``) run the wrapped model inside their context (adapters disabled)."""

    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        ctx = getattr(model, "rlhf_context", None)
        if ctx is not None and hasattr(model, "rlhf_wrapped"):
            with ctx():
                return fn(model.rlhf_wrapped, *args, **kwargs)
        return fn(model, *args, **kwargs)

    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside a peft ``PeftModel`` or a DDP wrapper (or
    the model itself)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "rlhf_wrapped"):
        model = model.rlhf_wrapped
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def backbone(model: nn.Module) -> nn.Module:
    """The base transformer of a causal LM (``model.model``, ``model.transformer``, ...)."""
    m = unwrap(model)
    prefix = getattr(m, "base_model_prefix", None)
    inner = getattr(m, prefix, None) if prefix else None
    if inner is None:
        raise TypeError(f"model must be a transformers PreTrainedModel with a base model, got {type(m).__name__}")
    return inner


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` int64 that count only attended tokens (as ``generate`` does),
    so a left-padded row gets the same positions as the unpadded sequence."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def position_table_size(model: nn.Module) -> Optional[int]:
    """Positions of a learned absolute position-embedding table (GPT-2's ``wpe``, OPT's
    ``decoder.embed_positions`` less its ``offset`` of 2 reserved rows), or None for models
    with relative positions (RoPE), which have no table to run past."""
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", None)
    inner = (getattr(base, prefix, None) if prefix else None) or base
    for holder in (inner, getattr(inner, "decoder", None)):  # OPT keeps its table in model.decoder
        for name in ("wpe", "embed_positions", "position_embeddings"):
            emb = getattr(holder, name, None)
            if isinstance(emb, nn.Embedding):
                # OPT looks up row position + offset
                offset = getattr(emb, "offset", 0)
                return emb.num_embeddings - (offset if isinstance(offset, int) else 0)
    return None


def check_input_ids(model: nn.Module, input_ids: torch.Tensor, *, positions: bool = True,
                    position_ids: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError/TypeError for ``input_ids [B, T]`` the model's embedding cannot take: not
    an integer tensor, ids outside ``[0, vocab)`` (checked on the host for CPU tensors; on a GPU
    an asynchronous device assert, no sync, as :mod:`rlhf_fast.ops` does for labels), or, with
    ``positions``, more columns than a learned position table holds (default position ids);
    without ``positions``, given ``position_ids`` (a packed row's, restarting per sequence) past
    that table, checked the same way as the ids."""
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
    base = unwrap(model)
    if positions:
        table = position_table_size(base)
        if table is not None and input_ids.shape[1] > table:
            raise ValueError(f"input_ids has {input_ids.shape[1]} columns, more than the {table} positions of the "
                             f"model's position embeddings")
    elif position_ids is not None:
        _check_position_ids(position_ids, position_table_size(base))
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    V = getattr(emb, "num_embeddings", None)
    if V is None or input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (input_ids < 0) | (input_ids >= V)
    if input_ids.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"input_ids must be token ids in [0, {V}) (the model's vocabulary); "
                             f"found {input_ids[bad][0].item()}")
    else:
        torch._assert_async(~bad.any(), f"input_ids must be token ids in [0, {V}) (the model's vocabulary)")


def _check_position_ids(position_ids: torch.Tensor, table: Optional[int]) -> None:
    """ValueError (CPU; an asynchronous device assert elsewhere) when ``position_ids`` reach past a
    learned position ``table`` (None: relative positions, nothing to check): the embedding would
    index out of range (an IndexError, or a device-side assert on CUDA), e.g. for a packed
    row's sequence longer than the table, which the padded path refuses by its columns."""
    if table is None or position_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (position_ids < 0) | (position_ids >= table)
    msg = f"position_ids must be in [0, {table}) (the positions of the model's position embeddings)"
    if position_ids.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{msg}; found {position_ids[bad][0].item()}: a sequence longer than {table} tokens")
    else:
        torch._assert_async(~bad.any(), msg)


@_honour_context
def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor] = None,
    columns: Optional[Tuple[int, int]] = None,
    select: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    segments: Optional[llama_forward.SharedPrefixSegments] = None,
) -> torch.Tensor:
    """The final hidden state ``[B, T, H]`` (after the final norm, in the model's dtype).

    input_ids ``[B, T]`` int, attention_mask ``[B, T]`` 0/1 (None: all attended). Calls the
    base model only, never the LM head: through :mod:`rlhf_fast.models.llama_forward` for a
    Llama / Mistral / Qwen2 / Qwen3 backbone it computes exactly (less memory for the
    backward), else the backbone's own forward. Position ids default to the cumulative count
    of attended tokens, matching generation with left padding. ``columns`` ``(a, b)``: only
    the states of columns ``[a, b)``, ``[B, b - a, H]`` (llama_forward then skips the work no
    such state depends on: :func:`rlhf_fast.models.llama_forward.hidden_states`); ``select``
    ``(rows, cols)`` ``[N]`` int64 (cols counted from ``a``): only ``h[rows, cols]`` ``[N, H]``.
    ``segments``: the :class:`~rlhf_fast.models.llama_forward.SharedPrefixSegments` of one packed
    row of shared-prefix groups (``prefix_sharing``), which only llama_forward computes:
    ValueError where it cannot run (:func:`prefix_sharing_reason`).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have at least one row and one column, got shape {tuple(input_ids.shape)}")
    check_input_ids(model, input_ids, positions=position_ids is None, position_ids=position_ids)
    if columns is not None:
        a, b = (int(c) for c in columns)
        T = input_ids.shape[1]
        if not 0 <= a < b <= T:
            raise ValueError(f"columns must be (a, b) with 0 <= a < b <= {T}, got {columns!r}")
        columns = (a, b)
    if position_ids is None and attention_mask is not None:
        position_ids = default_position_ids(attention_mask)
    base = backbone(model)
    # a trainer's MoE load-balancing loss collects this forward's router logits (None: no change)
    aux = moe_aux.active(model)
    n_cols = input_ids.shape[1] if segments is None else segments.max_len
    if segments is None and attention_mask is None and position_ids is not None:
        n_cols = _packed_span(base, position_ids, n_cols)
    fast = aux is None and llama_forward.supported(base, n_cols)
    # the default call stays the old one (tests wrap llama_forward.hidden_states positionally)
    seg = {} if segments is None else {"segments": segments}
    if fast and (_plain_ddp(model) or _fsdp_root(model)) and "forward" not in _ddp_inner(model).__dict__:
        # DDP / FSDP2: our forward as the wrapper's, so DDP still prepares the gradient
        # reduction and FSDP2 gathers the root parameters as for any forward call (the LM
        # head's gradient, from the fused op after it, is reduced like every other one)
        return llama_forward.call_as_forward(
            model, lambda: llama_forward.hidden_states(base, input_ids, attention_mask, position_ids, columns,
                                                       select, **seg))
    if segments is not None and (not fast or _data_parallel_root(model)):
        why = prefix_sharing_reason(model, segments.max_len) or \
            "it is wrapped by DDP with find_unused_parameters or has an instance-level forward"
        raise ValueError(f"prefix_sharing: the shared-prefix row runs only through rlhf_fast.models.llama_forward, "
                         f"but {why}")
    if _data_parallel_root(model):
        # DDP / FSDP2: run the wrapped root's forward so DDP synchronises gradients and FSDP2
        # gathers the root parameters; logits_to_keep=1 limits the LM head to one position.
        with llama_forward.checkpointing_in_eval(base):  # (an RL policy trains in eval mode)
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, output_hidden_states=True, logits_to_keep=1, return_dict=True,
                        **moe_aux.forward_kwargs(aux))
        if aux is not None:
            aux.record(out, attention_mask)
        return _columns(out.hidden_states[-1], columns, select)
    if fast:
        return llama_forward.hidden_states(base, input_ids, attention_mask, position_ids, columns, select, **seg)
    with llama_forward.checkpointing_in_eval(base):  # (an RL policy trains in eval mode)
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   return_dict=True, **moe_aux.forward_kwargs(aux))
    if aux is not None:
        aux.record(out, attention_mask)
    return _columns(out.last_hidden_state, columns, select)


def _packed_span(base: nn.Module, position_ids: torch.Tensor, n_cols: int) -> int:
    """The longest run a sliding window must cover in a row of ``n_cols`` columns without an
    attention mask: its attention stays inside each sequence its ``position_ids`` mark (a packed
    row, ids restarting per sequence; transformers' ``find_packed_sequence_indices``), and a
    sequence spans at most max(position id) + 1 tokens, so a packed row longer than the window
    still runs llama_forward's per-sequence attention when every sequence fits (``n_cols``
    itself when the config has no window the row outgrows: no sync then)."""
    window = getattr(getattr(base, "config", None), "sliding_window", None)
    if not isinstance(window, int) or n_cols <= window or not position_ids.numel():
        return n_cols
    return min(n_cols, int(position_ids.max()) + 1)


def _columns(h: torch.Tensor, columns: Optional[Tuple[int, int]], select) -> torch.Tensor:
    h = h if columns is None else h[:, columns[0]:columns[1]]
    return h if select is None else h[select]


def _plain_ddp(model: nn.Module) -> bool:
    """A DDP wrapper whose reducer needs no search of the forward's outputs: with
    ``find_unused_parameters`` it would mark the LM head unused (the fused op reads it after
    the forward) and then fail when its gradient arrives."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel) and not model.find_unused_parameters


def _ddp_inner(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper calls (or ``model``): an instance-level forward there (an
    autocast wrapper, say) keeps the wrapper's own forward, which ours would bypass."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _fsdp_root(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def _data_parallel_root(model: nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel) or _fsdp_root(model)


def unfusable_reason(model: nn.Module) -> Optional[str]:
    """Why the LM head of ``model`` cannot be fused into the log-prob kernel, or None."""
    m = unwrap(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embedding (LM head)"
    if not isinstance(head, nn.Linear) and not hasattr(head, "base_layer"):
        return f"the LM head is a {type(head).__name__}, not a Linear"
    if hasattr(head, "base_layer"):
        # a peft-wrapped head (LoRA on lm_head): its output is not weight @ h
        return "the LM head carries a peft adapter"
    pre = lm_head.pre_head_reason(m)  # (BERT-style heads: a transform before the output embedding)
    if pre is not None:
        return pre
    active = lm_head.active_logit_transforms(getattr(m, "config", None))
    if active:
        name, val = active[0]
        return f"config.{name}={val!r} transforms the logits after the LM head"
    return None


def prefix_sharing_reason(model: nn.Module, seq_len: int, *, lm_head: bool = True) -> Optional[str]:
    """Why ``model`` cannot score shared-prefix rows (``prefix_sharing``) of up to ``seq_len``
    tokens per sequence, or None: its LM head cannot be fused (:func:`unfusable_reason`), or its
    backbone is not one :mod:`rlhf_fast.models.llama_forward` computes (the only forward that
    takes a :class:`~rlhf_fast.models.llama_forward.SharedPrefixSegments`; transformers' has no
    such mask). ``lm_head=False``: the head is not checked (a reward model's score head)."""
    why = unfusable_reason(model) if lm_head else None
    if why is not None:
        return why
    try:
        base = backbone(model)
    except TypeError as e:
        return str(e)
    if _dispatch.forced_backend() == "torch":
        return "the torch backend is forced (use_backend('torch') / RLHF_FAST_BACKEND=torch runs transformers' forward)"
    if not llama_forward.supported(base, seq_len):
        return (f"its backbone ({type(base).__name__}) is not one rlhf_fast.models.llama_forward computes: a "
                "Llama / Mistral / Qwen2 / Qwen3 with plain Linear layers (no peft / LoRA adapters, no kernel-library "
                "modules or hooks), sdpa or eager attention, no sliding window shorter than max_len")
    return None


def lm_head_params(model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] or None)`` of the LM head (tied weights included).

    Raises ValueError when the head cannot be fused (see :func:`unfusable_reason`).
    """
    why = unfusable_reason(model)
    if why is not None:
        raise ValueError(f"cannot fuse the LM head: {why}")
    head = unwrap(model).get_output_embeddings()
    return head.weight, head.bias


@functools.lru_cache(maxsize=None)
def _warn_unfused(reason: str) -> None:
    warnings.warn(f"rlhf_fast: falling back to full logits for log-probs because {reason}",
                  RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _warn_packed_untested(model_type) -> None:
    warnings.warn(f"rlhf_fast: packed=True runs the padded forward for model_type={model_type!r}, whose attention "
                  "is not known to keep packed sequences apart by their position ids: the same values, without the "
                  "padding-free speed-up", RuntimeWarning, stacklevel=4)


def _fallback_reason(model: nn.Module) -> Optional[str]:
    why = unfusable_reason(model)
    if why is not None:
        _warn_unfused(why)
    return why


def _chunked_head_logprobs(h, weight, bias, labels, *, temperature, return_entropy, chunk_size, return_top1=False):
    """fused_linear_logprobs over rows ``h [N, H]``; on the PyTorch reference backend the rows
    are fed in chunks (each checkpointed under autograd) so at most one chunk of logits lives.
    ``return_top1``: a last output, ``[N]`` bool (the op's)."""
    N = h.shape[0]
    # the default call stays the op's old one
    top1 = {"return_top1": True} if return_top1 else {}
    many = return_entropy or return_top1
    backend, _ = _dispatch.select("fused_linear_logprobs", h.device)
    if backend != "torch":
        return ops.fused_linear_logprobs(h, weight, labels, bias=bias, temperature=temperature,
                                         return_entropy=return_entropy, chunk_size=chunk_size, **top1)
    rows = chunk_size or max(1, _REFERENCE_CHUNK_ELEMS // weight.shape[0])
    if N <= rows:
        return ops.fused_linear_logprobs(h, weight, labels, bias=bias, temperature=temperature,
                                         return_entropy=return_entropy, **top1)

    def one(hc, lc, w, b):
        out = ops.fused_linear_logprobs(hc, w, lc, bias=b, temperature=temperature, return_entropy=return_entropy,
                                        **top1)
        return out if many else (out,)

    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    cat = _row_chunks(one, rows, grad, h, labels, weight, bias)
    return tuple(cat) if many else cat[0]


def _row_chunks(fn, rows: int, grad: bool, h: torch.Tensor, labels: torch.Tensor, *rest) -> List[torch.Tensor]:
    """``fn(h chunk, labels chunk, *rest)`` (a tuple of per-row outputs) over ``rows`` rows of
    ``h [N, H]`` / ``labels [N]`` at a time, the outputs concatenated; with ``grad`` each chunk is
    checkpointed, its logits recomputed in the backward instead of kept. An empty ``h`` still
    gives fn's (empty) outputs."""
    outs = []
    for s in range(0, max(h.shape[0], 1), rows):
        args = (h[s:s + rows], labels[s:s + rows], *rest)
        outs.append(torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]


def mean_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                temperature: float = 1.0) -> torch.Tensor:
    """Each row's logit averaged over the vocabulary, ``(h @ weight.T + bias).mean(-1) / temperature``
    (TRL's ``mean_logits``), without the logits: ``h @ mean_v(weight) + mean(bias)``, one ``[H]``
    vector. h ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None; returns ``[N]`` float32
    (float64 for float64 h), detached."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    # outside autocast: a bf16 matvec would round each mean to 3 digits
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        w_mean = weight.detach().sum(0, dtype=acc) / weight.shape[0]  # [H], no [V, H] copy in acc
        out = h.detach().to(acc) @ w_mean
        if bias is not None:
            out = out + bias.detach().to(acc).mean()
        return out / temperature


def head_token_stats(h, weight, bias, labels, *, temperature=1.0, return_entropy=False, return_top1=False,
                     return_mean_logit=False, chunk_size=None):
    """Through the fused head, the per-row values of :func:`sequence_logprobs` before they are placed:
    ``(logp [N], entropy [N], top1 [N] bool, mean logit [N])``, each but logp only when requested (a
    bare logp when nothing is). h ``[N, H]``, labels ``[N]``."""
    with keep_on_device():  # the head's saves stay where activation offloading would move them (as TRL)
        out = _chunked_head_logprobs(h, weight, bias, labels, temperature=temperature,
                                     return_entropy=return_entropy, chunk_size=chunk_size, return_top1=return_top1)
    if not return_mean_logit:
        return out
    out = out if (return_entropy or return_top1) else (out,)
    return (*out, mean_logits(h, weight, bias, temperature))


def logits_token_stats(logits, labels, *, temperature=1.0, return_entropy=False, return_top1=False,
                       return_mean_logit=False):
    """:func:`head_token_stats` from full logits ``[N, V]`` (a head that cannot be fused): the
    log-probs through :func:`rlhf_fast.ops.token_logprobs`, the rest read off the logits."""
    out = ops.token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy)
    if not (return_top1 or return_mean_logit):
        return out
    out = out if return_entropy else (out,)
    z = logits.detach()
    if return_top1:
        out += (z.argmax(-1) == labels,)
    if return_mean_logit:
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        out += (z.to(acc).mean(-1) / temperature,)
    return out


def _logits_head(model: nn.Module) -> Optional[Tuple[nn.Module, "lm_head.HeadTransform"]]:
    """``(head module, transform)`` of a head that cannot be fused but whose logits are exactly
    ``transform(head(h))`` of the backbone's final state h: a Linear (a peft adapter on it
    allowed) followed by the scale / softcap its config names (:mod:`rlhf_fast.models.lm_head`).
    None where only the model's own forward is known to give its logits: another kind of head,
    a config attribute of unknown effect, an FSDP2 root (whose forward gathers the head)."""
    m = unwrap(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    linear = head.base_layer if hasattr(head, "base_layer") else head
    if not isinstance(linear, nn.Linear) or _fsdp_root(model) or lm_head.pre_head_reason(m) is not None:
        return None
    cfg = getattr(m, "config", None)
    names = {name for name, _ in lm_head.active_logit_transforms(cfg)}
    if not names <= lm_head.KNOWN_TRANSFORM_ATTRS or not names <= _forward_names(type(m)):
        # an attribute of unknown effect, or one the forward does not read (Gemma 3's multimodal
        # wrapper leaves its text config's softcap unapplied): the model's own logits decide
        return None
    return head, lm_head.head_transform(cfg)


@functools.lru_cache(maxsize=None)
def _forward_names(cls: type) -> frozenset:
    """The :data:`~rlhf_fast.models.lm_head.KNOWN_TRANSFORM_ATTRS` named in the source of
    ``cls.forward`` (empty when it cannot be read): those the model's forward applies itself."""
    import inspect

    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(n for n in lm_head.KNOWN_TRANSFORM_ATTRS if n in src)


def logits_head_token_stats(h, head, transform, labels, *, temperature=1.0, return_entropy=False, return_top1=False,
                            return_mean_logit=False, chunk_size=None):
    """:func:`logits_token_stats` of the logits ``transform(head(h))`` (a head the fused op cannot
    take: :func:`_logits_head`), computed ``chunk_size`` rows at a time (None: 4M logits a chunk),
    each chunk's logits recomputed in the backward, so that at most one chunk of ``[rows, V]``
    logits lives, never ``[N, V]``. h ``[N, H]`` (the final hidden states), labels ``[N]``;
    ``transform`` a :class:`~rlhf_fast.models.lm_head.HeadTransform` applied in the head's
    output dtype, as the model's own forward does. Outputs as :func:`head_token_stats`'."""
    stats = dict(return_entropy=return_entropy, return_top1=return_top1, return_mean_logit=return_mean_logit)
    many = _many(**stats)
    linear = head.base_layer if hasattr(head, "base_layer") else head
    rows = chunk_size or max(1, _REFERENCE_CHUNK_ELEMS // linear.out_features)

    def one(hc, lc):
        z = lm_head.transform_logits(head(hc), transform)
        out = logits_token_stats(z, lc, temperature=temperature, **stats)
        return out if many else (out,)

    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    with keep_on_device():  # as head_token_stats
        cat = _row_chunks(one, rows, grad, h, labels)
    return tuple(cat) if many else cat[0]


def _check_bt(name, t, shape):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, T] = {tuple(shape)}, got {tuple(t.shape)}")


def _target_mask(attention_mask, response_mask):
    """Positions ``[B, T]`` bool that get a log-prob: attended, in the response (if given) and
    preceded by an attended token (never t = 0 nor a left-padded row's first token)."""
    am = attention_mask.bool()
    target = am.clone() if response_mask is None else am & response_mask.bool()
    target[:, 0] = False
    target[:, 1:] &= am[:, :-1]
    return target


def _pack(input_ids, attention_mask):
    """Concatenate the attended tokens of every row into one row ``[1, N]`` with position ids
    restarting at 0 per sequence; returns (ids, pos, rows, cols) with rows/cols ``[N]`` the
    original coordinates of each packed token."""
    rows, cols = attention_mask.bool().nonzero(as_tuple=True)  # row-major: each row's tokens in order
    ids = input_ids[rows, cols].unsqueeze(0)
    counts = attention_mask.bool().sum(-1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=ids.device) - starts[rows]
    return ids, pos.unsqueeze(0), rows, cols


class PackedTargets(NamedTuple):
    """The packed row of a ``[B, T]`` batch and its scored tokens.

    ids, position_ids: ``[1, N]`` int64, N the attended tokens of the batch (row-major);
    src: ``[n]`` int64, the packed index of each state that predicts a target (the target is
    packed token ``src + 1``); rows, cols: ``[n]`` int64, the target's place in the ``[B, T]`` batch.
    segments: None, or (:func:`pack_shared_targets`) the row's
    :class:`~rlhf_fast.models.llama_forward.SharedPrefixSegments`; then a target is not always
    packed token ``src + 1`` (a prompt's last state predicts both responses' first tokens): its
    label is ``input_ids[rows, cols]``.
    """

    ids: torch.Tensor
    position_ids: torch.Tensor
    src: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    segments: Optional[llama_forward.SharedPrefixSegments] = None


def pack_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> PackedTargets:
    """The packed row of ``input_ids [B, T]`` (attended tokens per ``attention_mask [B, T]``,
    :func:`_pack`) and the packed states that predict the positions of ``target [B, T]`` bool
    (never column 0 nor a token whose predecessor is padding: :func:`_target_mask`): packed
    token k predicts token k + 1 when both belong to the same row."""
    ids, pos, rows, cols = _pack(input_ids, attention_mask)
    sel = torch.zeros_like(rows, dtype=torch.bool)
    sel[:-1] = (rows[1:] == rows[:-1]) & target[rows[1:], cols[1:]]
    src = sel.nonzero(as_tuple=True)[0]
    return PackedTargets(ids, pos, src, rows[src + 1], cols[src + 1])


def packed_states(model: nn.Module, pk: PackedTargets) -> torch.Tensor:
    """``[n, H]`` (the model's dtype) the final hidden states at ``pk.src`` of one forward of the
    packed row ``pk`` (:func:`pack_targets`): the last layer computes its queries from each
    sequence's first such state on and everything after attention for those states only
    (``select``), so a DPO row's prompts cost only their keys and values there (16 rows, prompts
    of 512 tokens, responses 65-129, h = 64, 2 layers, V = 256, 1 thread, forward + backward, min
    of 15: 284 -> 188 ms, the padded path's 187). No target: every state, so the (zero)
    gradients reach every weight. A model type not known to keep packed sequences apart (not in
    :data:`PACKED_TESTED` / :data:`PACKED_CHECKED`): the same states from the padded forward of
    the row's sequences (:func:`_padded_states`)."""
    if getattr(unwrap(model).config, "model_type", None) not in PACKED_TESTED | PACKED_CHECKED:
        return _padded_states(model, pk)
    if not pk.src.numel():
        return hidden_states(model, pk.ids, None, pk.position_ids)[0, pk.src]
    return hidden_states(model, pk.ids, None, pk.position_ids, select=(torch.zeros_like(pk.src), pk.src))


def _padded_states(model: nn.Module, pk: PackedTargets) -> torch.Tensor:
    """:func:`packed_states` through the padded forward: the row's sequences (position ids
    restarting, as transformers' ``find_packed_sequence_indices`` finds them) as right-padded rows
    ``[S, L]`` with their own position ids, the states at ``pk.src`` read back from them."""
    pos = pk.position_ids[0]
    seq = (torch.diff(pos, prepend=pos[:1] - 1) != 1).cumsum(0)  # [N] each token's sequence
    lengths = torch.bincount(seq)
    col = torch.arange(pos.numel(), device=pos.device) - (lengths.cumsum(0) - lengths)[seq]
    S, L = lengths.numel(), int(lengths.max())
    ids, am, p = (torch.zeros(S, L, dtype=t.dtype, device=pos.device) for t in (pk.ids, pos, pos))
    ids[seq, col], am[seq, col], p[seq, col] = pk.ids[0], 1, pos
    if not pk.src.numel():  # every state, so the (zero) gradients reach every weight
        return hidden_states(model, ids, am, p)[seq[pk.src], col[pk.src]]
    return hidden_states(model, ids, am, p, select=(seq[pk.src], col[pk.src]))


class SharedRows(NamedTuple):
    """The shared-prefix packed row of groups of rows of a ``[N, T]`` batch.

    ids, position_ids: ``[1, n]`` int64; at: ``[N, T]`` int64, the packed index of each attended
    token of the batch (the shared ones of a group's rows at one index), -1 at padding;
    segments: its :class:`~rlhf_fast.models.llama_forward.SharedPrefixSegments`."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    at: torch.Tensor
    segments: llama_forward.SharedPrefixSegments


def pack_shared_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: torch.Tensor) -> SharedRows:
    """Each group of rows laid out once: ``[shared, rest of row 1, ..., rest of row K]``, ``shared``
    the leading attended tokens all its rows have in common (a pair's prompt, and any first
    response tokens they share), each token's position id its place in its own row, so every
    state is the padded row's (:class:`~rlhf_fast.models.llama_forward.SharedPrefixSegments`
    ``(len(shared), (rest_1, ..., rest_K))``).

    input_ids / attention_mask ``[N, T]``; groups ``[G, K]`` int64, the rows of each group (every
    row once); a group of fewer than K rows is filled up with -1 after its rows (:func:`row_groups`).
    Left padding and holes are read through (each row's attended tokens in order)."""
    N, T = input_ids.shape
    _check_groups(groups, N)
    G, K = groups.shape
    valid = groups >= 0  # [G, K]
    rows = groups.clamp(min=0)
    am = attention_mask.bool()
    # each row's attended tokens first, in order (a right-padded batch is already so)
    order = torch.sort((~am).to(torch.int8), dim=1, stable=True).indices
    ids, att = input_ids.gather(1, order)[rows], am.gather(1, order)[rows] & valid[..., None]  # [G, K, T]
    # a filler row (-1) takes no token and does not bound the shared part
    same = ((ids == ids[:, :1]) & att | ~valid[..., None]).all(1)  # [G, T]
    p = same.long().cumprod(-1).sum(-1)  # [G] shared leading tokens
    rest = torch.where(valid, att.sum(-1) - p[:, None], 0)  # [G, K]
    size = p + rest.sum(1)
    off = torch.cumsum(size, 0) - size
    branch = p[:, None] + torch.cumsum(rest, 1) - rest  # [G, K]: each rest's start in its group
    k = torch.arange(T, device=ids.device)
    at_g = off[:, None, None] + torch.where(k < p[:, None, None], k, k + (branch - p[:, None])[..., None])
    sizes = torch.cat([p[:, None], rest], 1).tolist()  # one sync
    total = sum(map(sum, sizes))
    where = at_g[att]
    packed = torch.zeros(total, dtype=input_ids.dtype, device=ids.device)
    packed[where] = ids[att]  # the shared tokens written once per row, the same value
    pos = torch.zeros(total, dtype=torch.long, device=ids.device)
    pos[where] = k.expand(G, K, T)[att]
    at = torch.full((N, T), -1, dtype=torch.long, device=ids.device)
    real = groups[valid]  # back at the batch's own columns
    at[real[:, None], order[real]] = torch.where(att[valid], at_g[valid], -1)
    segments = llama_forward.SharedPrefixSegments([(g[0], tuple(g[1:])) for g in sizes])
    return SharedRows(packed[None], pos[None], at, segments)


def _check_groups(groups, n_rows: int) -> None:
    """ValueError unless ``groups`` is a ``[G, K]`` integer tensor holding each of the ``n_rows``
    rows once, each group's rows first and -1 after them."""
    if not isinstance(groups, torch.Tensor) or groups.dim() != 2 or groups.dtype.is_floating_point \
            or groups.dtype == torch.bool:
        raise ValueError(f"prefix_groups must be a [G, K] integer tensor of row indices, got "
                         f"{getattr(groups, 'shape', type(groups).__name__)}")
    valid = groups >= 0
    ok = (groups.shape[1] > 0 and bool(valid[:, 0].all()) and not bool((valid[:, 1:] & ~valid[:, :-1]).any())
          and torch.equal(groups[valid].sort().values, torch.arange(n_rows, device=groups.device)))
    if not ok:
        raise ValueError(f"prefix_groups must be a [G, K] tensor holding each of the {n_rows} rows once (a group's "
                         f"rows first, -1 after them), got "
                         f"{groups.tolist() if groups.numel() <= 16 else tuple(groups.shape)}")


def row_groups(group_ids: torch.Tensor) -> torch.Tensor:
    """``[G, K]`` int64 (:func:`pack_shared_rows`' ``groups``) from ``group_ids`` ``[N]`` int, the group
    of each row (an RL batch's prompt per answer): the rows of each group in row order, -1 after them
    where a group has fewer than K (the most any group has) rows."""
    if not isinstance(group_ids, torch.Tensor) or group_ids.dim() != 1:
        raise ValueError(f"group_ids must be a [N] tensor, got {getattr(group_ids, 'shape', type(group_ids))}")
    if not group_ids.numel():
        return torch.zeros(0, 1, dtype=torch.long, device=group_ids.device)
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)  # the rows group by group, each group's in row order
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=order.device) - start[inv[order]]
    out = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.long, device=group_ids.device)
    out[inv[order], slot] = order
    return out


def pair_groups(n_rows: int, device=None) -> torch.Tensor:
    """``[N/2, 2]``: row i with row i + N/2 (DPO's chosen and rejected rows)."""
    if n_rows % 2:
        raise ValueError(f"prefix sharing needs pairs of rows (row i with row i + N/2), got {n_rows} rows")
    half = torch.arange(n_rows // 2, device=device)
    return torch.stack([half, half + n_rows // 2], 1)


def pack_shared_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor,
                        groups: Optional[torch.Tensor] = None) -> PackedTargets:
    """The shared-prefix packed row of a batch of groups of rows (``prefix_sharing``) and its scored
    tokens.

    input_ids / attention_mask ``[N, T]``, target ``[N, T]`` bool (:func:`_target_mask`); groups
    ``[G, K]`` int64 (:func:`pack_shared_rows`; an RL batch's answers to one prompt), or None: pairs,
    row i with row i + N/2 (N even; DPO's chosen and rejected rows). Each group is laid out once
    (:func:`pack_shared_rows`): ``[shared, rest of its first row, rest of its second, ...]``. ``src``
    indexes the state that predicts each target (``rows``, ``cols``: its place in the batch; the
    label is ``input_ids[rows, cols]``): its row's previous attended token, holes read through as
    :func:`pack_targets` reads them; a target no state predicts (padding, a row's first token) is
    dropped, as there."""
    if groups is None:
        groups = pair_groups(input_ids.shape[0], input_ids.device)
    sr = pack_shared_rows(input_ids, attention_mask, groups)
    # each position's previous attended token in its row, by packed index (increasing along a row,
    # -1 at padding): the running max one column back; -1 where no token comes before
    prev = sr.at.cummax(1).values
    prev = torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)
    tr, tc = (target.bool() & attention_mask.bool() & (prev >= 0)).nonzero(as_tuple=True)
    return PackedTargets(sr.ids, sr.position_ids, prev[tr, tc], tr, tc, sr.segments)


def shared_states(model: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor,
                  segments: llama_forward.SharedPrefixSegments, src: torch.Tensor) -> torch.Tensor:
    """``[n, H]`` the final hidden states at the packed indices ``src [n]`` of one forward of a
    shared-prefix row: the last layer computes its queries and everything after attention only
    for those states, each once (a prompt's last state serves both rows of a pair)."""
    if not src.numel():  # nothing to score: every state, so the (zero) gradients reach every weight
        return hidden_states(model, ids, None, position_ids, segments=segments)[0, src]
    uniq, inv = torch.unique(src, return_inverse=True)
    h = hidden_states(model, ids, None, position_ids, select=(torch.zeros_like(uniq), uniq),
                      segments=segments)  # [u, H]
    return h[inv]


def shared_target_states(model: nn.Module, pk: PackedTargets) -> torch.Tensor:
    """``[n, H]`` the final hidden states at ``pk.src`` of one forward of the shared-prefix row
    ``pk`` (:func:`pack_shared_targets`, :func:`shared_states`)."""
    return shared_states(model, pk.ids, pk.position_ids, pk.segments, pk.src)


@_honour_context
def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    response_mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    packed: bool = False,
    position_ids: Optional[torch.Tensor] = None,
    return_top1: bool = False,
    return_mean_logit: bool = False,
    prefix_sharing: bool = False,
    prefix_groups: Optional[torch.Tensor] = None,
):
    """Per-token log-probs ``[B, T]`` float32 of ``input_ids`` under ``model`` at ``temperature``.

    input_ids ``[B, T]`` int; attention_mask / response_mask ``[B, T]`` 0/1 or bool.
    ``logp[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` placed at position t; 0 at
    t = 0, at padding and wherever ``response_mask`` is 0 (only those positions are
    computed). With ``return_entropy`` also returns the entropy ``[B, T]`` float32 of the
    distribution that predicted position t, same placement. ``packed=True`` runs one
    padding-free row with per-sequence position ids (Llama/Qwen/Mistral-style attention).
    ``prefix_sharing=True`` (rows i and i + B/2 are pairs; packed implied): one row in which each
    pair's common leading tokens (its prompt) are scored once, the rest of each row attending to
    them and not to the other row (:func:`pack_shared_targets`); needs a fusable head and a
    backbone :mod:`rlhf_fast.models.llama_forward` computes (ValueError otherwise).
    ``prefix_groups`` ``[G, K]`` int64 (with ``prefix_sharing=True`` only): the groups of rows
    that share their leading tokens instead of pairs — an RL batch's answers to one prompt, each
    prompt then scored once per group (:func:`row_groups` builds it from a group id per row;
    -1 fills a group of fewer rows). Either way the
    values come back at their padded places, equal to the padded path's up to float rounding.
    Differentiable in the model's parameters.

    The token statistics of TRL's fused head, each a further output in this order, same
    placement, detached: ``return_top1`` ``[B, T]`` bool, whether the token is the argmax of the
    logits that predicted it (the first maximal index on a tie, as torch.argmax; TRL's
    ``is_top1``), from the log-probs' own pass; ``return_mean_logit`` ``[B, T]`` float32, those
    logits averaged over the vocabulary and divided by ``temperature`` (TRL's ``mean_logits``),
    as one ``[H]`` vector product per token.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    B, T = input_ids.shape
    _check_bt("attention_mask", attention_mask, (B, T))
    _check_bt("response_mask", response_mask, (B, T))
    _check_bt("position_ids", position_ids, (B, T))
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for name, flag in (("return_top1", return_top1), ("return_mean_logit", return_mean_logit),
                       ("prefix_sharing", prefix_sharing)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if prefix_groups is not None:
        if not prefix_sharing:
            raise ValueError("prefix_groups needs prefix_sharing=True (the groups of rows scored in one shared row)")
        _check_groups(prefix_groups, B)
    stats = dict(return_entropy=return_entropy, return_top1=return_top1, return_mean_logit=return_mean_logit)
    if B == 0 or T == 0:  # nothing to score (hidden_states refuses an empty batch)
        return _zeros(B, T, input_ids.device, **stats)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    target = _target_mask(attention_mask, response_mask)
    why = None if prefix_sharing else _fallback_reason(model)
    # a head the fused op cannot take but whose logits we can compute: those, a chunk at a time
    logits_head = None if why is None else _logits_head(model)

    if prefix_sharing:
        if position_ids is not None:
            raise ValueError("position_ids must be None with prefix_sharing=True (they are rebuilt per sequence)")
        why = prefix_sharing_reason(model, T)
        if why is not None:
            raise ValueError(f"prefix_sharing=True cannot run: {why}")
        pk = pack_shared_targets(input_ids, attention_mask, target, prefix_groups)
        if pk.ids.numel() == 0:
            return _zeros(B, T, input_ids.device, **stats)
        tr, tc = pk.rows, pk.cols
        h_sel, labels = shared_target_states(model, pk), input_ids[tr, tc]
    elif packed:
        if position_ids is not None:
            raise ValueError("position_ids must be None with packed=True (they are rebuilt per sequence)")
        pk = pack_targets(input_ids, attention_mask, target)
        if why is not None and logits_head is None:
            raise ValueError(f"packed=True needs an LM head whose logits it can compute, but {why} (and only the "
                             f"model's own padded forward is known to apply it)")
        if pk.ids.numel() == 0:  # no attended token in any row (nonzero above has synced already)
            return _zeros(B, T, input_ids.device, **stats)
        mtype = getattr(unwrap(model).config, "model_type", None)
        if mtype not in PACKED_TESTED | PACKED_CHECKED:
            _warn_packed_untested(mtype)
        tr, tc = pk.rows, pk.cols
        h_sel, labels = packed_states(model, pk), pk.ids[0, pk.src + 1]
    else:
        tr, tc = target.nonzero(as_tuple=True)
        if why is not None and logits_head is None:
            check_input_ids(model, input_ids, positions=position_ids is None, position_ids=position_ids)
            pos = position_ids if position_ids is not None else default_position_ids(attention_mask)
            aux = moe_aux.active(model)
            with llama_forward.checkpointing_in_eval(backbone(model)):  # (an RL policy trains in eval mode)
                full = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                             **moe_aux.forward_kwargs(aux))
            if aux is not None:
                aux.record(full, attention_mask)
            logits = full.logits  # [B, T, V]: this head cannot be fused
            out = logits_token_stats(logits[tr, tc - 1], input_ids[tr, tc], temperature=temperature, **stats)
            return _scatter(out, tr, tc, B, T, _many(**stats))
        if tr.numel():
            # only the states that predict a target: columns [min(tc) - 1, max(tc)) (the
            # forward skips the later columns and the last layer's earlier queries)
            lo, hi = torch.stack(torch.aminmax(tc)).tolist()  # one sync
            h_sel = hidden_states(model, input_ids, attention_mask, position_ids, columns=(lo - 1, hi),
                                  select=(tr, tc - lo))
        else:  # nothing to score: every state, so the (zero) gradients still reach every weight
            h_sel = hidden_states(model, input_ids, attention_mask, position_ids)[tr, tc - 1]
        labels = input_ids[tr, tc]

    if logits_head is not None:
        out = logits_head_token_stats(h_sel, *logits_head, labels, temperature=temperature, chunk_size=chunk_size,
                                      **stats)
    else:
        weight, bias = lm_head_params(model)
        out = head_token_stats(h_sel, weight, bias, labels, temperature=temperature, chunk_size=chunk_size, **stats)
    return _scatter(out, tr, tc, B, T, _many(**stats))


def _many(return_entropy, return_top1, return_mean_logit) -> bool:
    return return_entropy or return_top1 or return_mean_logit


def _zeros(B, T, device, *, return_entropy, return_top1, return_mean_logit):
    """The outputs of :func:`sequence_logprobs` for a batch with nothing to score."""
    z = torch.zeros(B, T, dtype=torch.float32, device=device)
    out = (z,) + ((z.clone(),) if return_entropy else ())
    out += (torch.zeros(B, T, dtype=torch.bool, device=device),) if return_top1 else ()
    out += (z.clone(),) if return_mean_logit else ()
    return out if len(out) > 1 else z


def _scatter(out, tr, tc, B, T, many):
    """Per-target values ``[n]`` (a tuple when ``many``) at their ``(tr, tc)`` places of ``[B, T]``
    zeros: bool stays bool, float64 float64, every other float float32."""
    vals = out if many else (out,)
    res = []
    for v in vals:
        dt = v.dtype if v.dtype in (torch.float64, torch.bool) else torch.float32
        full = torch.zeros(B, T, dtype=dt, device=v.device)
        res.append(full.index_put((tr, tc), v.to(full.dtype)))
    return tuple(res) if many else res[0]


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _shared_loss_states(model, input_ids, attention_mask, mask, groups, c0: int, c1: int) -> torch.Tensor:
    """The ``[B, c1 − c0, H]`` states :func:`policy_loss` feeds the fused loss, from one forward of
    the shared-prefix row of ``groups``: at ``[r, t − c0]`` the state that predicts loss token
    ``(r, t)`` (``mask [B, T]``), zeros elsewhere (no loss token reads them)."""
    _check_groups(groups, input_ids.shape[0])
    why = prefix_sharing_reason(model, input_ids.shape[1])
    if why is not None:
        raise ValueError(f"prefix_groups cannot run: {why}")
    pk = pack_shared_targets(input_ids, attention_mask, mask, groups)
    h = shared_target_states(model, pk)  # [n, H]; no loss token: every state's graph, none placed
    out = h.new_zeros(input_ids.shape[0], c1 - c0, h.shape[-1])
    return out.index_put((pk.rows, pk.cols - c0), h)


def sequence_level_old_logp(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``old_logp`` that turns PPO's per-token ratio into GSPO's sequence ratio.

    logp (detached), old_logp ``[B, T]`` float, mask ``[B, T]`` bool (the loss tokens). With
    m_i = mean over row i's loss tokens of (logp − old_logp), returns ``logp − m_i``: the
    ratio exp(logp_θ − (logp − m_i)) then has the value s_i = exp(m_i) at every token of the
    row and the gradient s_i·∇logp_θ(token) — GSPO-token's sg[s_i]·π/sg[π] (verl's ``gspo``
    loss). With one advantage per row (GRPO, RLOO) that is exactly the gradient of GSPO's
    sequence objective (TRL's ``importance_sampling_level="sequence"``), whatever the
    aggregation; with per-token advantages (GAE) it is GSPO-token's. A row without loss
    tokens gets m = 0. Returns ``[B, T]`` in logp's dtype, detached.
    """
    with torch.no_grad():
        m = mask.to(logp.dtype)
        d = (logp - old_logp.to(logp.dtype)) * m
        seq = d.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        return logp - seq


def policy_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    importance_sampling_level: str = "token",
    prefix_groups: Optional[torch.Tensor] = None,
    **loss_kwargs,
):
    """The PPO-family policy loss of ``model`` on a rollout batch, from the last hidden state.

    Every ``[B, T]`` tensor (input_ids, attention_mask, response_mask, old_logp, advantages,
    ref_logp) is aligned to input_ids positions, as :func:`sequence_logprobs` returns them;
    the loss mask is ``response_mask`` (position 0 never counts). ``loss_kwargs`` go to
    :func:`rlhf_fast.ops.fused_linear_policy_loss` (kl_coef, kl_kind, entropy_coef,
    temperature, clip_low, clip_high, dual_clip, agg, normalizer, chunk_size). Returns
    ``(loss 0-dim float32, stats)``; ``stats["logp"]`` is ``[B, T]`` aligned the same way.

    ``importance_sampling_level``: ``"token"`` (PPO's per-token ratio) or ``"sequence"``
    (GSPO, Zheng et al. 2025): every token of a row takes the row's ratio
    exp(mean over its loss tokens of (logp − old_logp)), clipped as a whole, with the gradient
    of GSPO-token (each token's own log-prob carries it; see :func:`sequence_level_old_logp`).
    ``clip_frac``, ``dual_clip_frac`` and ``ratio_mean`` are then means over the answers (TRL's
    ``clip_ratio/region_mean``; :func:`rlhf_fast.algorithms.policy_losses.answer_stats`),
    ``approx_kl`` still over the tokens.

    ``prefix_groups`` ``[G, K]`` int64 (None: the padded forward): the groups of rows sharing their
    leading tokens (an RL batch's answers to one prompt), the forward one shared-prefix row in
    which each group's prompt is computed once, forward and backward (``sequence_logprobs(...,
    prefix_sharing=True, prefix_groups=...)``; position_ids must be None); the loss then takes the
    same per-token inputs as the padded path, so its value and statistics are the padded ones up to
    float rounding, whatever ``agg``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    shape = tuple(input_ids.shape)
    for name, t in (("attention_mask", attention_mask), ("response_mask", response_mask),
                    ("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        _check_bt(name, t, shape)
    if response_mask is None or old_logp is None or advantages is None:
        raise ValueError("response_mask, old_logp and advantages are required")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    mask = _target_mask(attention_mask, response_mask)
    temperature = loss_kwargs.get("temperature", 1.0)
    sequence_level = importance_sampling_level == "sequence"
    share = {} if prefix_groups is None else dict(prefix_sharing=True, prefix_groups=prefix_groups)
    if share and position_ids is not None:
        raise ValueError("position_ids must be None with prefix_groups (they are rebuilt per sequence)")
    why = _fallback_reason(model)
    if why is not None or sequence_level:
        # the head cannot be fused, or the ratio needs every log-prob of a row before the loss:
        # the same loss composed from the per-token log-probs (still the fused head's)
        from rlhf_fast.ops import reference

        logp, entropy = sequence_logprobs(model, input_ids, attention_mask, response_mask=mask,
                                          temperature=temperature, return_entropy=True, position_ids=position_ids,
                                          **share)
        if sequence_level:
            old_logp = sequence_level_old_logp(logp.detach(), old_logp, mask)
        kw = {k: v for k, v in loss_kwargs.items() if k not in ("temperature", "chunk_size")}
        loss, stats = reference.policy_loss_from_logp(logp, entropy, old_logp, advantages, mask,
                                                      ref_logp=ref_logp, kl_fn=ops.kl_penalty, **kw)
        if sequence_level:  # one ratio per answer: its clip and ratio statistics over the answers (TRL's)
            from rlhf_fast.algorithms.policy_losses import answer_stats

            with torch.no_grad():
                lp, old, adv = reference._masked_inputs(mask, logp.detach(), old_logp, advantages.detach())
                _, ratio, clipped, dual = reference.ppo_token_loss(
                    lp, old, adv, clip_low=kw.get("clip_low", 0.2), clip_high=kw.get("clip_high"),
                    dual_clip=kw.get("dual_clip"))
            stats.update(answer_stats(ratio, clipped, dual, mask))
        return loss, stats
    B, T = shape
    # Only the columns holding loss tokens go through the LM head: the prompt's logits are never
    # used (a rollout batch's responses start at one column, after the left-padded prompts).
    # Column t is predicted by the state h[:, t − 1] (the forward computes only those states:
    # :func:`hidden_states`' columns); with no loss token at all, every column (and a zero
    # state for t = 0) keeps the loss's graph.
    cols = mask.any(0).nonzero()
    c0, c1 = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, T)
    if share:
        hs = _shared_loss_states(model, input_ids, attention_mask, mask, prefix_groups, c0, c1)
    elif c0 > 0:
        hs = hidden_states(model, input_ids, attention_mask, position_ids, columns=(c0 - 1, c1 - 1))
    else:
        h = hidden_states(model, input_ids, attention_mask, position_ids)  # [B, T, H]
        hs = torch.cat([h.new_zeros(B, 1, h.shape[2]), h[:, :c1 - 1]], dim=1)
    kw = dict(loss_kwargs)
    if kw.get("normalizer") is None and kw.get("agg") == "seq-mean-token-sum-norm":
        kw["normalizer"] = float(B * T)  # the [B, T] batch's own denominator, not the slice's
    cut = lambda x: None if x is None else x[:, c0:c1]  # noqa: E731
    weight, bias = lm_head_params(model)
    loss, stats = ops.fused_linear_policy_loss(hs, weight, cut(input_ids), cut(old_logp), cut(advantages), cut(mask),
                                               ref_logp=cut(ref_logp), bias=bias, **kw)
    if "logp" in stats:
        # back at input_ids positions; 0 outside the loss mask, as sequence_logprobs gives them
        lp = torch.where(cut(mask), stats["logp"], torch.zeros_like(stats["logp"]))
        stats["logp"] = torch.nn.functional.pad(lp, (c0, T - c1))
    return loss, stats


__all__ = [
    "check_input_ids",
    "position_table_size",
    "hidden_states",
    "lm_head_params",
    "unfusable_reason",
    "sequence_logprobs",
    "pack_shared_rows",
    "packed_states",
    "pack_shared_targets",
    "pair_groups",
    "row_groups",
    "shared_states",
    "shared_target_states",
    "prefix_sharing_reason",
    "mean_logits",
    "head_token_stats",
    "logits_token_stats",
    "logits_head_token_stats",
    "policy_loss",
    "sequence_level_old_logp",
    "IMPORTANCE_SAMPLING_LEVELS",
    "default_position_ids",
    "backbone",
    "unwrap",
]
