"""TPO (Triple Preference Optimization, Saeidi et al. 2024; TRL's experimental ``TPOTrainer``) as
loss types of ``rlhf-fast dpo``: the pieces the DPO trainer calls for it.

A TPO record is a pair with a gold answer: ``{"prompt", "chosen", "rejected", "reference"}``
(:class:`rlhf_fast.feedback.formats.TripleRecord`; text, or chat messages as chosen and rejected
are). The loss is reference-free — no reference *model*: TPO's "reference" is the gold response —
and is TRL's on the chosen / rejected rows (``tpo`` = TRL's ``sigmoid`` on summed log-probs,
``tpo_hinge`` = ``hinge``, ``tpo_ipo`` = ``ipo`` on token means, ``tpo_l`` = ``tpo-l``: token
means and the margin ``tpo_l_gamma``; :func:`rlhf_fast.trainers.preference_losses.reference_free_loss`),
plus ``tpo_alpha`` × the token-mean NLL of the gold responses. The gold rows join the batch as a
third block, ``[chosen × B, rejected × B, gold × B]``, through the same fused-head forward (TRL's
collator lays them out the same way); with ``tpo_alpha: 0`` they are left out, as TRL leaves them
out, and the step is two rows a pair.

Encoding: as TRL's ``TPOTrainer._prepare_dataset``, the gold response takes part in finding where
a conversational prompt ends (the tokens all three rows share), so with ``tpo_alpha: 0`` too.
Truncation (``max_len`` per row): the chosen and rejected rows exactly as DPO's
(:func:`rlhf_fast.trainers.dpo.truncate_pair`), the gold row by the same rule on its own
(prompt + gold): ``keep_start`` / ``keep_end`` are TRL's collator's; with ``balanced`` the gold
row may keep more or fewer prompt tokens than the pair. Under ``prefix_sharing`` the three rows of
a pair share their common leading tokens in the packed row.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from rlhf_fast.ops._validate import finite

from .preference_losses import TPO_LOSSES


def tpo_loss_name(cfg) -> Optional[str]:
    """The TPO loss of a DPO config (``tpo``, ``tpo_hinge``, ``tpo_ipo``, ``tpo_l``), or None."""
    terms = cfg.loss_terms
    return terms[0][0] if len(terms) == 1 and terms[0][0] in TPO_LOSSES else None


def check_tpo_fields(cfg) -> None:
    """``tpo_alpha`` (finite, >= 0) and ``tpo_l_gamma`` (finite); with a TPO loss, ``data_kind``
    must be ``pairs`` (the only kind with a gold answer), ``cpo_alpha`` / ``simpo_gamma`` left at
    their defaults (TPO's NLL weight is ``tpo_alpha``, its margin ``tpo_l_gamma``); a
    ``tpo_alpha`` / ``tpo_l_gamma`` set for another loss is refused. ValueError naming the field."""
    finite("tpo_alpha", cfg.tpo_alpha, ">= 0")
    finite("tpo_l_gamma", cfg.tpo_l_gamma)
    name = tpo_loss_name(cfg)
    if name is None:
        for field, default in (("tpo_alpha", 1.0), ("tpo_l_gamma", 0.5)):
            if getattr(cfg, field) != default:
                raise ValueError(f"{field} applies to loss_type {sorted(TPO_LOSSES)} only (TRL's TPOTrainer), got "
                                 f"{[n for n, _ in cfg.loss_terms]}")
        return
    if name != "tpo_l" and cfg.tpo_l_gamma != 0.5:
        raise ValueError(f"tpo_l_gamma applies to loss_type 'tpo_l' only, got {name!r}")
    for field, default, instead in (("cpo_alpha", 1.0, "tpo_alpha: the weight of the gold response's NLL"),
                                    ("simpo_gamma", 0.5, "tpo_l_gamma")):
        if getattr(cfg, field) != default:
            raise ValueError(f"{field} must be left unset with loss_type {name!r} (use {instead})")
    if cfg.data_kind != "pairs":
        raise ValueError(f"data_kind must be 'pairs' with loss_type {name!r}: TPO needs each pair's gold "
                         f"`reference` response, which {cfg.data_kind!r} records do not have")


def gold_rows(cfg) -> bool:
    """Whether a step scores the gold rows: a TPO loss with ``tpo_alpha`` > 0 (TRL skips their
    forward at 0)."""
    return tpo_loss_name(cfg) is not None and cfg.tpo_alpha > 0


def encode_triple(tokenizer, record, loss_type: str) -> Optional[Tuple[List[int], List[int], List[int], List[int]]]:
    """``(prompt ids, chosen ids, rejected ids, gold ids)`` of a TPO ``record`` (a pair with a
    gold ``reference``), not truncated; None when the prompt has no token. Text responses as
    :func:`rlhf_fast.trainers.dpo.encode_texts` encodes them (+ eos, after the prompt text, the
    prompt cut to the ids it shares with all three: TRL's TPO); conversational ones as
    TRL's TPO: the prompt is the tokens the template's prompt shares with all three of
    prompt + response (:func:`rlhf_fast.trainers.sft_data.completion_tokens`). ValueError naming
    ``reference`` when the record has none."""
    from .dpo import encode_texts

    gold = getattr(record, "reference", None)
    if gold is None:
        raise ValueError(f"loss_type {loss_type!r} needs a `reference` (the gold response) in every pair record "
                         "(TRL's TPO triple-preference format: prompt, chosen, rejected, reference)")
    prompt, chosen, rejected = record.prompt, record.chosen, record.rejected
    if isinstance(chosen, str):
        if not (isinstance(rejected, str) and isinstance(gold, str)):
            raise ValueError("a text TPO triple needs text chosen, rejected and reference responses, got "
                             f"{type(chosen).__name__}, {type(rejected).__name__}, {type(gold).__name__}")
        p, (c, r, g) = encode_texts(tokenizer, prompt, (chosen, rejected, gold))
    else:
        from .sft_data import completion_tokens

        p, (c, r, g) = completion_tokens(tokenizer, prompt, chosen, rejected, gold)
    return (p, c, r, g) if p else None


def truncate_gold(prompt: List[int], gold: List[int], pair_prompt: List[int], cfg) -> Dict[str, List[int]]:
    """The gold row (``prompt`` + ``gold`` ids, not yet cut) of an item cut as ``cfg`` cuts each
    row (``max_len``, ``truncation_mode``, ``max_prompt_length``, ``max_completion_length``;
    :func:`rlhf_fast.trainers.dpo.truncate_pair` on prompt + gold): ``{"gold"}``, and
    ``"gold_prompt"`` when it keeps other prompt tokens than the pair's cut ``pair_prompt``. (A
    prompt that fills ``max_len`` under ``keep_start`` leaves it nothing; the pair itself is
    dropped then, as DPO drops it.)"""
    from .dpo import truncate_pair

    cut = truncate_pair(list(prompt), list(gold), list(gold), cfg.max_len, cfg.truncation_mode,
                        max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length)
    if cut is None:  # keep_start with the prompt filling max_len: the caller drops the pair
        return {"gold": []}
    return {"gold": cut["chosen"], **({"gold_prompt": cut["prompt"]} if cut["prompt"] != pair_prompt else {})}


def triple_groups(n_pairs: int, device=None) -> torch.Tensor:
    """``[B, 3]`` int64: each pair's rows ``(i, B + i, 2B + i)`` in ``[chosen × B, rejected × B,
    gold × B]`` — the groups that share their prompt under ``prefix_sharing``
    (:func:`rlhf_fast.models.logprobs.sequence_logprobs`' ``prefix_groups``)."""
    return torch.arange(3 * n_pairs, device=device).view(3, n_pairs).t().contiguous()


__all__ = ["tpo_loss_name", "check_tpo_fields", "gold_rows", "encode_triple", "truncate_gold", "triple_groups"]
