"""Hugging Face models for rlhf_fast: tiny local models, fused log-probs, loading, value heads."""

from .loading import (
    AdapterDisabledReference,
    ValueModel,
    enable_activation_checkpointing,
    last_token_index,
    load_policy,
    load_reward_model,
    make_reference,
    reward_scores,
)
from .logprobs import hidden_states, lm_head_params, policy_loss, sequence_logprobs, unfusable_reason
from .tiny import FAMILIES, sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer

__all__ = [
    "train_tokenizer",
    "tiny_causal_lm",
    "tiny_reward_model",
    "sample_texts",
    "FAMILIES",
    "hidden_states",
    "lm_head_params",
    "unfusable_reason",
    "sequence_logprobs",
    "policy_loss",
    "load_policy",
    "enable_activation_checkpointing",
    "make_reference",
    "AdapterDisabledReference",
    "ValueModel",
    "load_reward_model",
    "reward_scores",
    "last_token_index",
]
