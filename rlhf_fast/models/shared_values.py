"""Critic values from the shared-prefix row of groups of answers (the RL trainer's ``ppo.prefix_sharing``).

The policy and the reference score a batch of answers grouped by prompt as one packed row in
which each prompt is laid out once and each of its answers attends to it
(:func:`rlhf_fast.models.logprobs.pack_shared_targets`,
:class:`~rlhf_fast.models.llama_forward.SharedPrefixSegments`). :func:`shared_critic_values` runs
a :class:`~rlhf_fast.models.loading.ValueModel` critic on the same row: its backbone through
:func:`rlhf_fast.models.llama_forward.hidden_states` (the only forward that takes the row's
attention structure), its float32 value head on the states before response tokens only, and the
values placed back where ``rl.critic_values`` puts them. Under DDP and FSDP2 the whole of it,
value head included, runs as the wrapper's forward, so gradient reduction (DDP's search for unused
parameters too) and parameter gathering are those of the padded call.

A PPO step on the CPU (benchmarks/e2e.py's model and reward, 4 prompts × 4 answers of 255-token
prompts, ~28-token answers, 1 thread, min of 20 alternating steps): padded 210 ms, prefix sharing
with the critic padded 172 ms, with the critic shared too 95 ms.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rlhf_fast.models import llama_forward
from rlhf_fast.models.logprobs import _data_parallel_root, _target_mask, pack_shared_targets


_COMPUTES = ("a Llama / Mistral / Qwen2 / Qwen3 with plain Linear layers (no peft / LoRA adapters), sdpa or "
             "eager attention, no sliding window shorter than the row")


def _inner(critic: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (FSDP2 shards in place: the module itself)."""
    return critic.module if isinstance(critic, nn.parallel.DistributedDataParallel) else critic


def critic_sharing_reason(critic, seq_len: int) -> Optional[str]:
    """Why :func:`shared_critic_values` cannot compute ``critic`` for sequences of up to ``seq_len``
    tokens, or None: it is not a plain :class:`~rlhf_fast.models.loading.ValueModel` (another
    module, a subclass with its own forward, hooks), or its backbone is not one
    :mod:`rlhf_fast.models.llama_forward` computes (peft adapters, other families, the torch backend).
    Call it on the critic before a DDP / FSDP2 wrapper adds its hooks."""
    from rlhf_fast.models.loading import ValueModel
    from rlhf_fast.ops import _dispatch

    vm = _inner(critic)
    if not isinstance(vm, ValueModel):
        return f"the critic is a {type(vm).__name__}, not a rlhf_fast ValueModel"
    if type(vm).forward is not ValueModel.forward or "forward" in vm.__dict__:
        return f"the critic ({type(vm).__name__}) replaces ValueModel's forward"
    if not llama_forward._no_hooks(vm) or not llama_forward._plain_linear(vm.value_head):
        return "the critic or its value head has hooks, or the head is not a plain Linear"
    if _dispatch.forced_backend() == "torch":
        return "the torch backend is forced (use_backend('torch') / RLHF_FAST_BACKEND=torch)"
    if not llama_forward.supported(vm.backbone, seq_len):
        return (f"the critic's backbone ({type(vm.backbone).__name__}) is not one rlhf_fast.models."
                f"llama_forward computes: {_COMPUTES}")
    return None


def _check_shapes(input_ids, attention_mask, response_mask) -> None:
    """ValueError naming the argument unless input_ids is ``[B, T]`` and both masks are too (a
    mismatch would otherwise surface as a broadcast error deep inside the packing)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    for name, t in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")


def shared_critic_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """V(s_t) ``[B, T]`` float32 of the response tokens from one forward of the shared-prefix row of
    ``groups``: equal, up to float rounding, to ``rl.critic_values(critic, input_ids,
    attention_mask)`` at every token of ``response_mask`` whose predecessor is attended (the value
    head's output at t − 1, the state before the action), 0 elsewhere — the values of the prompt
    tokens, which every loss and GAE mask out, are not computed.

    critic: a :class:`~rlhf_fast.models.loading.ValueModel` (bare, DDP-wrapped or FSDP2-sharded)
    that :func:`critic_sharing_reason` accepts; input_ids ``[B, T]`` int64; attention_mask /
    response_mask ``[B, T]`` bool or 0/1, at least one attended token; groups ``[G, K]`` int64, the
    rows that share their leading tokens (:func:`rlhf_fast.models.logprobs.row_groups`; -1 fills a
    group of fewer rows). Differentiable in the critic's parameters (a batch with no response token
    still runs every state, so each parameter gets its zero gradient, as on every other rank)."""
    _check_shapes(input_ids, attention_mask, response_mask)
    vm = _inner(critic)
    B, T = input_ids.shape
    pk = pack_shared_targets(input_ids, attention_mask, _target_mask(attention_mask, response_mask), groups)
    if pk.ids.numel() == 0:
        raise ValueError("attention_mask must mark at least one token (the shared-prefix row would be empty)")
    if not llama_forward.supported(vm.backbone, pk.segments.max_len):
        raise ValueError(f"ppo.prefix_sharing: the critic's backbone cannot run rows of "
                         f"{pk.segments.max_len} tokens through rlhf_fast.models.llama_forward, which "
                         f"computes {_COMPUTES}")
    uniq, inv = torch.unique(pk.src, return_inverse=True)  # a prompt's last state serves each answer once

    def values() -> torch.Tensor:  # [u] float32: the value head on the selected states
        select = (torch.zeros_like(uniq), uniq) if uniq.numel() else None
        h = llama_forward.hidden_states(vm.backbone, pk.ids, None, pk.position_ids, select=select,
                                        segments=pk.segments)
        h = h if select is not None else h[0, uniq]  # no response token: every state, none read
        return vm.value_head(h.to(vm.value_head.weight.dtype)).squeeze(-1).float()

    v = llama_forward.call_as_forward(critic, values) if _data_parallel_root(critic) else values()
    return v.new_zeros(B, T).index_put((pk.rows, pk.cols), v[inv])


__all__ = ["critic_sharing_reason", "shared_critic_values"]
