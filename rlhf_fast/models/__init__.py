"""Hugging Face models for rlhf_fast: tiny local models, fused log-probs, loading, value heads."""

from .tiny import FAMILIES, sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer

__all__ = ["train_tokenizer", "tiny_causal_lm", "tiny_reward_model", "sample_texts", "FAMILIES"]
