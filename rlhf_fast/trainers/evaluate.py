"""``rlhf-fast eval``: a policy's reward, win-rate against the reference, KL and length.

Both models answer the same prompts (greedy by default; sampled, each with a seed of its own,
so their draws are independent); every answer is scored by the reward sources; win-rate =
P(policy reward > reference reward) + ½ P(tie) over the answer pairs scored on both sides (an
answer no source scored is left out, as from the reward means; NaN when no pair is left); KL is
the mean per-sequence Σ (log π − log π_ref) over the policy's own answers (k1, an unbiased
estimate of KL(π‖π_ref) when sampled, both models' logits divided by the sampling temperature;
with greedy answers it is only their log-ratio at temperature 1). ``--run RUN_DIR``
takes the final policy of an RL run, loads the reference it trained against (its
``model.reference`` folder, else its initial policy, rebuilt), and reuses its reward functions
(raising or dropping a bad reward as its ``reward.on_bad_reward``, unless ``--on-bad-reward``
says) and its prompts: by default (``--split auto``) the evaluation prompts the run evaluated on
during training (``data.eval_prompts[_file]``, or the ``data.eval_fraction`` it held out, split
exactly as the trainer split it), else its training prompts; it samples as the run did (its
rollout's length, stop strings, top-k / top-p / min-p and penalties: :func:`run_sampling`, at its
``eval.temperature``; ``--max-new-tokens`` / ``--stop`` / ``--temperature`` win). With ``--n`` > 1
verl's ``mean@n``, ``best@k`` / ``worst@k`` and ``maj@k`` come too (:func:`validation_metrics`).
``--reward-model`` scores as ``rlhf-fast reward`` trained it (prompt, response, eos).
``--references FILE`` adds BLEU (sacrebleu's corpus_bleu defaults) and ROUGE-1/2/L F1 (rouge-score
without stemming) of the answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

References = Sequence[Union[str, Sequence[str]]]


# --------------------------------------------------------------------------- overlap metrics
# sacrebleu and rouge-score (the `eval` extra) compute them; this module only maps the
# one-or-more references per answer onto their APIs.

_OVERLAP_HINT = "BLEU / ROUGE need sacrebleu and rouge-score: pip install 'rlhf_fast[eval]'"


def require_overlap_libraries() -> None:
    """Raise ImportError (naming the extra to install) when sacrebleu or rouge-score is missing."""
    try:
        import sacrebleu  # noqa: F401
        from rouge_score import rouge_scorer  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{_OVERLAP_HINT} ({e})") from None


def _ref_lists(hypotheses: Sequence[str], references: References) -> List[List[str]]:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be lists (one entry per hypothesis)")
    if len(hypotheses) == 0:  # sacrebleu fails with an IndexError, ROUGE would be a mean of nothing
        raise ValueError("hypotheses must be a non-empty list of texts")
    if len(hypotheses) != len(references):
        raise ValueError(f"one reference (or list of references) per hypothesis: got {len(hypotheses)} hypotheses "
                         f"and {len(references)} references")
    out = []
    for i, r in enumerate(references):
        refs = [r] if isinstance(r, str) else list(r)
        if not refs or not all(isinstance(x, str) for x in refs):
            raise ValueError(f"references[{i}] must be a text or a non-empty list of texts")
        out.append(refs)
    for i, h in enumerate(hypotheses):
        if not isinstance(h, str):
            raise TypeError(f"hypotheses[{i}] must be a text, got {type(h).__name__}")
    return out


def corpus_bleu(hypotheses: Sequence[str], references: References) -> float:
    """Corpus BLEU in [0, 100]: ``sacrebleu.corpus_bleu`` with its defaults (13a tokenisation,
    case-sensitive, exp smoothing, the closest reference length). ``references[i]`` is the
    reference text of ``hypotheses[i]`` or a list of them (their numbers may differ)."""
    refs = _ref_lists(hypotheses, references)
    require_overlap_libraries()
    import sacrebleu

    # sacrebleu takes reference streams, one text per hypothesis each; None where a
    # hypothesis has fewer references than the most
    k = max((len(r) for r in refs), default=1)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(k)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_scores(hypotheses: Sequence[str], references: References) -> Dict[str, float]:
    """Mean over hypotheses of the ROUGE-1, ROUGE-2 and ROUGE-L F1 (in [0, 1]) of rouge-score's
    ``RougeScorer(["rouge1", "rouge2", "rougeL"])`` without stemming (``score_multi``: the best
    reference when a hypothesis has several). ROUGE-L is the sentence-level LCS F1, not
    ``rougeLsum``; like rouge-score, letters outside a-z / 0-9 are dropped."""
    refs = _ref_lists(hypotheses, references)
    require_overlap_libraries()
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=False)
    sums = dict.fromkeys(keys, 0.0)
    for hyp, rs in zip(hypotheses, refs):
        scores = scorer.score_multi(rs, hyp)
        for k in keys:
            sums[k] += scores[k].fmeasure
    return {k: v / max(len(refs), 1) for k, v in sums.items()}


def overlap_metrics(hypotheses: Sequence[str], references: References) -> Dict[str, float]:
    """``{"bleu", "rouge1", "rouge2", "rougeL"}``: :func:`corpus_bleu` (0–100) and the mean
    :func:`rouge_scores` F1 (0–1) of ``hypotheses`` against their ``references``."""
    return {"bleu": corpus_bleu(hypotheses, references), **rouge_scores(hypotheses, references)}


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
    references: Optional[References] = None,
    fields: Optional[Sequence[dict]] = None,
    pass_k: Sequence[int] = (),
    correct_threshold: float = 1.0,
    data_prompts: Optional[Sequence] = None,
    trainer_state=None,
    chat_template_kwargs: Optional[Dict[str, Any]] = None,
    sampling: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    """Evaluate ``policy`` on ``prompts`` (list of str) under ``reward`` (a CombinedReward or a
    callable ``fn(prompts, completions) -> list[float]``). Returns a dict of floats: reward
    mean/std (over the answers scored: not those no source scored, nor those a bad reward dropped
    — ``on_bad_reward="drop"``), per-source means, and with ``reference`` (its answers drawn with
    :func:`reference_seed` of ``seed``, independently of the policy's): reference reward,
    win_rate, kl (mean sequence k1), plus response length mean/max for both. With ``references`` (one
    reference text, or a list of them, per prompt): ``overlap/bleu`` (corpus BLEU, 0–100) and
    ``overlap/rouge1`` / ``rouge2`` / ``rougeL`` (mean F1, 0–1) of the policy's answers (every
    one of the ``n`` per prompt), see :func:`overlap_metrics`; with ``reference`` also the
    reference policy's, as ``reference/overlap/...``. ``fields``: one dict per prompt (its
    answer, test cases…) handed to reward functions as keyword arguments, as in RL training.
    ``pass_k`` (each 1 ≤ k ≤ n): ``pass@k``, the unbiased estimate (Chen et al. 2021) of the
    chance that one of k of a prompt's answers is correct — scored, with total reward ≥
    ``correct_threshold`` — from its n answers, averaged over prompts (:func:`pass_at_k`).
    With n > 1 also verl's validation metrics of the total rewards (:func:`validation_metrics`;
    a prompt with an answer not scored is left out): ``mean@n``, ``best@k`` / ``worst@k`` (exact
    expectations over k-subsets) and, when every prompt's ``fields`` has an ``answer``
    (:func:`has_answer_fields`), ``maj@k`` (majority vote over the answers' final answers), for
    k = 2, 4, … < n and n. ``sampling``: more :class:`~rlhf_fast.rollout.SamplingParams`
    keywords (``stop_strings``, ``top_p``, penalties…; ``rlhf-fast eval --run``: the run's).
    A ``reward`` with ``convention="trl"`` calls its functions as TRL does
    (:class:`~rlhf_fast.algorithms.rewards.TRLRewardInputs`): ``data_prompts`` are the prompts as
    the data gives them (chats as message lists; default ``prompts``), ``trainer_state`` a
    ``transformers.TrainerState`` (default: a fresh one); what they log with ``log_metric``
    comes back as ``reward_fn/NAME`` (the mean), and the reward mean / std skip the answers no
    source scored (TRL's nanmean). Reward models read ``data_prompts`` too (a chat rendered with
    the reward model's own template, as it was trained, with ``chat_template_kwargs``: a run's
    ``data.chat_template_kwargs``)."""
    from rlhf_fast.algorithms import CombinedReward, RewardContext, fields_per_row
    from rlhf_fast.algorithms.rewards import RewardLog, TRLRewardInputs, trl_completions
    from rlhf_fast.models.logprobs import sequence_logprobs
    from rlhf_fast.rollout import HFRolloutEngine, SamplingParams

    if isinstance(prompts, (str, bytes)):  # (iterating a text would evaluate one prompt per character)
        raise TypeError(f"prompts must be a list of prompt texts, got a {type(prompts).__name__} (one prompt: [text])")
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if references is not None:
        _ref_lists(list(prompts), references)  # one per prompt, before any generation
    if fields is not None and (len(fields) != len(prompts) or not all(isinstance(f, dict) for f in fields)):
        raise ValueError(f"fields must be one dict per prompt ({len(prompts)}), got {len(fields)} entries")
    pass_k = list(pass_k)
    for k in pass_k:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"pass_k entries must be ints in [1, n={n}], got {k!r}")
    if not math.isfinite(correct_threshold):
        raise ValueError(f"correct_threshold must be a finite number, got {correct_threshold!r}")
    if not isinstance(reward, CombinedReward):
        reward = CombinedReward([reward])
    trl = reward.convention == "trl"
    if data_prompts is not None and len(data_prompts) != len(prompts):
        raise ValueError(f"data_prompts must hold one prompt per prompt ({len(prompts)}), got {len(data_prompts)}")
    if trl and trainer_state is None:
        from transformers import TrainerState

        trainer_state = TrainerState()
    log = RewardLog()
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=n, seed=seed,
                            **dict(sampling or {}))

    def data_rows(b):  # each answer's prompt as the data gives it
        src = list(data_prompts if data_prompts is not None else prompts)
        return [src[g] for g in b.group_index.tolist()]

    def trl_inputs(b):  # TRL's reward-function inputs of rollout b (see TRLRewardInputs)
        rows = data_rows(b)
        P, am = b.prompt_length, b.attention_mask.bool()
        ids = [t[k].tolist() for t, k in zip(b.input_ids[:, P:].cpu(), am[:, P:].cpu())]
        return TRLRewardInputs(rows, trl_completions(rows, list(b.response_texts)), ids, trainer_state, log)

    def answer(model, params):
        b = HFRolloutEngine(model, tokenizer).generate(list(prompts), params)
        if len(b.response_texts) != len(prompts) * n:
            raise RuntimeError(f"the rollout returned {len(b.response_texts)} answers for {len(prompts)} prompts x {n}")
        rm = b.response_mask.bool() & b.attention_mask.bool()
        rm[:, 0] = False
        out = reward(list(b.prompt_texts), list(b.response_texts),
                     RewardContext(b.input_ids, b.attention_mask, rm.sum(1).tolist(),
                                   fields=fields_per_row(fields, b.group_index.tolist()),
                                   trl=trl_inputs(b) if trl else None, prompts=data_rows(b),
                                   chat_template_kwargs=chat_template_kwargs))
        return b, rm, out

    res: Dict[str, float] = {}
    b, rm, out = answer(policy, params)
    # the answers no source scored (trl) or a source's bad reward dropped (on_bad_reward drop) are
    # skipped: their total 0 is a placeholder, as in the RL trainer's eval/reward/total
    scored = out.total[out.valid]
    res["reward/mean"] = float(scored.mean())
    # (no scored answer: NaN, as the mean; one: 0)
    res["reward/std"] = float(scored.std()) if scored.numel() > 1 else (0.0 if scored.numel() else float("nan"))
    res.update({f"reward_fn/{k}": v / c for k, (v, c) in sorted(log.pop_metrics().items()) if c})
    for k, v in out.per_source.items():
        res[f"reward/{k}"] = float(v[torch.isfinite(v)].mean()) if torch.isfinite(v).any() else float("nan")
    res["length/mean"] = float(rm.sum(1).float().mean())
    res["length/max"] = float(rm.sum(1).max())
    if pass_k:
        # an answer no source scored is not correct (its total 0 is a placeholder, not a reward)
        correct = (out.valid & (out.total >= correct_threshold)).view(len(prompts), n)  # prompt i: row i
        for k in pass_k:
            res[f"pass@{k}"] = pass_at_k(correct, k)
    if n > 1:  # verl's mean@n / best@k / worst@k (/ maj@k) over the n answers of each prompt
        keys = None
        if has_answer_fields(fields):
            texts = list(b.response_texts)
            keys = [[vote_key(texts[i * n + j]) for j in range(n)] for i in range(len(prompts))]
        res.update(validation_metrics(out.total.view(len(prompts), n), keys, out.valid.view(len(prompts), n)))

    def overlap(texts):  # the rollout holds the n answers of prompt i at rows i·n .. i·n + n − 1
        return overlap_metrics(list(texts), [references[i // n] for i in range(len(texts))])

    if references is not None:
        res.update({f"overlap/{k}": v for k, v in overlap(b.response_texts).items()})
    if reference is not None:
        t = 1.0 if temperature == 0 else temperature
        with torch.no_grad():
            lp = sequence_logprobs(policy, b.input_ids, b.attention_mask, response_mask=rm, temperature=t)
            lr = sequence_logprobs(reference, b.input_ids, b.attention_mask, response_mask=rm, temperature=t)
        res["kl"] = float(((lp - lr) * rm).sum(1).mean())
        # a seed of its own: a win-rate compares independent draws (one seed for both coupled them:
        # equal policies gave equal answers, every pair a tie)
        b_ref, rm_ref, out_ref = answer(reference, dataclasses.replace(params, seed=reference_seed(seed)))
        # the answers no source scored are skipped, as in the policy's reward/mean
        res["reference/reward_mean"] = float(out_ref.total[out_ref.valid].mean())
        if references is not None:
            res.update({f"reference/overlap/{k}": v for k, v in overlap(b_ref.response_texts).items()})
        res["reference/length_mean"] = float(rm_ref.sum(1).float().mean())
        wins = (out.total > out_ref.total).float() + 0.5 * (out.total == out_ref.total).float()
        # only the pairs scored on both sides, as the reward means skip unscored answers (NaN: none)
        both = out.valid & out_ref.valid
        res["win_rate"] = float(wins[both].mean()) if bool(both.any()) else float("nan")
    res["num_prompts"] = len(prompts)
    return res


def reference_seed(seed: int) -> int:
    """The sampling seed of the reference's answers in :func:`evaluate_policy` given the policy's
    ``seed``: never ``seed`` itself (the policy's draws), so the two answer independently."""
    return (seed * 1_000_003 + 1) % 2**63  # (seed·1000002 + 1 is odd: never ≡ 0, so never seed)


def pass_at_k(correct: torch.Tensor, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021): ``correct`` ``[P, n]`` bool (the n answers of
    each of P prompts); per prompt with c correct, 1 − C(n − c, k) / C(n, k); the mean over
    prompts. Needs 1 ≤ k ≤ n; ValueError for values other than flags (bool or 0 / 1: threshold
    rewards first)."""
    if correct.dim() != 2 or correct.shape[0] == 0:
        raise ValueError(f"correct must be a [P, n] tensor with P >= 1, got shape {tuple(correct.shape)}")
    if correct.dtype != torch.bool and not bool(((correct == 0) | (correct == 1)).all()):
        # (rewards handed in would be summed and truncated: a silent wrong count of correct answers)
        raise ValueError("correct must hold correct flags (bool, or 0 / 1), not scores: threshold the rewards first")
    n = correct.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    total = math.comb(n, k)
    return float(sum(1.0 - math.comb(n - int(c), k) / total for c in correct.sum(1).tolist()) / correct.shape[0])


# ------------------------------------------------------------ verl's validation metrics
# mean@n, best@k / worst@k and maj@k of n answers per prompt (verl's process_validation_metrics)

# maj@k enumerates every k-subset up to this many; above it, _MAJ_DRAWS seeded subsets
_MAJ_EXACT_LIMIT = 20_000
_MAJ_DRAWS = 1_000
_MAJ_SEED = 42  # verl's bootstrap seed


def validation_ks(n: int) -> List[int]:
    """verl's subset sizes of ``n`` answers per prompt: 2, 4, 8, … below ``n``, then ``n``
    (``[]`` for ``n`` = 1: one answer has no best-of or vote)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    ks, k = [], 2
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n > 1 else []


def _check_k(rewards: Sequence[float], k: int) -> int:
    n = len(rewards)
    if n == 0:
        raise ValueError("rewards must hold at least one answer's reward")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    return n


def best_of_k(rewards: Sequence[float], k: int) -> float:
    """best@k of one prompt's n answers (``rewards``: n floats): the expected maximum reward of
    k answers drawn without replacement, computed exactly over every k-subset, not by verl's
    bootstrap (1000 draws with replacement, seed 42): with the rewards sorted ascending
    r_(1) ≤ … ≤ r_(n), E[max] = Σ_i r_(i) · C(i − 1, k − 1) / C(n, k) (r_(i) is the largest of
    the C(i − 1, k − 1) subsets that take it and k − 1 of the i − 1 below it). With 0 / 1
    rewards it is the unbiased pass@k (:func:`pass_at_k`); best@n is the maximum, best@1 the mean."""
    n = _check_k(rewards, k)
    r = sorted(float(x) for x in rewards)
    total = math.comb(n, k)
    return float(sum(v * (math.comb(i, k - 1) / total) for i, v in enumerate(r) if i >= k - 1))


def worst_of_k(rewards: Sequence[float], k: int) -> float:
    """worst@k: the expected minimum reward of k of the n answers drawn without replacement,
    exactly (:func:`best_of_k` of the negated rewards, negated)."""
    return 0.0 - best_of_k([-float(x) for x in rewards], k)  # (0.0 -: never a -0.0 in the results)


def vote_key(text: str) -> Optional[str]:
    r"""The final answer a text votes for in :func:`majority_of_k`, or None (no final answer):
    :func:`~rlhf_fast.algorithms.rule_rewards.extract_answer` as
    :func:`~rlhf_fast.algorithms.rule_rewards.normal_answer` keys it, the key answer_match
    compares — a number as its exact value (``1,000`` = ``1000.0`` = ``\frac{2000}{2}``), else
    the text without spaces, ``$``, case or a final period; an empty ``\boxed{}`` has none.
    (Numbers vote by exact equality, where answer_match allows 1e-6 relative.)"""
    from rlhf_fast.algorithms.rule_rewards import extract_answer, normal_answer

    got = extract_answer(text)
    return None if got is None else normal_answer(got)


def _vote(rewards: Sequence[float], keys: Sequence[Optional[str]], subset: Sequence[int]) -> float:
    """The reward of the majority vote of the answers ``subset`` (indices, ascending)."""
    counts: Dict[str, int] = {}
    for i in subset:  # insertion order = first appearance: max() keeps the first of tied counts
        if keys[i] is not None:
            counts[keys[i]] = counts.get(keys[i], 0) + 1
    if not counts:  # no answer has a final answer: the vote is its first answer
        return float(rewards[subset[0]])
    winner = max(counts, key=counts.get)
    return float(next(rewards[i] for i in subset if keys[i] == winner))


def majority_of_k(rewards: Sequence[float], keys: Sequence[Optional[str]], k: int) -> float:
    """maj@k of one prompt's n answers: the expected reward of the majority vote of k answers
    drawn without replacement. ``rewards`` n floats, ``keys`` each answer's final answer
    (:func:`vote_key`; None: it has none). The vote of a subset (answers in their order):
    the final answer most of them give — answers without one do not vote; tied counts go to
    the answer given first, as verl's ``calc_maj_val`` (``max`` over a dict in first-seen
    order) —, and its reward is that of the subset's first answer giving it (verl's
    ``vote2vals[maj_vote][0]``); a subset without any final answer takes its first answer's
    reward. Exact, the mean over every k-subset, when there are at most 20 000 of them (every n
    ≤ 16; k = n: the vote of all n); else the mean over 1 000 subsets drawn without replacement
    with seed 42 (verl's bootstrap: 1 000 draws with replacement, seed 42)."""
    import itertools
    import random

    n = _check_k(rewards, k)
    if len(keys) != n:
        raise ValueError(f"keys must hold one final answer (or None) per reward ({n}), got {len(keys)}")
    if math.comb(n, k) <= _MAJ_EXACT_LIMIT:
        votes = [_vote(rewards, keys, s) for s in itertools.combinations(range(n), k)]
    else:
        rng = random.Random(_MAJ_SEED)
        votes = [_vote(rewards, keys, sorted(rng.sample(range(n), k))) for _ in range(_MAJ_DRAWS)]
    return float(sum(votes) / len(votes))


def validation_sums(rewards: torch.Tensor, keys: Optional[Sequence[Sequence[Optional[str]]]] = None,
                    valid: Optional[torch.Tensor] = None) -> Dict[str, tuple]:
    """``{name: (sum over prompts, prompts)}`` of verl's validation metrics, the sums that
    :func:`validation_metrics` divides (and the RL trainer's evaluation sums over calls and
    ranks). ``rewards`` ``[P, n]`` float (prompt i's n answers in row i), ``valid`` ``[P, n]``
    bool (default all): a prompt with an answer not valid (no source scored it, a bad reward
    dropped it) is left out, as from ``reward_std``. Names: ``mean@n``, and for n > 1 and each k
    of :func:`validation_ks` ``best@k``, ``worst@k`` and, with ``keys`` (``[P][n]`` final
    answers, :func:`vote_key`), ``maj@k``."""
    if rewards.dim() != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be a [P, n] tensor with P, n >= 1, got shape {tuple(rewards.shape)}")
    P, n = rewards.shape
    if keys is not None and (len(keys) != P or any(len(row) != n for row in keys)):
        raise ValueError(f"keys must hold n={n} final answers for each of the P={P} prompts")
    ok = torch.ones(P, n, dtype=torch.bool) if valid is None else valid.bool().cpu()
    ok = ok & torch.isfinite(rewards.cpu())
    rows = [i for i in range(P) if bool(ok[i].all())]
    r = rewards.double().cpu().tolist()
    names = {f"mean@{n}": lambda i: sum(r[i]) / n}
    for k in validation_ks(n):
        names[f"best@{k}"] = lambda i, k=k: best_of_k(r[i], k)
        names[f"worst@{k}"] = lambda i, k=k: worst_of_k(r[i], k)
        if keys is not None:
            names[f"maj@{k}"] = lambda i, k=k: majority_of_k(r[i], keys[i], k)
    return {name: (float(sum(f(i) for i in rows)), float(len(rows))) for name, f in names.items()}


def validation_metrics(rewards: torch.Tensor, keys=None, valid=None) -> Dict[str, float]:
    """verl's validation metrics of n answers per prompt, each the mean over the prompts
    (``rewards`` ``[P, n]``; ``keys`` / ``valid`` as :func:`validation_sums`): ``mean@n`` (the
    mean reward), ``best@k`` / ``worst@k`` (:func:`best_of_k` / :func:`worst_of_k`, exact) and
    ``maj@k`` (:func:`majority_of_k`) for k = 2, 4, … < n and n (:func:`validation_ks`); NaN
    where no prompt has all its answers valid."""
    return {k: (s / c if c else float("nan")) for k, (s, c) in validation_sums(rewards, keys, valid).items()}


def has_answer_fields(fields: Optional[Sequence[dict]]) -> bool:
    """Whether maj@k is reported for prompts with ``fields`` (one dict per prompt): when every
    prompt has an ``answer`` field — the verifiable-answer setting (:func:`~rlhf_fast.algorithms.
    rule_rewards.answer_match`), whose answers have a final answer to vote on."""
    return bool(fields) and all(isinstance(f, dict) and f.get("answer") is not None for f in fields)


SPLITS = ("auto", "eval", "train")


def run_prompt_records(cfg, split: str = "auto") -> tuple:
    """``(split used, records)`` of an RL run's config ``cfg`` for ``--split`` ``split``: its
    evaluation records or its training records (each ``(prompt, fields)``), split as the trainer
    splits them (:func:`rlhf_fast.trainers.rl.split_eval_records`). ``auto`` takes the evaluation
    records when the run has a source of them. ValueError for ``eval`` on a run without one."""
    from rlhf_fast.trainers.rl import load_prompt_records, split_eval_records
    from rlhf_fast.trainers.rl_config import DISTILL

    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    convert = None
    if cfg.estimator == DISTILL:  # GKD's {messages} records, read as the trainer reads them
        from rlhf_fast.trainers.distill import messages_record as convert
    train, ev = split_eval_records(cfg, load_prompt_records(cfg.data, convert), convert=convert)
    if split == "eval" and not ev:
        raise ValueError("--split eval: the run has no evaluation prompts (no data.eval_prompts, "
                         "data.eval_prompts_file or data.eval_fraction); use --split train")
    if split == "train" or not ev:
        return "train", train
    return "eval", ev


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="an RL run folder: its final policy, its reference (model.reference, "
                                                    "else its initial policy), prompts and reward functions")
    parser.add_argument("--policy", default=None, help="policy path (save_pretrained folder with tokenizer)")
    parser.add_argument("--reference", default=None, help="reference policy path (default: none, or the run's)")
    parser.add_argument("--prompts", default=None,
                        help="prompts file (.txt one per line, or .jsonl / .json / .parquet with 'prompt')")
    parser.add_argument("--split", choices=SPLITS, default="auto",
                        help="with --run: its evaluation prompts (eval: data.eval_prompts[_file] or the held-out "
                             "data.eval_fraction), its training prompts (train: without the held-out ones), or "
                             "auto: eval when the run has evaluation prompts, else train")
    parser.add_argument("--reward-fn", action="append", default=[], help="module:function (repeatable)")
    parser.add_argument("--reward-model", default=None, help="reward model path")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length in tokens (default: a --run's rollout.max_new_tokens, else 16)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="a stop string (repeatable; default: a --run's rollout.stop_strings, else none). With "
                             "--run the answers are also sampled with its rollout.top_k / top_p / min_p, penalties "
                             "and min_new_tokens (the eos is blocked for that many tokens), as its own evaluation")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature, 0 = greedy (default: a --run's eval.temperature, as "
                             "its own evaluation sampled, else 0)")
    parser.add_argument("--n", type=int, default=1,
                        help="samples per prompt; > 1 adds verl's mean@n, best@k / worst@k (exact) and, when every "
                             "prompt has an 'answer' field, maj@k, for k = 2, 4, ... < n and n")
    parser.add_argument("--pass-k", default=None,
                        help="comma list of k (each <= --n): pass@k, an answer counting as correct when its "
                             "total reward >= --correct-threshold")
    parser.add_argument("--correct-threshold", type=float, default=1.0,
                        help="the total reward from which an answer counts as correct for --pass-k")
    parser.add_argument("--references", default=None,
                        help="reference answers, one per prompt in the prompts' order (.txt one per non-empty line, "
                             "or .jsonl / .json with 'reference': text or 'references': [texts]): adds BLEU / ROUGE")
    parser.add_argument("--on-bad-reward", choices=("raise", "drop"), default=None,
                        help="a NaN / inf reward: raise (exit 2) or drop that answer from the reward means, pass@k "
                             "and win-rate (default: a --run's reward.on_bad_reward, else raise)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def read_references(path: str) -> List[List[str]]:
    """The reference answers of ``--references``: per non-empty line of a .txt file its text;
    per record of a .jsonl / .json file (JSON lines, or one JSON array:
    :func:`rlhf_fast.feedback.formats.json_rows`) its ``reference`` (text) or ``references``
    (list of texts). A .csv / .tsv is refused (never read one reference a line)."""
    from rlhf_fast.feedback.formats import _BadJSON, json_rows, refuse_unread_format

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--references: no such file {path!r}")
    out: List[List[str]] = []
    if not path.lower().endswith((".jsonl", ".json")):
        refuse_unread_format(path, "--references")
        try:
            # utf-8-sig: a byte-order mark (Windows editors) is no part of the first reference
            with open(path, encoding="utf-8-sig") as f:
                lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"--references {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        out = [[line.rstrip("\n")] for line in lines if line.strip()]
    else:
        unit, rows = json_rows(path, "--references")
        for n, rec in rows:
            if isinstance(rec, _BadJSON):
                raise ValueError(f"--references {path}, line {n}: not a JSON object ({rec.message})")
            refs = rec.get("references", rec.get("reference")) if isinstance(rec, dict) else None
            refs = [refs] if isinstance(refs, str) else refs
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"--references {path}, {unit} {n}: expected 'reference': text or "
                                 "'references': [texts]")
            out.append(refs)
    if not out:
        raise ValueError(f"--references {path} holds no references")
    return out


def _check_args(args) -> None:
    """Every path and number of the command line, before any model is loaded (a missing
    local folder would otherwise be looked up on the hub)."""
    for flag, value in (("--run", args.run), ("--policy", args.policy), ("--reference", args.reference),
                        ("--reward-model", args.reward_model)):
        if value is not None and not os.path.isdir(value):
            raise FileNotFoundError(f"{flag}: no such local folder {value!r} (nothing is downloaded)")
    refs = getattr(args, "references", None)
    if refs is not None:
        if not os.path.isfile(refs):
            raise FileNotFoundError(f"--references: no such file {refs!r}")
        try:
            require_overlap_libraries()
        except ImportError as e:  # before any model is loaded: one line, exit 2
            raise ValueError(f"--references: {e}") from None
    if getattr(args, "split", "auto") != "auto" and (args.run is None or args.prompts is not None):
        raise ValueError(f"--split {args.split} picks a --run's prompts: give --run RUN_DIR and no --prompts")
    if args.run is not None and not os.path.isfile(os.path.join(args.run, "config.yaml")):
        raise FileNotFoundError(f"--run {args.run}: not an RL run folder (no config.yaml)")
    if args.run is not None:
        from rlhf_fast.trainers.config import saved_run_kind
        from rlhf_fast.trainers.report import RL_FAMILIES

        kind = saved_run_kind(args.run)
        if kind is not None and kind not in RL_FAMILIES:  # its config.yaml is no RLConfig
            raise ValueError(f"--run {args.run}: that folder holds a run of rlhf-fast {kind}, not an RL run; "
                             f"evaluate its model with --policy {os.path.join(args.run, 'final')}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--n", args.n)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {value}")
    for i, stop in enumerate(getattr(args, "stop", None) or []):
        if not stop:
            raise ValueError(f"--stop {i + 1}: a stop string must be non-empty")
    if args.temperature is None:  # a run answers as its own evaluation did; else greedy
        args.temperature = run_eval_temperature(args.run) if args.run is not None else 0.0
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not math.isfinite(args.correct_threshold):
        raise ValueError(f"--correct-threshold must be a finite number, got {args.correct_threshold}")
    args.pass_k_list = _parse_pass_k(args.pass_k, args.n)
    if args.n > 1 and args.temperature == 0:
        raise ValueError(f"--n {args.n} at --temperature 0 (greedy) gives {args.n} copies of one answer, so pass@k "
                         "would equal pass@1; sample with --temperature > 0 (say 1.0) or give --n 1")


def run_eval_temperature(run_dir: str) -> float:
    """The ``eval.temperature`` of the RL run in ``run_dir`` (its ``config.yaml``): the
    temperature its own evaluation sampled at, the default ``--temperature`` of ``--run``."""
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig

    return float(load_config(RLConfig, os.path.join(run_dir, "config.yaml")).eval.temperature)


def _parse_pass_k(text: Optional[str], n: int) -> List[int]:
    if text is None:
        return []
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--pass-k must be a comma list of ints, got {text!r}") from None
    bad = [k for k in ks if not 1 <= k <= n]
    if not ks or bad:
        raise ValueError(f"--pass-k values must be ints in [1, --n={n}], got {text!r}")
    return ks


def run_initial_policy(cfg):
    """The reference of ``--run`` (``cfg``: the run's RLConfig): its ``model.reference`` folder
    when it had one, else its initial policy, loaded as the run loaded it, with
    ``model.model_init_kwargs`` (a tiny spec rebuilt, then cast), so the KL is measured against
    the reference the run trained with (a float32 one by default, whatever dtype the folder was
    saved in)."""
    from rlhf_fast.models.loading import apply_model_init_kwargs, load_policy
    from rlhf_fast.trainers.rl import build_tiny_policy

    init_kwargs = cfg.model.model_init_kwargs
    if cfg.model.reference:
        return load_policy(cfg.model.reference, init_kwargs=init_kwargs)
    if cfg.model.policy.startswith("tiny:"):
        return apply_model_init_kwargs(build_tiny_policy(cfg)[0], init_kwargs)
    return load_policy(cfg.model.policy, init_kwargs=init_kwargs)


def trained_policy_kwargs(init_kwargs=None) -> dict:
    """The ``from_pretrained`` keywords of a run's trained policy folder, given the run's checked
    ``model.model_init_kwargs`` (None: no run, nothing added): its attention implementation and
    remote-code flag, and, when it named a dtype, ``auto`` — the folder holds the weights in the
    dtype they trained in, which that dtype decided."""
    from rlhf_fast.models.loading import _dtype_key

    kw = {k: v for k, v in (init_kwargs or {}).items() if k != "dtype"}
    if "dtype" in (init_kwargs or {}):
        kw[_dtype_key()] = "auto"
    return kw


def _check_out_not_input(args) -> None:
    """ValueError naming --out when the results would replace an input: the --prompts /
    --references file, a file in the --policy / --reference / --reward-model folder, or one of
    the --run folder's files (an earlier eval's .json results there may be rewritten)."""
    from rlhf_fast.models.loading import adapter_base
    from rlhf_fast.trainers.config import check_out_not_input
    from rlhf_fast.trainers.report import check_out_not_run_file

    inputs = {flag: getattr(args, flag[2:].replace("-", "_"), None)
              for flag in ("--prompts", "--references", "--policy", "--reference", "--reward-model")}
    for flag in ("--policy", "--reference"):  # an adapter folder loads its base folder too
        if inputs[flag] and os.path.isdir(inputs[flag]):
            try:
                base = adapter_base(inputs[flag], flag)
            except ValueError:  # a base that is not a local folder: refused when it loads
                base = None
            if base:
                inputs[f"base model of the {flag}"] = base
    check_out_not_input(args.out, inputs, "the results")
    if args.run:
        check_out_not_run_file(args.run, args.out, own=".json", what="the results",
                               hint="write the results to a .json file elsewhere")


def run_sampling(cfg, args) -> tuple:
    """``(max_new_tokens, sampling keywords)`` of ``rlhf-fast eval``: with a run's config
    ``cfg``, its rollout's length, stop strings, top-k / top-p / min-p and penalties (with
    ``min_new_tokens``), as its own evaluation samples; the flags ``--max-new-tokens`` and
    ``--stop`` win; without a run 16 tokens and no stop string."""
    sampling: Dict[str, Any] = {}
    max_new_tokens = 16
    if cfg is not None:
        ro = cfg.rollout
        max_new_tokens = ro.max_new_tokens
        sampling = ro.sampling_kwargs()
    if getattr(args, "max_new_tokens", None) is not None:
        max_new_tokens = args.max_new_tokens
    if getattr(args, "stop", None):
        sampling["stop_strings"] = tuple(args.stop)
    return max_new_tokens, sampling


def run(args) -> int:
    """Evaluate and print one JSON object (also written to ``--out``); a NaN / inf metric is the
    text ``"nan"`` / ``"inf"`` / ``"-inf"`` there (JSON has none), as in metrics.jsonl."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.algorithms import CallableReward, CombinedReward, RewardModelReward, load_callable

    from rlhf_fast.models.loading import tokenizer_kwargs
    from rlhf_fast.trainers.config import atomic_write_text, check_output_path

    _check_args(args)
    if args.out:
        check_output_path(args.out, "--out")  # before the evaluation, whose results it will hold
        _check_out_not_input(args)
    records, reference, fns, split = None, None, list(args.reward_fn), None
    policy_path = args.policy
    init_kwargs = None  # a run's model.model_init_kwargs: its models load as it loaded them
    template_kwargs = None  # a run's data.chat_template_kwargs: its chats render as in training
    if args.run:
        from rlhf_fast.trainers.config import load_config
        from rlhf_fast.trainers.rl_config import RLConfig

        cfg = load_config(RLConfig, os.path.join(args.run, "config.yaml"))
        if args.out:
            from rlhf_fast.trainers.config import check_out_not_input

            check_out_not_input(args.out, {"model.policy of --run": cfg.model.policy,
                                           "model.reference of --run": cfg.model.reference}, "the results")
        init_kwargs = cfg.model.model_init_kwargs
        template_kwargs = cfg.data.chat_template_kwargs or None
        policy_path = policy_path or os.path.join(args.run, "final", "policy")
        if args.reference is None:
            ref_path = cfg.model.reference or cfg.model.policy
            if not (ref_path.startswith("tiny:") or os.path.isdir(ref_path)):
                what = "reference" if cfg.model.reference else "initial policy"
                raise FileNotFoundError(f"--run {args.run}: its {what} {ref_path!r} (the reference) is not a local "
                                        "folder; give --reference PATH")
            reference = run_initial_policy(cfg)
        split, records = run_prompt_records(cfg, getattr(args, "split", "auto"))
        fns = fns or list(cfg.reward.functions)
    if policy_path is None:
        raise ValueError("give --policy PATH or --run RUN_DIR")
    if not os.path.isdir(policy_path):
        raise FileNotFoundError(f"policy folder not found: {policy_path}")
    from rlhf_fast.models.loading import adapter_base

    # an adapter whose base is not a local folder: one line, before the hub would be tried
    adapter_base(policy_path, "--policy" if args.policy else "--run")
    if args.reference:
        adapter_base(args.reference, "--reference")
    if args.prompts:
        from rlhf_fast.trainers.rl import read_prompt_records

        records, split = read_prompt_records(args.prompts, name="--prompts"), None
    # a run's reward functions are called as it called them (reward.calling_convention)
    convention, state = "ours", None
    if args.run and cfg.reward.calling_convention == "trl":
        from transformers import TrainerState

        convention, state = "trl", TrainerState(global_step=cfg.steps, max_steps=cfg.steps)
    if not records:
        raise ValueError("give --prompts FILE (or --run RUN_DIR)")
    references = None
    if getattr(args, "references", None):
        references = read_references(args.references)
        if len(references) != len(records):
            raise ValueError(f"--references {args.references}: {len(references)} references for {len(records)} prompts "
                             "(one per prompt, in the same order)")
    tok = AutoTokenizer.from_pretrained(policy_path, **tokenizer_kwargs(init_kwargs))
    tok.padding_side = "left"
    from rlhf_fast.feedback.formats import render_prompt

    # chats with the policy's chat template (and the run's data.chat_template_kwargs)
    prompts = [render_prompt(p, tok, chat_template_kwargs=template_kwargs) for p, _ in records]
    fields = [f for _, f in records]
    from rlhf_fast.models.loading import adapter_base, load_merged

    if adapter_base(policy_path, "--policy"):  # a LoRA run's final/: base + adapter, merged (embeddings resized
        policy = load_merged(policy_path, init_kwargs=init_kwargs).eval()  # to the adapter's first)
    else:
        policy = AutoModelForCausalLM.from_pretrained(policy_path, **trained_policy_kwargs(init_kwargs)).eval()
    if args.reference and args.run:  # loaded as the run loaded its models (an adapter folder: merged)
        reference = load_merged(args.reference, init_kwargs=init_kwargs)
    elif args.reference:
        reference = (load_merged(args.reference) if adapter_base(args.reference, "--reference")
                     else AutoModelForCausalLM.from_pretrained(args.reference))
    if reference is not None:
        what = "--reference" if args.reference else "the reference of --run"
        from rlhf_fast.models.loading import check_same_vocabulary

        check_same_vocabulary(policy, reference, what)
        reference = reference.eval()
    sources = [CallableReward(load_callable(s), name=s.rsplit(":", 1)[1], convention=convention) for s in fns]
    # a run's own functions and reward models weigh as they did in training
    weights = list(cfg.reward.weights or [1.0] * len(fns)) if args.run and not args.reward_fn else [1.0] * len(fns)
    if args.reward_model:
        from rlhf_fast.models.loading import load_reward_model

        # (with --run, loaded as the run loaded its reward.reward_model folders)
        rm_tok = AutoTokenizer.from_pretrained(args.reward_model, **tokenizer_kwargs(init_kwargs))
        sources.append(RewardModelReward(load_reward_model(args.reward_model, init_kwargs=init_kwargs), rm_tok))
        weights.append(1.0)
    elif args.run:
        from rlhf_fast.models.loading import reward_model_sources

        for src, w in reward_model_sources(cfg.reward, init_kwargs=init_kwargs):
            sources.append(src)
            weights.append(w)
    if not sources:
        raise ValueError("no reward source: give --reward-fn module:function and/or --reward-model PATH")
    # bad rewards (NaN / inf): --on-bad-reward, else a run's as in training (reward.on_bad_reward)
    on_bad = getattr(args, "on_bad_reward", None) or (cfg.reward.on_bad_reward if args.run else "raise")
    reward = CombinedReward(sources, weights, on_bad_reward=on_bad, convention=convention)
    max_new_tokens, sampling = run_sampling(cfg if args.run else None, args)
    res = evaluate_policy(policy, tok, prompts, reward,
                          reference=reference, sampling=sampling,
                          max_new_tokens=max_new_tokens, temperature=args.temperature, n=args.n,
                          references=references, fields=fields,
                          pass_k=args.pass_k_list, correct_threshold=args.correct_threshold,
                          data_prompts=[p for p, _ in records], trainer_state=state,
                          chat_template_kwargs=template_kwargs)
    if split is not None:
        res["split"] = split
    # JSON has no NaN / inf: a non-finite metric as its text ("nan"), as the run logs write it,
    # so strict readers (jq, JSON.parse) read the results
    text = json.dumps({k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in res.items()},
                      indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0
