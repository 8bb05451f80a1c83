"""Padding-free packing of a micro-batch, shared by the trainers that score responses.

SFT's ``packing`` and DPO's ``padding_free`` run one row per micro-batch: every attended token
of the ``[B, T]`` right-padded batch, row after row, with position ids restarting at 0 for each
sequence, so that the attention (llama_forward's one sdpa per sequence, transformers' packed-sequence
detection) stays inside each sequence (TRL's ``DataCollatorForLanguageModeling(padding_free=True)``
rows). :func:`rlhf_fast.models.logprobs.sequence_logprobs` with ``packed=True`` builds that row
(``logprobs.pack_targets``) and gives the per-token log-probs back at their ``[B, T]`` places; the
functions here give the hidden states of the tokens that predict a target, for callers that need
more of those states than the log-prob (DPO's WPO weights read log Σ p² from them).

DPO's ``prefix_sharing`` packs a micro-batch of pairs tighter: each pair once, as ``[prompt,
chosen, rejected]``, the rejected tokens attending to the prompt but not to the chosen ones and
their position ids continuing from the prompt's end
(``sequence_logprobs(..., prefix_sharing=True)``, ``logprobs.pack_shared_targets``,
``llama_forward.SharedPrefixSegments``): every prompt token is scored once instead of twice, in
the forward and the backward. It implies padding-free. The RL trainer's ``ppo.prefix_sharing``
lays out groups of K rows the same way (``[prompt, answer 1, ..., answer K]``,
``sequence_logprobs(..., prefix_groups=...)``, ``logprobs.policy_loss(..., prefix_groups=...)``).
"""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_fast.models.logprobs import PackedTargets, pack_shared_targets, pack_targets


def packed_target_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor, *,
                         prefix_sharing: bool = False):
    """``(h [n, H] in the model's dtype, labels [n] int64, rows [n], cols [n])``: the final hidden
    states of one packed forward of the batch that predict the ``target [B, T]`` positions, their
    labels and the targets' ``[B, T]`` coordinates — the states and the order
    ``sequence_logprobs(..., packed=True)`` feeds the LM head, so log-probs computed from them equal
    its values bit for bit. Needs at least one attended token (``_pack`` of an empty batch is empty).
    ``prefix_sharing``: the shared-prefix row of pairs (rows i and i + B/2) instead, as
    ``sequence_logprobs(..., prefix_sharing=True)`` runs it (the same values, bit for bit)."""
    from rlhf_fast.models.logprobs import packed_states, shared_target_states

    if prefix_sharing:
        pk = pack_shared_targets(input_ids, attention_mask, target)
        return shared_target_states(model, pk), input_ids[pk.rows, pk.cols], pk.rows, pk.cols
    pk = pack_targets(input_ids, attention_mask, target)
    return packed_states(model, pk), pk.ids[0, pk.src + 1], pk.rows, pk.cols


def check_packable(key: str, *models) -> None:
    """ValueError naming the config ``key`` when one of ``models`` (None skipped) cannot run
    packed: its LM head can neither be fused nor computed a chunk of logits at a time (a head
    that scales or softcaps its logits, or carries a LoRA adapter, can:
    :mod:`rlhf_fast.models.lm_head`), and the packed path has no full-logits fallback."""
    from rlhf_fast.models.logprobs import _logits_head, unfusable_reason

    for m in models:
        why = None if m is None else unfusable_reason(m)
        if why is not None and _logits_head(m) is None:
            raise ValueError(f"{key}: true needs a model whose LM head the packed row can compute (a plain Linear, "
                             f"a logit scale or softcap its forward applies), but {why}; set {key}: false")


def check_prefix_shareable(key: str, seq_len: int, *models,
                           alternative: Optional[str] = "padding_free: true packs without sharing the prompt") -> None:
    """ValueError naming the config ``key`` when one of ``models`` (None skipped) cannot score
    shared-prefix rows of up to ``seq_len`` tokens per sequence
    (:func:`rlhf_fast.models.logprobs.prefix_sharing_reason`: an unfusable LM head, a backbone
    llama_forward does not compute — peft adapters included —, the torch backend forced); there is
    no transformers fallback for that attention. ``alternative``: the message's hint (None: none)."""
    from rlhf_fast.models.logprobs import prefix_sharing_reason

    for m in models:
        why = None if m is None else prefix_sharing_reason(m, seq_len)
        if why is not None:
            hint = f" ({alternative})" if alternative else ""
            raise ValueError(f"{key}: true needs a fusable LM head and a backbone rlhf_fast.models.llama_forward "
                             f"computes, but {why}; set {key}: false{hint}")


__all__ = ["PackedTargets", "pack_targets", "pack_shared_targets", "packed_target_states", "check_packable",
           "check_prefix_shareable"]
