"""``rlhf-fast eval``: a policy's reward, win-rate against the reference, KL and length.

Both models answer the same prompts (greedy by default); every answer is scored by the
reward sources; win-rate = P(policy reward > reference reward) + ½ P(tie); KL is the mean
per-sequence Σ (log π − log π_ref) over the policy's own answers (k1, an unbiased estimate of
KL(π‖π_ref) when sampled). ``--run RUN_DIR`` takes the final policy of an RL run, rebuilds
its initial policy as the reference, and reuses its prompts and reward functions.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Sequence

import torch


def evaluate_policy(
    policy,
    tokenizer,
    prompts: Sequence[str],
    reward,
    *,
    reference=None,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    n: int = 1,
    seed: int = 0,
) -> Dict[str, float]:
    """Evaluate ``policy`` on ``prompts`` (list of str) under ``reward`` (a CombinedReward or a
    callable ``fn(prompts, completions) -> list[float]``). Returns a dict of floats: reward
    mean/std, per-source means, and with ``reference``: reference reward, win_rate, kl
    (mean sequence k1), plus response length mean/max for both."""
    from rlhf_fast.algorithms import CombinedReward, RewardContext
    from rlhf_fast.models.logprobs import sequence_logprobs
    from rlhf_fast.rollout import HFRolloutEngine, SamplingParams

    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if not isinstance(reward, CombinedReward):
        reward = CombinedReward([reward])
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=n, seed=seed)

    def answer(model):
        b = HFRolloutEngine(model, tokenizer).generate(list(prompts), params)
        rm = b.response_mask.bool() & b.attention_mask.bool()
        rm[:, 0] = False
        out = reward(list(b.prompt_texts), list(b.response_texts),
                     RewardContext(b.input_ids, b.attention_mask, rm.sum(1).tolist()))
        return b, rm, out

    res: Dict[str, float] = {}
    b, rm, out = answer(policy)
    res["reward/mean"] = float(out.total.mean())
    res["reward/std"] = float(out.total.std()) if out.total.numel() > 1 else 0.0
    for k, v in out.per_source.items():
        res[f"reward/{k}"] = float(v[torch.isfinite(v)].mean()) if torch.isfinite(v).any() else float("nan")
    res["length/mean"] = float(rm.sum(1).float().mean())
    res["length/max"] = float(rm.sum(1).max())
    if reference is not None:
        t = 1.0 if temperature == 0 else temperature
        with torch.no_grad():
            lp = sequence_logprobs(policy, b.input_ids, b.attention_mask, response_mask=rm, temperature=t)
            lr = sequence_logprobs(reference, b.input_ids, b.attention_mask, response_mask=rm, temperature=t)
        res["kl"] = float(((lp - lr) * rm).sum(1).mean())
        _, rm_ref, out_ref = answer(reference)
        res["reference/reward_mean"] = float(out_ref.total.mean())
        res["reference/length_mean"] = float(rm_ref.sum(1).float().mean())
        wins = (out.total > out_ref.total).float() + 0.5 * (out.total == out_ref.total).float()
        res["win_rate"] = float(wins.mean())
    res["num_prompts"] = len(prompts)
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="an RL run folder: its final policy, initial policy as reference, "
                                                    "prompts and reward functions")
    parser.add_argument("--policy", default=None, help="policy path (save_pretrained folder with tokenizer)")
    parser.add_argument("--reference", default=None, help="reference policy path (default: none, or the run's)")
    parser.add_argument("--prompts", default=None, help="prompts file (.txt one per line or .jsonl with 'prompt')")
    parser.add_argument("--reward-fn", action="append", default=[], help="module:function (repeatable)")
    parser.add_argument("--reward-model", default=None, help="reward model path")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def _check_args(args) -> None:
    """Every path and number of the command line, before any model is loaded (a missing
    local folder would otherwise be looked up on the hub)."""
    import math

    for flag, value in (("--run", args.run), ("--policy", args.policy), ("--reference", args.reference),
                        ("--reward-model", args.reward_model)):
        if value is not None and not os.path.isdir(value):
            raise FileNotFoundError(f"{flag}: no such local folder {value!r} (nothing is downloaded)")
    if args.run is not None and not os.path.isfile(os.path.join(args.run, "config.yaml")):
        raise FileNotFoundError(f"--run {args.run}: not an RL run folder (no config.yaml)")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--n", args.n)):
        if value < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {value}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")


def run(args) -> int:
    """Evaluate and print one JSON object (also written to ``--out``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.algorithms import CallableReward, CombinedReward, RewardModelReward, load_callable

    from rlhf_fast.trainers.config import atomic_write_text, check_output_path

    _check_args(args)
    if args.out:
        check_output_path(args.out, "--out")  # before the evaluation, whose results it will hold
    prompts, reference, fns = None, None, list(args.reward_fn)
    policy_path = args.policy
    if args.run:
        from rlhf_fast.trainers.config import load_config
        from rlhf_fast.trainers.rl import build_tiny_policy, load_prompts
        from rlhf_fast.trainers.rl_config import RLConfig

        cfg = load_config(RLConfig, os.path.join(args.run, "config.yaml"))
        policy_path = policy_path or os.path.join(args.run, "final", "policy")
        if args.reference is None:
            if not (cfg.model.policy.startswith("tiny:") or os.path.isdir(cfg.model.policy)):
                raise FileNotFoundError(f"--run {args.run}: its initial policy {cfg.model.policy!r} (the reference) "
                                        "is not a local folder; give --reference PATH")
            reference = (build_tiny_policy(cfg)[0] if cfg.model.policy.startswith("tiny:")
                         else AutoModelForCausalLM.from_pretrained(cfg.model.policy))
        prompts = load_prompts(cfg.data)
        fns = fns or list(cfg.reward.functions)
    if policy_path is None:
        raise ValueError("give --policy PATH or --run RUN_DIR")
    if not os.path.isdir(policy_path):
        raise FileNotFoundError(f"policy folder not found: {policy_path}")
    if args.prompts:
        from rlhf_fast.trainers.rl import read_prompts_file

        prompts = read_prompts_file(args.prompts, name="--prompts")
    if not prompts:
        raise ValueError("give --prompts FILE (or --run RUN_DIR)")
    tok = AutoTokenizer.from_pretrained(policy_path)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    if args.reference:
        reference = AutoModelForCausalLM.from_pretrained(args.reference)
    if reference is not None:
        reference = reference.eval()
    sources = [CallableReward(load_callable(s), name=s.rsplit(":", 1)[1]) for s in fns]
    if args.reward_model:
        from rlhf_fast.models.loading import load_reward_model

        sources.append(RewardModelReward(load_reward_model(args.reward_model),
                                         AutoTokenizer.from_pretrained(args.reward_model)))
    if not sources:
        raise ValueError("no reward source: give --reward-fn module:function and/or --reward-model PATH")
    res = evaluate_policy(policy, tok, prompts, CombinedReward(sources), reference=reference,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, n=args.n)
    text = json.dumps(res, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0
