"""Rollouts: the generation engine interface and its transformers backend on the fused sampler."""

from .hf_engine import HFRolloutEngine
from .types import Prompts, RolloutBatch, RolloutEngine, SamplingParams, logprob_gap

__all__ = ["SamplingParams", "RolloutBatch", "RolloutEngine", "HFRolloutEngine", "logprob_gap", "Prompts"]
