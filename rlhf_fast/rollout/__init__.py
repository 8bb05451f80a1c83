"""Rollouts: the generation engine interface and its transformers backend on the fused sampler.

Tool calling over any engine is :mod:`rlhf_fast.rollout.tools`; environments whose methods are
tools (TRL's ``environment_factory``) are :mod:`rlhf_fast.rollout.environments`."""

from .hf_engine import HFRolloutEngine
from .types import Prompts, RolloutBatch, RolloutEngine, SamplingParams, logprob_gap

__all__ = ["SamplingParams", "RolloutBatch", "RolloutEngine", "HFRolloutEngine", "logprob_gap", "Prompts"]
