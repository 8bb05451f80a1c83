"""One RL loop for PPO (critic + GAE), GRPO, Dr.GRPO, RLOO and REINFORCE++.

Python API (thin; everything per-token goes through :mod:`rlhf_fast.ops`)::

    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import RLConfig
    cfg = RLConfig(estimator="grpo")               # "gae" = PPO, "rloo", "dr_grpo", "reinforce++"
    trainer = RLTrainer(cfg, policy, tokenizer, reward_fns=[my_fn])  # my_fn(prompts, completions) -> floats
    trainer.train()                                # or trainer.step() for one rollout + update

:class:`PPOTrainer`, :class:`GRPOTrainer` and :class:`RLOOTrainer` only fix the estimator.

One step: rollout (HFRolloutEngine, ``group_size`` samples per prompt) → per-token log-probs
of the policy and the reference (sequence_logprobs) and critic values (gae) → rewards
(weighted sources, each logged) → advantages (rlhf_fast.algorithms) → ``ppo.epochs`` passes
over mini-batches with gradient accumulation over micro-batches, the loss normalised by the
token/row count of the whole mini-batch (so micro-batching never changes the gradient), the
policy loss through fused_linear_policy_loss (asymmetric / dual clip, entropy bonus, KL in
the loss; LUSPO as clip with each answer's token losses summed; CISPO / SAPO / VESPO, the
bias-corrected KL and the high-entropy and off-policy token masks through
rlhf_fast.algorithms.policy_losses on the fused head's per-token log-probs), optional
TRPO-style line search, early stop on approx KL, the adaptive entropy coefficient
(``ppo.use_adaptive_entropy``, checkpointed) → KL controller update. TRL GRPO's
``scale_rewards`` and GDPO's ``normalize_then_sum`` act in the advantages, its
``vllm_importance_sampling_mode`` (``ppo.is_mode``) on the rollout's importance weights.
``ppo.is_cap_min`` is its ``vllm_importance_sampling_clip_min``. Every ``eval_every`` steps
(and after the last) :meth:`RLTrainer.evaluate` answers held-out prompts with the current
policy (greedy by default, seeded per answer) and logs ``eval/*``, leaving training as it
would have been without it. A run folder holds config.yaml, metrics.jsonl, samples.jsonl,
TensorBoard events and atomic checkpoints from which ``resume`` continues exactly.
``ppo.prefix_sharing`` computes each prompt once per group of its answers: the scoring pass is
one shared-prefix row of the whole batch, the update's shuffle permutes whole groups and each
micro-batch is one such row; a ValueModel critic (gae) runs on the same rows
(:func:`rlhf_fast.models.shared_values.shared_critic_values`), any other critic stays padded.
``ppo.padding_free`` runs the same rows with each row its own group: every forward one
padding-free row, the shuffle the padded run's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from rlhf_fast import ops
from rlhf_fast.algorithms import (
    CRITIC_ESTIMATORS,
    GROUP_ESTIMATORS,
    CallableReward,
    CombinedReward,
    JudgeReward,
    LengthPenalty,
    OverlongPenalty,
    RepetitionPenalty,
    RewardContext,
    RewardError,
    RewardModelReward,
    RewardSource,
    RunningMoments,
    compute_advantages,
    fields_per_row,
    load_callable,
    make_kl_controller,
    shape_scores,
)
from rlhf_fast.algorithms.advantages import PROMPT_GROUP_ESTIMATORS, nanstd
from rlhf_fast.algorithms.rewards import (
    RewardLog,
    TRLRewardInputs,
    clip_rewards,
    trl_completions,
)
from rlhf_fast.models.moe_aux import RouterAux
from rlhf_fast.trainers.common import PhaseClock, autocast_context, random_states_kept
from rlhf_fast.trainers.compile import compile_rl_models
from rlhf_fast.trainers.mixed_precision import LossScaler, fp16_autocast, fp16_on
from rlhf_fast.trainers.console_samples import print_samples
from rlhf_fast.trainers.rl_config import A2PO, DISTILL, ONLINE_DPO, SDPO, RLConfig


@dataclass
class RolloutTensors:
    """The tensors of one step, all on the training device, rows = samples kept.

    input_ids ``[B, L]`` int64; attention_mask, response_mask ``[B, L]`` bool (response_mask
    never set at column 0); old_logp, ref_logp, behaviour_logp ``[B, L]`` float32 (0 outside
    the response; ref_logp None when the run has no reference: no KL term anywhere); values,
    advantages, returns ``[B, L]`` float32 (values: V(s_t) of the state before response token
    t, see :func:`critic_values`; zero without a critic); scores ``[B]`` float32 (shaped
    sequence rewards; NaN for an answer no reward function scored, ``reward.calling_convention:
    trl``, whose advantages are 0); entropy_mask ``[B, L]`` bool: the loss tokens
    that keep their policy-loss term under ``ppo.top_entropy_quantile`` (the rollout sets it,
    to response_mask when that is 1; None, as a batch built elsewhere may leave it, = all);
    is_weight ``[B, L]`` float32: the rollout importance weights (``ppo.is_cap``) that the loss
    takes itself (``ppo.policy_loss`` vespo; None otherwise, where they are in the advantages);
    group ``[B]`` int64: the prompt each row answers (the rows of one group consecutive), which
    ``ppo.prefix_sharing`` computes once per group (None, as a batch built elsewhere may leave it:
    each row its own group)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    behaviour_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    entropy_mask: Optional[torch.Tensor] = None
    is_weight: Optional[torch.Tensor] = None
    group: Optional[torch.Tensor] = None

    def select(self, idx: torch.Tensor) -> "RolloutTensors":
        """The rows ``idx`` of every tensor."""
        return RolloutTensors(**{k: None if getattr(self, k) is None else getattr(self, k)[idx]
                                 for k in self.__dataclass_fields__})


def build_tiny_policy(cfg: RLConfig, extra_texts: Sequence[str] = ()):
    """A ``tiny:FAMILY`` policy and its locally trained tokenizer, sized by ``cfg.model``."""
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer

    family = cfg.model.policy.split(":", 1)[1] or "llama"
    texts = sample_texts(256, seed=cfg.model.tiny_seed) + list(cfg.data.prompts) + list(extra_texts)
    texts += ["0 1 2 3 4 5 6 7 8 9", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    tok = train_tokenizer(texts, cfg.model.tiny_vocab_size)
    model = tiny_causal_lm(len(tok), family=family, hidden_size=cfg.model.tiny_hidden_size,
                           num_layers=cfg.model.tiny_num_layers, num_heads=cfg.model.tiny_num_heads,
                           seed=cfg.model.tiny_seed, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    return model, tok


def load_prompts(d) -> List[str]:
    """The prompts of a :class:`~rlhf_fast.trainers.rl_config.DataConfig`: inline, or from a
    .txt file (one per line) or a .jsonl file (string field ``prompt_key``)."""
    if d.prompts_file is None:
        return list(d.prompts)
    return read_prompts_file(d.prompts_file, d.prompt_key, "data.prompts_file", "data.prompt_key")


def load_prompt_records(d, convert=None) -> List[tuple]:
    """``(prompt, fields)`` of each prompt of a DataConfig: the prompt text or chat (a list of
    ``{role, content}`` messages) and the record's other fields (``{}`` for text lines and
    inline prompts), which reward functions can take as keyword arguments. ``convert(record,
    prompt_key, where)``: a trainer's own record format read as a prompt record first
    (:attr:`RLTrainer.convert_record`)."""
    if d.prompts_file is None:
        return [prompt_record(p, d.prompt_key, f"data.prompts[{i}]", convert) for i, p in enumerate(d.prompts)]
    return read_prompt_records(d.prompts_file, d.prompt_key, "data.prompts_file", "data.prompt_key", convert=convert)


def _chat_or_text(p) -> bool:
    if isinstance(p, str):
        return True
    return isinstance(p, list) and bool(p) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p)


def prompt_record(item, key: str = "prompt", where: str = "prompt", convert=None) -> tuple:
    """``(prompt, fields)`` of one prompt given as text, a chat (list of ``{role, content}``
    messages) or a dict holding one of those under ``key`` and any other fields (after
    ``convert(item, key, where)`` when given)."""
    if convert is not None:
        item = convert(item, key, where)
    if isinstance(item, dict):
        if key not in item or not _chat_or_text(item[key]):
            raise ValueError(f"{where}: expected text, a chat (list of {{role, content}} messages) or an object "
                             f"with such a field {key!r}, got an object with fields {sorted(item)}")
        prompt, fields = item[key], {k: v for k, v in item.items() if k != key}
    elif not _chat_or_text(item):
        raise ValueError(f"{where}: expected text, a chat (list of {{role, content}} messages) or an object with "
                         f"a field {key!r}, got {type(item).__name__}")
    else:
        prompt, fields = item, {}
    if prompt == "":  # as data.prompts refuses one: else the first rollout fails, naming no prompt
        raise ValueError(f"{where}: empty text (a prompt needs a token)")
    return prompt, fields


def read_prompts_file(path: str, key: str = "prompt", name: str = "prompts file", key_name: str = "") -> List[str]:
    """The prompts of a .txt file (one per non-empty line) or a .jsonl file (string field
    ``key``). Errors name the setting ``name``, the file and the line."""
    return [p for p, _ in read_prompt_records(path, key, name, key_name, chat=False)]


def read_prompt_records(path: str, key: str = "prompt", name: str = "prompts file", key_name: str = "",
                        chat: bool = True, convert=None) -> List[tuple]:
    """``(prompt, fields)`` of each prompt of a .txt file (one per non-empty line, no fields),
    a .jsonl file, a .json file (JSON lines, as ``Dataset.to_json`` writes, or one JSON array:
    :func:`rlhf_fast.feedback.formats.json_rows`) or a .parquet file (pyarrow; one record per
    row) — a record's field ``key`` is the prompt (non-empty text, or with ``chat`` a list of
    ``{role, content}`` messages), its other fields are ``fields`` (after ``convert(record,
    key, where)`` when given); a .csv / .tsv is refused (read one prompt a line, its header
    would be a prompt); a ``Dataset.save_to_disk`` folder gives its rows as a .parquet file does. Errors name
    the setting ``name``, the file and the line, item or row."""
    from rlhf_fast.feedback.formats import (_BadJSON, json_rows, refuse_unread_format, saved_dataset_folder,
                                            saved_dataset_rows)

    if os.path.isdir(path) and not saved_dataset_folder(path):
        raise IsADirectoryError(f"{name} {path} is a folder; expected a .txt or .jsonl file")
    if not os.path.isdir(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"{name} not found: {path}")
    out = []
    what = "text or a chat (list of {role, content} messages)" if chat else "text"

    def record(rec, where):
        if convert is not None:
            rec = convert(rec, key, f"{name} {path}, {where}")
        p = rec.get(key) if isinstance(rec, dict) else None
        if not (isinstance(p, str) or (chat and _chat_or_text(p))):
            raise ValueError(f"{name} {path}, {where}: expected an object with a field {key!r}"
                             + (f" ({key_name})" if key_name else "") + f" holding {what}")
        if p == "":  # as data.prompts refuses one: else the first rollout fails, naming no line
            raise ValueError(f"{name} {path}, {where}: field {key!r} is empty text (a prompt needs a token)")
        out.append((p, {k: v for k, v in rec.items() if k != key}))

    if os.path.isdir(path):  # Dataset.save_to_disk's folder: its rows numbered from 0, as a parquet file's
        for n, rec in saved_dataset_rows(path, name):
            record(rec, f"row {n - 1}")
    elif path.lower().endswith(".parquet"):  # (any case) as verl's and Hugging Face datasets' files: one record per row
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{name} {path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's errors vary; one line naming the file
            raise ValueError(f"{name} {path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        for n, rec in enumerate(rows):
            record(rec, f"row {n}")
    elif path.lower().endswith((".jsonl", ".json")):  # .json: JSON lines (Dataset.to_json) or one JSON array
        unit, rows = json_rows(path, name)
        for n, rec in rows:
            if isinstance(rec, _BadJSON):
                raise ValueError(f"{name} {path}, line {n}: not a JSON object ({rec.message})")
            record(rec, f"{unit} {n}")
    else:
        refuse_unread_format(path, name)  # a .csv read one prompt a line would make its header a prompt
        try:
            with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark is no part of the first prompt)
                for n, line in enumerate(f, 1):
                    if line.strip():
                        out.append((line.rstrip("\n"), {}))
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not out:
        raise ValueError(f"{name} {path} holds no prompts (every line is empty)")
    return out


def _make_critic(policy, path: Optional[str] = None, init_kwargs=None):
    """The critic: ``path`` (model.critic) loaded with ``init_kwargs`` (model.model_init_kwargs) —
    a saved ValueModel, or a reward-model folder (one label; TRL 0.x PPO's ``value_model``: its
    backbone, and its score head as the value head) — else one built from the policy's backbone
    (in the policy's dtype). ValueError naming model.critic for a folder of neither kind."""
    from rlhf_fast.models import loading

    if path is not None:
        if os.path.isfile(os.path.join(path, loading._VALUE_HEAD_FILE)):
            critic = loading.ValueModel.from_pretrained(path, init_kwargs=init_kwargs)
            loading.check_same_vocabulary(policy, critic, f"model.critic {path!r}")
            return critic
        what = "expected a saved ValueModel folder (a ppo run's final/critic) or a reward model (one label)"
        try:
            loading.check_model_folder(path, "model.critic", reward=True)  # names the key and the folder
        except ValueError as e:
            raise ValueError(f"{e} ({what}, {loading._VALUE_HEAD_FILE} missing)") from None
        rm = loading.load_reward_model(path, init_kwargs=init_kwargs)
        score = getattr(rm, "score", None)
        if not isinstance(score, torch.nn.Linear) or score.out_features != 1:
            # ValueModel would start a fresh head: not the reward model's values
            raise ValueError(f"model.critic {path!r}: {type(rm).__name__} has no one-output `score` head; {what}")
        loading.check_same_vocabulary(policy, rm, f"model.critic {path!r}")
        return loading.ValueModel(rm)
    if hasattr(loading.ValueModel, "from_policy"):
        return loading.ValueModel.from_policy(policy)
    return loading.ValueModel(policy)


def _given_critic(policy, critic):
    """``RLTrainer(critic=...)``: a sequence-classification model with one label (TRL 0.x PPO's
    ``value_model``) becomes a ValueModel of a copy of its backbone and its score head, as a
    ``model.critic`` reward-model folder does (called as it is, it returned a model output, not
    values); any other module is used as it is."""
    from transformers import PreTrainedModel

    from rlhf_fast.models import loading

    score = getattr(critic, "score", None)
    if isinstance(critic, PreTrainedModel) and isinstance(score, torch.nn.Linear) and score.out_features == 1:
        loading.check_same_vocabulary(policy, critic, "critic")
        return loading.ValueModel(critic)
    return critic


def missing_eos_scores(scores: torch.Tensor, truncated: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """``reward.missing_eos_penalty`` (TRL 0.x PPO's ``scores[~contain_eos_token] -= penalty``):
    ``scores`` ``[B]`` float minus ``penalty`` where ``truncated`` ``[B]`` bool (the answer was cut
    at ``rollout.max_new_tokens``: no eos); ``penalty`` None: ``scores`` unchanged. Same dtype."""
    if penalty is None:
        return scores
    return scores - penalty * truncated.to(device=scores.device, dtype=scores.dtype)


def _check_syncable(policy, reference) -> None:
    """``kl.ref_sync_steps`` moves the reference towards the policy parameter by parameter:
    the two must be separate modules with the same parameters (names and shapes)."""
    if not isinstance(reference, torch.nn.Module):
        raise ValueError("kl.ref_sync_steps needs a separate reference model; this reference "
                         f"({type(reference).__name__}) shares the policy's weights (a peft policy with its "
                         "adapters disabled)")
    mine = [(n, tuple(p.shape)) for n, p in policy.named_parameters()]
    theirs = [(n, tuple(p.shape)) for n, p in reference.named_parameters()]
    if mine != theirs:
        diff = next(((a, b) for a, b in zip(mine, theirs) if a != b), None) or (len(mine), len(theirs))
        raise ValueError(f"kl.ref_sync_steps needs a reference with the policy's parameters (names and shapes); "
                         f"they differ at {diff}")


def _informative_groups(out, group_size: int) -> torch.Tensor:
    """``[groups]`` bool: groups whose answers all have valid rewards that are not all equal.
    Answers no source scored (TRL's convention: kept, advantage 0) are left out of the
    comparison, so a group needs two scored answers that differ."""
    total = out.total.view(-1, group_size)
    unscored = out.unscored_rows().view(-1, group_size)
    valid = (out.valid.view(-1, group_size) | unscored).all(dim=1)
    hi = total.masked_fill(unscored, float("-inf")).amax(dim=1)
    lo = total.masked_fill(unscored, float("inf")).amin(dim=1)
    return valid & (hi > lo)


def _uniform_group_frac(out, group_size: int) -> float:
    """The fraction of groups that teach nothing: their answers all scored alike, or one got a
    bad reward (TRL's ``frac_reward_zero_std``). Under TRL's convention with unscored answers,
    as TRL: a group with fewer than two scored answers has no std (NaN, not 0) and does not
    count."""
    unscored = out.unscored_rows().view(-1, group_size)
    if not unscored.any():
        return 1.0 - float(_informative_groups(out, group_size).float().mean())
    lacks_std = (~unscored).sum(dim=1) < 2
    bad = (~(out.valid.view(-1, group_size) | unscored)).any(dim=1)
    return float(((~_informative_groups(out, group_size) & ~lacks_std) | bad).float().mean())


def _nan_shape(raw: torch.Tensor, shape) -> torch.Tensor:
    """``shape(raw)`` (scores ``[B]``) on the scored entries only; NaN (unscored) ones stay
    NaN, and never reach a running statistic."""
    scored = ~torch.isnan(raw)
    if bool(scored.all()):
        return shape(raw)
    out = torch.full_like(raw, float("nan"))
    if bool(scored.any()):
        out[scored] = shape(raw[scored])
    return out


def _sample_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of response ``index`` of the global batch of ``step`` (63 bits; an
    LCG-style mix so nearby (step, index) pairs give unrelated generator states)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**64)
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93 % (2**64)) >> 1


def _is_weight_mean_parts(w: torch.Tensor, rm: torch.Tensor, per_answer: bool) -> tuple:
    """(sum, count) float64 0-dim tensors of ``is_weight/mean`` of the weights ``w`` ``[B, L]`` on
    the response tokens ``rm`` ``[B, L]`` bool: over the tokens, or (``per_answer``: a sequence
    ``ppo.is_mode``, one weight per answer on each of its tokens) over the answers with a
    response token, each once, as TRL's ``sampling/importance_sampling_ratio/mean`` of its
    ``(B, 1)`` weights (a token mean would weigh long answers more)."""
    if not per_answer:
        return (w * rm).double().sum(), rm.double().sum()
    rows = rm.any(1)
    row_w = (w * rm).double().sum(1) / rm.sum(1).clamp(min=1).double()
    return row_w[rows].sum(), rows.double().sum()


def _masked_min_max(x: torch.Tensor, mask: torch.Tensor) -> tuple:
    """(min, max) floats of ``x`` ``[B, L]`` where ``mask`` ``[B, L]`` bool; (inf, -inf) with
    no token, the neutral values of a min / max reduction over ranks."""
    v = x[mask]
    if v.numel() == 0:
        return float("inf"), float("-inf")
    return float(v.min()), float(v.max())


# value/explained_variance: returns whose variance is under this share of the mean of returns² +
# values² (a relative std of 1e-6, ~8 float32 ulps) are constant up to rounding
_EV_RTOL = 1e-12


def _explained_variance(var_err: float, var_ret: float, scale_sq: float) -> float:
    """``value/explained_variance`` 1 − var(returns − values) / var(returns); 0 when the returns
    are constant (their variance ≤ ``_EV_RTOL`` × ``scale_sq``, the mean of returns² + values²):
    returns = advantages + values carry float32 rounding, and equal returns (one-token answers all
    scored alike) gave rounding noise over rounding noise, ~ −9e11."""
    return 1.0 - var_err / var_ret if var_ret > _EV_RTOL * scale_sq else 0.0


# the evaluation's answers are seeded by their index past every training rollout's indices
_EVAL_INDEX = 2**40


def _eval_sums(out, rm: torch.Tensor, group_size: int, texts: Optional[List[str]] = None) -> Dict[str, tuple]:
    """``{name: (sum, count)}`` of one evaluation batch (``out``: its RewardOutput, ``rm``
    ``[B, L]`` bool its response mask, rows grouped by prompt): the valid rows' total
    rewards, each source's finite values, the response lengths and, for ``group_size`` > 1,
    the unbiased std of the totals of each group whose answers are all valid and verl's
    ``mean@G``, ``best@k`` / ``worst@k`` and, with ``texts`` (the B answers), ``maj@k`` of each
    such group (:func:`rlhf_fast.trainers.evaluate.validation_sums`). Sums over ranks
    and calls give the means of :meth:`RLTrainer.evaluate`."""
    d = lambda t: float(t.double().sum())  # noqa: E731
    total = out.total.double()
    ok = out.valid.bool() & torch.isfinite(total)
    res = {"reward/total": (d(total[ok]), float(ok.sum())),
           "response_length": (d(rm.sum(1)), float(rm.shape[0]))}
    for name, v in out.per_source.items():
        fin = torch.isfinite(v)
        res[f"reward/{name}"] = (d(v[fin]), float(fin.sum()))
    if group_size > 1:
        groups = ok.view(-1, group_size).all(dim=1)
        std = total.view(-1, group_size)[groups].std(dim=1)
        res["reward_std"] = (d(std), float(groups.sum()))
        from rlhf_fast.trainers.evaluate import validation_sums, vote_key

        keys = None
        if texts is not None:
            flat = [vote_key(t) for t in texts]
            keys = [flat[i:i + group_size] for i in range(0, len(flat), group_size)]
        res.update(validation_sums(total.view(-1, group_size), keys, ok.view(-1, group_size)))
    return res


# statistics of importance_sampling_level sequence_sum and sequence (one ratio per answer, TRL's
# clip_ratio/*_mean over its [B, 1] flags) taken over answers, not tokens
_ANSWER_STATS = ("clip_frac", "clip_low_frac", "clip_high_frac", "dual_clip_frac", "ratio_mean")
_ANSWER_LEVELS = ("sequence", "sequence_sum")
# TRL's clip_ratio/low_min and high_max (gmpo): extremes over the answers, so reduced over
# micro-batches and ranks by min / max, not averaged (+inf / -inf: no answer had a loss token)
_MIN_STATS = ("clip_low_min",)
_MAX_STATS = ("clip_high_max",)


def _token_normalizer(mask: torch.Tensor, agg: str, max_new_tokens: int):
    """The denominator of ``agg`` over a whole mini-batch (mask ``[b, L]``), computed once.

    ``seq-mean-token-sum-norm`` (Dr.GRPO) divides by the constant rows × ``max_new_tokens``
    (the generation budget, as TRL's ``B · max_completion_length``), not by ``mask.numel()``:
    ``L`` also counts the prompt columns and changes from batch to batch, which would make
    the loss scale depend on prompt length and padding."""
    if agg == "token-mean":
        return mask.sum().clamp(min=1).to(torch.float32)
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float(mask.shape[0])
    return float(mask.shape[0] * max_new_tokens)  # seq-mean-token-sum-norm


def critic_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) aligned to ``input_ids`` positions: ``[B, L]`` float32, 0 at t = 0.

    The action at position t is token ``input_ids[:, t]``, taken in the state ``input_ids[:, :t]``
    (the same alignment as the log-probs, whose token t is predicted from the hidden state at
    t − 1). A :class:`~rlhf_fast.models.loading.ValueModel` gives at t the value after reading
    token t, so V(s_t) is its output at t − 1 — as TRL (``full_value[:, context_length - 1 : -1]``),
    OpenRLHF and verl (``values[:, -response_length - 1 : -1]``) take it. Its output at t itself
    has seen the action: a baseline that depends on the action biases the policy gradient, and at
    the last token it predicts the score and cancels the reward. ValueError naming the critic
    when it returns anything but a ``[B, L]`` tensor."""
    v = critic(input_ids, attention_mask)
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(input_ids.shape):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"critic must return a tensor of values [B, L] = {list(input_ids.shape)} (the value after "
                         f"reading each token, as rlhf_fast.models.loading.ValueModel), got {got}")
    v = v.float()
    return torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)


def _critic_shares(critic, key: Optional[str], seq_len: int) -> bool:
    """Whether the critic's values come from the shared-prefix row (``key``, the config key that
    packs the rows — ``ppo.prefix_sharing`` or ``ppo.padding_free``, None: neither — and a critic
    :func:`~rlhf_fast.models.shared_values.critic_sharing_reason` accepts). A critic it cannot run
    keeps its padded forward, with one warning naming ``key``: unlike the policy's log-probs, the
    critic's values have an exact padded path, and refusing would take the policy's packing away
    too."""
    if critic is None or key is None:
        return False
    from rlhf_fast.models.shared_values import critic_sharing_reason

    why = critic_sharing_reason(critic, seq_len)
    if why is not None:
        warnings.warn(f"{key}: the critic keeps its padded forward (each prompt once per "
                      f"answer) because {why}", RuntimeWarning, stacklevel=3)
    return why is None


def _packing_key(ppo) -> Optional[str]:
    """The config key under which the RL forwards run packed rows: ``ppo.prefix_sharing`` (which
    is padding-free too, so it wins), ``ppo.padding_free``, or None (padded)."""
    return "ppo.prefix_sharing" if ppo.prefix_sharing else "ppo.padding_free" if ppo.padding_free else None


def _blank_row(data: "RolloutTensors") -> "RolloutTensors":
    """One row shaped like ``data``'s rows that counts nothing (no response token; attended,
    so every value stays finite): what a rank without rows feeds to keep its forwards and
    backwards in step with the other ranks. A subclass's extra fields are left out (a plain
    :class:`RolloutTensors`: SDPO's blank row reads none)."""
    fields = {k: getattr(data, k) for k in RolloutTensors.__dataclass_fields__}
    out = {k: (None if v is None else v[:1].clone() if v.shape[0] else v.new_zeros((1, *v.shape[1:])))
           for k, v in fields.items()}
    out["response_mask"].zero_()
    out["attention_mask"].fill_(True)
    return RolloutTensors(**out)


def _micro_batches(data: "RolloutTensors", mb: int, n_micro: Optional[int]):
    """Yields ``(micro-batch, real, more)`` over ``data`` in micro-batches of ``mb`` rows: at
    least the ones ``data`` fills, ``n_micro`` if that is more, the extra ones a blank row that
    adds nothing (``real`` False); ``more``: another micro-batch follows."""
    B = data.input_ids.shape[0]
    n = -(-B // mb) if n_micro is None else max(n_micro, -(-B // mb))
    for j in range(n):
        s = j * mb
        real = s < B
        d = data.select(torch.arange(s, min(B, s + mb), device=data.input_ids.device)) if real else _blank_row(data)
        yield d, real, j + 1 < n


def restarts_from_step_zero(path: str) -> bool:
    """Whether resuming the run folder ``path`` starts its run again from step 0: it holds a run
    (its config.yaml) stopped before its first complete checkpoint. The one predicate of
    :meth:`RLTrainer._restarts` (which also refuses a folder with neither) and of
    :meth:`rlhf_fast.trainers.a2po.A2POTrainer.train` (Stage 1 before the run starts again)."""
    from rlhf_fast.trainers.checkpoint import latest_checkpoint

    return latest_checkpoint(path) is None and os.path.isfile(os.path.join(path, "config.yaml"))


def _save_critic(critic, folder: str, full: Optional[dict]) -> None:
    """``critic.save_pretrained(folder)``; ``full``: its gathered state dict (FSDP2 holds only
    shards in the module), written in place of the module's own tensors."""
    from rlhf_fast.models import loading

    if full is None or not isinstance(critic, loading.ValueModel):
        critic.save_pretrained(folder)
        return
    critic.save_pretrained(folder, state_dict={k[len("backbone."):]: v for k, v in full.items()
                                               if k.startswith("backbone.")})
    # the value head file as ValueModel.save_pretrained writes it, from the gathered tensors
    torch.save({k[len("value_head."):]: v for k, v in full.items() if k.startswith("value_head.")},
               os.path.join(folder, loading._VALUE_HEAD_FILE))


class _StateDictOnly(torch.nn.Module):
    """Checkpoints a module through its state_dict (safetensors), not its own save_pretrained
    (ValueModel's save_pretrained writes a layout the checkpoint loader does not read back)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def split_eval_records(cfg: RLConfig, records: list, eval_prompts: Optional[Sequence] = None,
                       convert=None) -> tuple:
    """(training records, evaluation records) — each ``(prompt, fields)`` — of the RL run
    ``cfg``, from its training ``records`` and its one source of evaluation prompts:
    ``eval_prompts`` (the Python API), ``data.eval_prompts``, ``data.eval_prompts_file``, or
    ``data.eval_fraction`` (whole prompts held out of ``records``, every record of a prompt on one
    side, by a permutation seeded with the run's seed alone); the first ``eval.max_prompts`` of
    them, each read through ``convert`` as
    :func:`load_prompt_records` does. ``rlhf-fast eval --run`` splits the same way."""
    d = cfg.data
    src = d.eval_source()
    if eval_prompts is not None:
        if src is not None:
            raise ValueError(f"eval_prompts=[...] and {src} are both given; give one source of evaluation prompts")
        ev = [prompt_record(p, d.prompt_key, f"eval_prompts[{i}]", convert) for i, p in enumerate(eval_prompts)]
        if not ev:
            raise ValueError("eval_prompts must be a non-empty list (texts, chats, or records with a prompt field)")
    elif src == "data.eval_prompts":
        ev = [prompt_record(p, d.prompt_key, f"data.eval_prompts[{i}]", convert)
              for i, p in enumerate(d.eval_prompts)]
    elif src == "data.eval_prompts_file":
        ev = read_prompt_records(d.eval_prompts_file, d.prompt_key, "data.eval_prompts_file", "data.prompt_key",
                                 convert=convert)
    elif src == "data.eval_fraction":
        # whole prompts are held out (a prompt listed twice is never both held out and trained on),
        # numbered in first-occurrence order: with no repeats they are the records' indices and
        # the split is the permutation of the records it always was
        item_of: dict = {}
        items = [item_of.setdefault(_prompt_key(p), len(item_of)) for p, _ in records]
        n = len(item_of)
        k = max(1, round(d.eval_fraction * n))
        if k >= n:
            raise ValueError(f"data.eval_fraction ({d.eval_fraction}) holds out {k} of the {n} prompts (each "
                             f"counted once): at least one must remain for training")
        # its own stream (not the shuffle's): the split is a function of the seed and the prompts
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + 999_999_937) % 2**63)
        held = set(torch.randperm(n, generator=g)[:k].tolist())
        ev = [r for r, i in zip(records, items) if i in held]
        records = [r for r, i in zip(records, items) if i not in held]
    else:
        ev = []
    if cfg.eval.max_prompts is not None:
        ev = ev[:cfg.eval.max_prompts]
    return records, ev


def _prompt_key(prompt) -> str:
    """A prompt (text or chat) as a hashable text, for grouping the records of one prompt."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


def with_estimator(config: RLConfig, estimator: str) -> RLConfig:
    """``config`` with ``estimator`` set: what a trainer subclass fixes as GRPOTrainer fixes grpo
    (distillation, online DPO, A*-PO); TypeError for anything but an RLConfig."""
    if not isinstance(config, RLConfig):
        raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
    return config if config.estimator == estimator else replace(config, estimator=estimator)


class RLTrainer:
    """RL fine-tuning of a causal LM; the estimator (``config.estimator``) picks the algorithm:
    ``gae`` = PPO with a critic, ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce++``, ``reinforce++_baseline``
    without one.

    config: :class:`RLConfig`. policy / tokenizer: a HF causal LM and its tokenizer (built from
    ``config.model`` when None). reward_fns: callables ``fn(prompts, completions) -> list[float]``
    or :class:`rlhf_fast.algorithms.RewardSource` objects (weights: ``reward_weights``, default 1);
    reward_models: list of ``(model, tokenizer_or_None)`` or models scored with
    :func:`rlhf_fast.models.loading.reward_scores`; judge: the AI judge (``score(prompts,
    responses)``). prompts: list of prompt strings (else from ``config.data``). reference /
    critic / engine: override the frozen reference, the ValueModel or the RolloutEngine (a
    critic maps ``(input_ids, attention_mask)`` to ``[B, L]`` values of the state after reading
    each token, as ValueModel does; the trainer shifts them by one, see :func:`critic_values`; a
    one-label sequence-classification model, TRL 0.x PPO's ``value_model``, becomes a ValueModel of a
    copy of its backbone and score head).
    eval_prompts: the evaluation prompts (texts, chats or records, as ``prompts``) in place of
    ``config.data``'s eval_prompts / eval_prompts_file / eval_fraction, for ``eval_every`` and
    :meth:`evaluate`.
    tools: callables the policy may call (TRL GRPOTrainer's ``tools``; with
    ``config.rollout.tools`` after them): chat prompts are rendered with them, and each rollout
    runs the calls in the answers and goes on with their results
    (:func:`rlhf_fast.rollout.tools.tool_rollout`; ``rollout.max_tool_calling_iterations``).
    The tool results are context in the sequence but out of the loss (response mask 0: KL,
    advantages, values and every loss skip them); reward functions get the whole completion
    text, tool turns included, and its turns as chat messages in the keyword argument
    ``completion_messages`` (TRL passes those as ``completions``).
    environment_factory: TRL GRPOTrainer's — a callable (an environment class) or a mapping
    ``{name: callable}`` that the prompt records select with their ``environment`` field (else
    ``config.rollout.environment_factory``'s import paths). Every answer gets a fresh instance,
    reset with its prompt's record; its public methods are tools (after ``tools``); reward
    functions receive the instances as ``environments`` and an environment's ``get_reward()``
    is a reward source (:mod:`rlhf_fast.rollout.environments`). Instances are re-created for
    every rollout from the records, so a checkpoint needs no environment state.
    rollout_func: TRL GRPOTrainer's — ``fn(prompts, trainer) -> dict`` in place of the engine
    for training and evaluation rollouts (else ``config.rollout.rollout_func``'s import path):
    ``prompts`` this rank's prompts as the data gives them, each repeated group_size times
    (with environments, what ``reset`` returned appended), ``trainer`` this trainer; it returns
    ``prompt_ids``, ``completion_ids``, ``logprobs`` (the sampler's, one per completion token),
    optionally ``env_mask`` (0: a token out of the loss) and other keys, per-row reward fields
    (:mod:`rlhf_fast.rollout.custom_rollout`). Not with tools (it runs its own).
    """

    # the subclass that trains ``estimator: distill`` (rlhf_fast.trainers.distill.DistillationTrainer)
    _distills = False
    # the subclass that trains ``estimator: online_dpo`` (rlhf_fast.trainers.online_dpo.OnlineDPOTrainer)
    _online_dpo = False
    # the subclass that trains ``estimator: a2po`` (rlhf_fast.trainers.a2po.A2POTrainer)
    _a2po = False
    # the subclass that trains ``estimator: sdpo`` (rlhf_fast.trainers.sdpo.SDPOTrainer); it hands this
    # class a grpo config, so only the other direction is refused here
    _sdpo = False
    # (record, prompt_key, where) -> record: a subclass's own data format read as a prompt record
    # (distillation: GKD's {messages}); None: records as they are
    convert_record = None

    def __init__(
        self,
        config: RLConfig,
        policy=None,
        tokenizer=None,
        *,
        reward_fns: Sequence = (),
        reward_weights: Optional[Sequence[float]] = None,
        reward_models: Sequence = (),
        judge=None,
        prompts: Optional[Sequence[str]] = None,
        reference=None,
        critic=None,
        engine=None,
        eval_prompts: Optional[Sequence] = None,
        tools: Optional[Sequence] = None,
        environment_factory=None,
        rollout_func=None,
    ):
        from rlhf_fast.trainers.common import seed_everything

        if not isinstance(config, RLConfig):
            raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
        if (config.estimator == DISTILL) != self._distills:
            raise ValueError(f"estimator {config.estimator!r}: distillation trains with "
                             "rlhf_fast.trainers.distill.DistillationTrainer (rlhf-fast distill), the RL estimators "
                             f"with RLTrainer; got {type(self).__name__}")
        if (config.estimator == ONLINE_DPO) != self._online_dpo:
            raise ValueError(f"estimator {config.estimator!r}: online DPO trains with "
                             "rlhf_fast.trainers.online_dpo.OnlineDPOTrainer (rlhf-fast online-dpo), the RL estimators "
                             f"with RLTrainer; got {type(self).__name__}")
        if (config.estimator == A2PO) != self._a2po:
            raise ValueError(f"estimator {config.estimator!r}: A*-PO trains with rlhf_fast.trainers.a2po.A2POTrainer "
                             f"(rlhf-fast a2po), the RL estimators with RLTrainer; got {type(self).__name__}")
        if config.estimator == SDPO and not self._sdpo:
            raise ValueError(f"estimator {config.estimator!r}: SDPO trains with rlhf_fast.trainers.sdpo.SDPOTrainer "
                             f"(rlhf-fast sdpo), the RL estimators with RLTrainer; got {type(self).__name__}")
        config.ppo.check_estimator(config.estimator, config.kl)
        if (policy is None) != (tokenizer is None):
            raise ValueError("policy and tokenizer must be given together (or both None to build from config.model)")
        from rlhf_fast.trainers.sft import setup_distributed

        self.config = cfg = config
        self.ctx, self.device = setup_distributed(cfg.distributed, cfg.device)
        # every phase timer reads this clock (sync_phase_timers; settable after construction)
        self.phase_clock = PhaseClock(self.device, synchronize=cfg.sync_phase_timers)
        if self.ctx.distributed and cfg.rollout.prompts_per_step % self.ctx.world_size != 0:
            raise ValueError(f"rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) must be divisible by the "
                             f"number of ranks ({self.ctx.world_size})")
        seed_everything(cfg.seed)
        if policy is None:
            policy, tokenizer = self._load_policy()
        elif cfg.model.model_init_kwargs:
            # TRL's GRPO / RLOO warn alike and leave a model instance as it is
            warnings.warn(f"model.model_init_kwargs ({cfg.model.model_init_kwargs}) is not applied to the policy "
                          "passed as policy=... (already built; cast it yourself); it still loads the folders of "
                          "model.reference, model.critic and reward.reward_model", stacklevel=2)
        if cfg.model.lora is not None:  # fresh adapters (and checkpointing with input gradients kept)
            from rlhf_fast.models import loading

            if loading._is_peft(policy):
                raise ValueError("model.lora: the policy already has peft adapters; leave model.lora null")
            policy = loading.load_policy(policy, lora=cfg.model.lora,
                                         gradient_checkpointing=cfg.model.gradient_checkpointing)
        elif cfg.model.gradient_checkpointing:  # before the reference and critic copies are made
            from rlhf_fast.models.loading import enable_activation_checkpointing

            enable_activation_checkpointing(policy)
        positions = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and cfg.rollout.max_new_tokens > positions:
            # every response would run past the positions the model was built for (and a huge
            # value tries to allocate the whole KV cache / RoPE table up front)
            raise ValueError(f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) is more than the policy's "
                             f"max_position_embeddings ({positions})")
        # tool results that would take a sequence to this length are dropped (TRL's model ceiling)
        self._max_positions = positions if isinstance(positions, int) else None
        self.policy = policy.to(self.device)
        # No dropout during RL: the recomputed log-probs must match the ones the ratio uses.
        self.policy.eval()
        self.tokenizer = tokenizer
        from rlhf_fast.trainers.merging import setup_policy_merge

        setup_policy_merge(self)  # the merge target defaults to the initial policy (bare, before any resume)
        self._before_wrap(self.policy)
        # No KL term anywhere (kl.coef 0, a fixed controller, no reference sync) and no reference
        # asked for: none is built and none runs (as TRL with beta 0 and verl without a KL
        # loss or reward): DAPO-style runs save a model's memory and a forward per step.
        kl = cfg.kl
        kl_free = kl.coef == 0 and kl.controller == "fixed" and not kl.ref_sync_steps
        # (distillation: no KL term at all, whatever kl.coef says; its config refuses the rest)
        if reference is None and cfg.estimator != DISTILL and not (kl_free and not cfg.model.reference):
            from rlhf_fast.models import loading

            if cfg.model.reference:
                loading.check_model_folder(cfg.model.reference, "model.reference")
            # a folder loads as the policy did (TRL builds its reference with the same model_init_kwargs)
            reference = (loading.make_reference(loading.load_merged(cfg.model.reference,
                                                                    init_kwargs=cfg.model.model_init_kwargs))
                         if cfg.model.reference else loading.make_reference(self.policy))
            if cfg.model.reference:  # (its KL reads the policy's token ids)
                loading.check_same_vocabulary(self.policy, reference, f"model.reference {cfg.model.reference!r}")
        if reference is None:
            pass  # kl_free: no reference, so no forward and no kl/* metrics
        elif isinstance(reference, torch.nn.Module):  # (a peft policy's reference is a wrapper)
            # distributed.offload_reference: it lives in CPU memory and visits the device per step
            home = torch.device("cpu") if cfg.distributed.offload_reference else self.device
            reference = reference.to(home).eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        elif cfg.distributed.offload_reference:
            raise ValueError("distributed.offload_reference needs a separate reference model; this reference "
                             f"({type(reference).__name__}) shares the policy's weights (a peft policy with its "
                             "adapters disabled), so there is nothing to offload")
        if cfg.kl.ref_sync_steps:
            _check_syncable(self.policy, reference)
        if _packing_key(cfg.ppo):  # no transformers fallback for its attention: refused now, not mid-run
            from rlhf_fast.trainers.packing import check_prefix_shareable

            check_prefix_shareable(_packing_key(cfg.ppo), cfg.rollout.max_new_tokens + 1, self.policy, reference,
                                   alternative=None)
        self.reference = reference
        self.reference_sharded = False  # FSDP2 shards it below (distributed.offload_reference off)
        self.critic = None
        if cfg.estimator in CRITIC_ESTIMATORS:
            self.critic = (_given_critic(self.policy, critic) if critic is not None else _make_critic(
                self.policy, cfg.model.critic, cfg.model.model_init_kwargs)).to(self.device)
            if critic is None and cfg.model.critic is not None and cfg.model.gradient_checkpointing:
                # a critic loaded from a folder (one copied from the policy inherits the policy's)
                from rlhf_fast.models.loading import enable_activation_checkpointing

                enable_activation_checkpointing(self.critic.backbone)
            self.critic.eval()
        # (checked before a DDP / FSDP2 wrapper adds its hooks)
        self._critic_shared = _critic_shares(self.critic, _packing_key(cfg.ppo),
                                             cfg.rollout.max_new_tokens + 1)
        if engine is None:
            from rlhf_fast.rollout import HFRolloutEngine

            engine = HFRolloutEngine(self.policy, tokenizer, device=self.device,
                                     cuda_graphs=cfg.rollout.cuda_graphs)
        self.engine = engine
        self._env_factories, self._env_probes = self._build_environments(environment_factory)
        self.reward = self._build_rewards(reward_fns, reward_weights, reward_models, judge)
        self._reward_log = RewardLog()  # what TRL-convention reward functions log (log_metric / log_extra)
        # the prompts as the policy reads them (chats rendered with the tokenizer's template) and
        # each one's other fields (reward functions take them as keyword arguments)
        conv = self.convert_record
        records = (load_prompt_records(cfg.data, conv) if prompts is None else
                   [prompt_record(p, cfg.data.prompt_key, f"prompts[{i}]", conv) for i, p in enumerate(prompts)])
        if not records:
            raise ValueError("prompts must be a non-empty list (texts, chats, or records with a prompt field)")
        records, eval_records = split_eval_records(cfg, records, eval_prompts, conv)
        self.tools = self._build_tools(tools)
        self.rollout_func = self._build_rollout_func(rollout_func)
        # the records as given (environments are reset with them) and each one's environment
        self._records = {"train": records, "eval": eval_records}
        self._env_names = {k: self._record_environments(v, k) for k, v in self._records.items()}
        # chats are rendered with the tools' schemas (text prompts are the user's as written)
        self.prompts = [self._render(p, e) for (p, _), e in zip(records, self._env_names["train"])]
        self.prompt_fields = [f for _, f in records]
        if cfg.num_train_epochs is not None:  # TRL's num_train_epochs: steps from the training prompts
            cfg.steps = max(1, math.ceil(cfg.num_train_epochs * len(records) / cfg.rollout.prompts_per_step - 1e-9))
        # evaluation during training (eval_every): the prompts rendered alike, and their fields
        self.eval_prompts = [self._render(p, e) for (p, _), e in zip(eval_records, self._env_names["eval"])]
        self.eval_fields = [f for _, f in eval_records]
        self._check_packed_prompts()
        if cfg.eval_every and not self.eval_prompts:
            raise ValueError(f"eval_every ({cfg.eval_every}) needs evaluation prompts: set data.eval_prompts, "
                             "data.eval_prompts_file or data.eval_fraction (or pass eval_prompts=[...])")
        if self.ctx.distributed:
            # DDP: after the engine took the bare policy, so generation needs no gradient sync.
            # FSDP2 shards the engine's policy in place; the engine gathers it for each generate.
            from rlhf_fast.distributed import wrap_model

            dc = cfg.distributed
            kw = dict(mixed_precision=dc.mixed_precision, reshard_after_forward=dc.reshard_after_forward)
            self.policy = wrap_model(self.policy, dc.strategy, self.ctx, **kw)
            if self.critic is not None:  # a value model built from the policy leaves its LM head unused
                self.critic = wrap_model(self.critic, dc.strategy, self.ctx, find_unused_parameters=True,
                                         **kw)
            if dc.strategy == "fsdp2" and isinstance(self.reference, torch.nn.Module) and not dc.offload_reference:
                # the frozen reference sharded like the policy: each rank keeps 1/N of its weights
                # between steps; its one forward per step lines up on every rank (same row count)
                self.reference = wrap_model(self.reference, "fsdp2", self.ctx, **kw)
                self.reference_sharded = True
        ps = cfg.rollout.per_sample_seeds
        self.per_sample_seeds = cfg.distributed.strategy != "none" if ps is None else ps

        from rlhf_fast.trainers.common import make_optimizer, make_scheduler, warmup_steps_for

        o = cfg.optim
        okw = dict(weight_decay=o.weight_decay, optim=o.name, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                   optim_args=o.optim_args)
        self.optimizer = make_optimizer([p for p in self.policy.parameters() if p.requires_grad], lr=o.lr, **okw)
        self.critic_optimizer = None
        if self.critic is not None:
            self.critic_optimizer = make_optimizer(list(self.critic.parameters()), lr=o.critic_lr, **okw)

        total = max(1, cfg.steps * cfg.ppo.epochs * max(1, cfg.batch_size // cfg.ppo.mini_batch_size))
        kw = dict(warmup_steps=warmup_steps_for(o.warmup_steps, o.warmup_ratio, total), total_steps=total,
                  kind=o.schedule, min_ratio=o.min_lr_ratio, lr_scheduler_kwargs=o.lr_scheduler_kwargs)
        self.scheduler = make_scheduler(self.optimizer, **kw)
        self.critic_scheduler = make_scheduler(self.critic_optimizer, **kw) if self.critic_optimizer else None
        # fp16's loss scalers, one per optimizer (pass-throughs without fp16, or off CUDA)
        self.scaler = LossScaler(cfg.fp16, self.device)
        self.critic_scaler = LossScaler(cfg.fp16, self.device)
        self.kl_ctl = make_kl_controller(cfg.kl.controller, cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        self.reward_moments = RunningMoments()
        # ppo.use_adaptive_entropy: the coefficient and the entropy last measured (none yet: no
        # bonus until the first optimizer step has measured one, as TRL)
        self.entropy_coef = float(cfg.ppo.entropy_coef)
        self.last_entropy = float("inf")
        # TRL's MoE load-balancing term of the policy update (or off)
        self.moe = RouterAux(self.policy, cfg.ppo.router_aux_loss_coef, "ppo.router_aux_loss_coef")
        self.global_step = 0
        self.prompt_pos = 0  # prompts consumed so far (data position)
        self.dropped_total = 0
        self._sampled_rows = 0  # rows of the last rollout with a response (the adaptive KL counts them)
        self._tool_counts = [0, 0, 0]  # this rank's tool calls, failures and answers of the step's rollout
        self.run_dir = None
        self._logger = None
        # torch_compile: the backbones compiled in place, after wrapping (as accelerate); step()
        # repeats it for the models a subclass adds after this (teachers)
        compile_rl_models(self)

    # ------------------------------------------------------------------ setup helpers

    def _load_policy(self):
        """``(policy, tokenizer)`` from ``model.policy`` (a folder loaded with
        ``model.model_init_kwargs``, or a tiny model they are applied to once built)."""
        cfg = self.config
        init_kwargs = cfg.model.model_init_kwargs
        if cfg.model.policy.startswith("tiny:"):
            from rlhf_fast.models.loading import apply_model_init_kwargs

            model, tok = build_tiny_policy(cfg)
            return apply_model_init_kwargs(model, init_kwargs), tok
        from transformers import AutoTokenizer

        from rlhf_fast.models.loading import check_model_folder, check_tokenizer_folder, load_policy, tokenizer_kwargs

        if not os.path.exists(cfg.model.policy):
            raise FileNotFoundError(f"model.policy: no such path {cfg.model.policy!r} (or use 'tiny:llama')")
        check_model_folder(cfg.model.policy, "model.policy", tokenizer=cfg.model.tokenizer is None,
                           tokenizer_key="model.tokenizer")
        if cfg.model.tokenizer is not None:
            check_tokenizer_folder(cfg.model.tokenizer, "model.tokenizer")
        tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.policy, **tokenizer_kwargs(init_kwargs))
        tok.padding_side = "left"
        return load_policy(cfg.model.policy, init_kwargs=init_kwargs), tok

    def _build_rewards(self, reward_fns, reward_weights, reward_models, judge) -> CombinedReward:
        rc = self.config.reward
        sources, weights = [], []
        fns = list(reward_fns)
        ws = list(reward_weights) if reward_weights is not None else [1.0] * len(fns)
        if len(ws) != len(fns):
            raise ValueError(f"reward_weights must have one entry per reward_fns entry ({len(fns)}), got {len(ws)}")
        for fn, w in zip(fns, ws):
            sources.append(fn if isinstance(fn, RewardSource)
                           else CallableReward(fn, convention=rc.calling_convention))
            weights.append(w)
        for spec, w in zip(rc.functions, rc.weights or [1.0] * len(rc.functions)):
            sources.append(CallableReward(load_callable(spec), name=spec.rsplit(":", 1)[1],
                                          convention=rc.calling_convention))
            weights.append(w)
        from rlhf_fast.models.loading import reward_model_sources

        api = []  # the Python API's reward models first, then the config's folders
        for i, rm in enumerate(reward_models):
            model, tok = rm if isinstance(rm, tuple) else (rm, None)
            api.append(RewardModelReward(model.to(self.device).eval(), tok, name=f"reward_model{i or ''}"))
        for src, w in reward_model_sources(rc, models=api, device=self.device,
                                           init_kwargs=self.config.model.model_init_kwargs):
            sources.append(src)
            weights.append(w)
        if judge is not None:
            sources.append(JudgeReward(judge))
            weights.append(1.0)
        if rc.length_penalty > 0:
            sources.append(LengthPenalty(rc.length_target))
            weights.append(rc.length_penalty)
        if rc.repetition_penalty > 0:
            sources.append(RepetitionPenalty(rc.repetition_ngram))
            weights.append(rc.repetition_penalty)
        if rc.overlong_buffer > 0 and rc.overlong_penalty > 0:
            sources.append(OverlongPenalty(self.config.rollout.max_new_tokens, rc.overlong_buffer))
            weights.append(rc.overlong_penalty)
        from rlhf_fast.rollout.environments import reward_sources

        for src in reward_sources(self._env_probes):  # environments that own a reward (get_reward), weight 1
            sources.append(src)
            weights.append(1.0)
        if not sources and self._rewards_optional():
            return None  # distillation (or a judged online DPO) needs no reward: sources are only logged
        if not sources:
            raise ValueError(self._no_reward_message())
        return CombinedReward(sources, weights, on_bad_reward=rc.on_bad_reward, convention=rc.calling_convention)

    def _rewards_optional(self) -> bool:
        """Whether the run trains without reward sources (distillation; online DPO with a
        pairwise judge, :class:`~rlhf_fast.trainers.online_dpo.OnlineDPOTrainer`)."""
        return self.config.estimator == DISTILL

    def _no_reward_message(self) -> str:
        """The error of a run given no reward source: every way to give one (online DPO adds its
        pairwise judge)."""
        return ("no reward source: pass reward_fns / reward_models / judge, or set reward.functions, "
                "reward.reward_model or reward.process_model in the config (or an environment with get_reward)")

    def _build_environments(self, factory) -> tuple:
        """``({name: factory}, {name: probe instance})`` of ``environment_factory=`` or
        ``rollout.environment_factory`` (not both); ``({}, {})`` without environments. The probe
        of each environment (checked to have ``reset``) describes its tools in the prompts."""
        from rlhf_fast.rollout import environments as E

        spec = self.config.rollout.environment_factory
        if factory is not None and spec is not None:
            raise ValueError("environment_factory=... and rollout.environment_factory are both set; give one")
        if factory is not None:
            factories = E.normalize_factories(factory, "environment_factory")
            return factories, E.probe(factories, "environment_factory")
        factories = E.load_factories(spec, "rollout.environment_factory")
        return factories, E.probe(factories, "rollout.environment_factory")

    def _record_environments(self, records: list, split: str) -> list:
        """The environment name of each record (None: the single one, or no environments)."""
        from rlhf_fast.rollout.environments import environment_name

        if not self._env_factories:
            return [None] * len(records)
        return [environment_name(f, list(self._env_factories), f"{split} prompt {i}") for i, (_, f) in
                enumerate(records)]

    def _tools_of(self, env: Optional[str]) -> list:
        """The tools an answer of environment ``env`` may call (its prompt lists them)."""
        return self._env_tools[env] if self._env_factories else self.tools

    def _check_packed_prompts(self) -> None:
        """``ppo.padding_free`` / ``ppo.prefix_sharing``: the start-up check of the policy and
        reference (:func:`~rlhf_fast.trainers.packing.check_prefix_shareable`) again, with the
        longest rendered prompt's tokens + ``max_new_tokens`` + 1 as the row length (it ran
        before the prompts were rendered, with the answer alone): a sliding window the rows
        outgrow is refused now, naming the key, not at the first scoring. Rows a tool call
        lengthens are still checked where they are scored."""
        key = _packing_key(self.config.ppo)
        texts = [p for p in self.prompts + self.eval_prompts if isinstance(p, str)]
        if not key or not texts or self.tokenizer is None:
            return
        from rlhf_fast.trainers.packing import check_prefix_shareable

        longest = max(len(ids) for ids in self.tokenizer(texts)["input_ids"])
        check_prefix_shareable(key, longest + self.config.rollout.max_new_tokens + 1, self.policy, self.reference,
                               alternative=None)

    def _render(self, prompt, env: Optional[str] = None) -> str:
        """A prompt as the policy reads it: a chat rendered with its tools' schemas and
        ``data.chat_template_kwargs`` (a text prompt is the user's as written)."""
        from rlhf_fast.feedback.formats import render_prompt

        if not isinstance(prompt, str) and not getattr(self.tokenizer, "chat_template", None):
            # TRL's apply_chat_template fails alike (and SFT refuses such data): "role: content"
            # lines would train the policy on a format of our own
            raise ValueError("the prompts hold conversations (chat messages) but the policy's tokenizer has no chat "
                             "template: use a model.policy (or model.tokenizer) folder whose tokenizer has one, or "
                             "set tokenizer.chat_template")
        tools = self._tools_of(env)
        return render_prompt(prompt, self.tokenizer, tools=tools or None,
                             chat_template_kwargs=self.config.data.chat_template_kwargs)

    def _build_tools(self, tools: Optional[Sequence]) -> list:
        """The callables of ``tools=`` then of ``rollout.tools``, checked: unique names, each
        describable by ``get_json_schema``, and a chat template that renders a tool exchange
        and appends tool results after an answer (TRL's checks). ``[]`` when there are none.
        With environments, each one's tools (those, then its methods) in ``_env_tools`` — the
        same checks — and the result is the union (TRL's ``self.tools``)."""
        from rlhf_fast.rollout.environments import environment_tools
        from rlhf_fast.rollout.tools import (check_call_parsing, check_tools, load_tools, supports_tool_calling,
                                             tool_name, tool_suffix_ids)

        if tools is not None and (isinstance(tools, (str, bytes)) or not isinstance(tools, (list, tuple))):
            raise TypeError(f"tools must be a list of callables, got {type(tools).__name__}")
        given, loaded = list(tools or []), load_tools(self.config.rollout.tools)
        out = given + loaded
        self._standalone_tools = list(out)  # tools of every answer, whatever its environment
        names = {**check_tools(given, "tools")}
        for i, name in enumerate(check_tools(loaded, "rollout.tools")):
            if name in names:
                raise ValueError(f"rollout.tools[{i}]: a tool named {name!r} is also in tools=[...]; tool names "
                                 f"must be unique")
        self._env_tools = {}
        for env, inst in self._env_probes.items():
            methods = environment_tools(inst)
            key = "environment_factory" + ("" if env is None else f".{env}")
            taken = [tool_name(m) for m in methods if tool_name(m) in names]
            if taken:
                raise ValueError(f"{key}: the environment's method(s) {taken} have the names of tools; tool names "
                                 f"must be unique")
            check_tools(methods, f"{key} methods")
            self._env_tools[env] = self._standalone_tools + methods
            out = out + [m for m in methods if tool_name(m) not in {tool_name(t) for t in out}]
        if not out:
            return []
        tok = self.tokenizer
        if tok is None or not supports_tool_calling(tok):
            raise ValueError("tools need a tokenizer whose chat template renders tool calls: an assistant message's "
                             "tool_calls and 'tool' role messages (as Qwen2.5's); this tokenizer's "
                             f"{'has none' if getattr(tok, 'chat_template', None) is None else 'drops them'}")
        try:
            tool_suffix_ids(tok, [{"role": "tool", "name": tool_name(out[0]), "content": "0"}],
                            chat_template_kwargs=self.config.data.chat_template_kwargs)
            # (a call format the parser cannot read would leave every tool silently unused)
            check_call_parsing(tok, out, chat_template_kwargs=self.config.data.chat_template_kwargs)
        except ValueError as e:
            raise ValueError(f"tools: {e}") from None
        return out

    def _before_wrap(self, policy: torch.nn.Module) -> None:
        """Called once by ``__init__`` with the policy as built (LoRA adapters and activation
        checkpointing applied, on ``self.device``, in eval mode; ``self.config``, ``self.ctx``,
        ``self.device`` and ``self.tokenizer`` set), before the reference, the critic, the rollout
        engine and DDP / FSDP2 take it: the place to copy its full weights (FSDP2 shards it in
        place later). Default: nothing."""

    def _build_rollout_func(self, fn):
        """The rollout function of ``rollout_func=`` or ``rollout.rollout_func`` (not both), or
        None; refused where another rollout owns generation (tools, distillation, online DPO)."""
        from rlhf_fast.rollout.custom_rollout import load_rollout_func

        spec = self.config.rollout.rollout_func
        if fn is not None and spec is not None:
            raise ValueError("rollout_func=... and rollout.rollout_func are both set; give one")
        if fn is None and spec is None:
            return None
        key = "rollout_func" if fn is not None else "rollout.rollout_func"
        if fn is None:
            fn = load_rollout_func(spec, key)
        elif not callable(fn):
            raise TypeError(f"rollout_func must be a callable fn(prompts, trainer) -> dict, got {type(fn).__name__}")
        if self._distills or self._online_dpo:
            raise ValueError(f"{key}: a custom rollout function trains with RLTrainer's estimators, not with "
                             f"{type(self).__name__} (estimator {self.config.estimator!r})")
        if self.tools:
            # TRL would run its tool loop on the function's completions, generating on with the
            # trainer's own sampler; an agent loop runs its tools itself and marks them in env_mask
            raise ValueError(f"{key}: not with tools (rollout.tools, tools=[...] or an environment's methods); "
                             "run the tools inside the rollout function and mark their tokens 0 in env_mask")
        return fn

    def _eval_due(self) -> bool:
        """Whether the step just finished (``global_step``) evaluates: every ``eval_every``
        steps and after the last one."""
        e = self.config.eval_every
        return bool(e and self.eval_prompts) and (self.global_step % e == 0 or self.global_step == self.config.steps)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Evaluate the current policy on the evaluation prompts: each answered
        ``eval.group_size`` times by the rollout engine (the rollout's length, stop strings,
        filters and penalties, ``eval.temperature``; answer k of prompt i seeded from (seed,
        step, i·group_size + k), so no rank count changes it), scored by the run's reward
        sources. Returns floats ``eval/reward/total``, ``eval/reward/<source>``,
        ``eval/response_length`` and, for group_size > 1, ``eval/reward_std`` and verl's
        ``eval/mean@G``, ``eval/best@k``, ``eval/worst@k`` (k = 2, 4, … < G and G; exact
        expectations over k-subsets) and, when every evaluation prompt has an ``answer`` field,
        ``eval/maj@k`` (:func:`rlhf_fast.trainers.evaluate.validation_metrics`) (see
        :class:`~rlhf_fast.trainers.rl_config.RLConfig`) — with tools also
        ``eval/tools/call_frequency`` and ``eval/tools/failure_frequency`` (answers call them as
        in training) —, over every rank's share of the prompts.
        Training is untouched: no gradient, no data position, and the torch / random / numpy
        random states are restored afterwards (a reward function may draw from them)."""
        from rlhf_fast.rollout import SamplingParams
        from rlhf_fast.trainers.sft import local_span

        cfg, ro, G = self.config, self.config.rollout, self.config.eval.group_size
        if not self.eval_prompts:
            raise ValueError("no evaluation prompts: set data.eval_prompts, data.eval_prompts_file or "
                             "data.eval_fraction (or pass eval_prompts=[...])")
        n, W = len(self.eval_prompts), self.ctx.world_size
        lo, hi = local_span(n, self.ctx) if self.ctx.distributed else (0, n)
        # prompts per generate call: a rank's rows of a training rollout (its memory), and the
        # same number of calls on every rank (FSDP2 gathers the weights in each)
        per_call = max(1, cfg.batch_size // (W * G))
        calls = max(1, -(-(-(-n // W)) // per_call))
        sums: Dict[str, List[float]] = {}
        with random_states_kept(self.device):
            for c in range(calls):
                idx = list(range(lo + c * per_call, min(hi, lo + (c + 1) * per_call)))
                real = bool(idx)
                if not real:  # this rank's share ran out: a call on prompt 0 whose results count nothing
                    kept = {k: list(v) for k, v in self._reward_log.metrics.items()}  # (the real calls' logs)
                    idx = [0]
                seeds = [_sample_seed(cfg.seed, self.global_step, _EVAL_INDEX + i * G + k) for i in idx for k in range(G)]
                params = SamplingParams(temperature=self.config.eval.temperature, max_new_tokens=ro.max_new_tokens,
                                        n=G, **ro.sampling_kwargs(), sample_seeds=seeds)
                batch, extra, (calls, failures, rows) = self._run_engine(idx, params, "eval")
                res = self._eval_batch_sums(batch, idx, extra, G)
                if not real:  # what the reward functions logged in the stand-in call counts nothing either
                    self._reward_log.metrics = kept
                if self.tools:
                    res.update({"tools/call_frequency": (float(calls), float(rows)),
                                "tools/failure_frequency": (float(failures), float(calls))})
                for k, (v, cnt) in res.items():
                    acc = sums.setdefault(k, [0.0, 0.0])
                    if real:
                        acc[0] += v
                        acc[1] += cnt
        keys = sorted(sums)
        vec = torch.tensor([x for k in keys for x in sums[k]], dtype=torch.float64)
        if self.ctx.distributed:
            vec = self.ctx.all_reduce_sum(vec.to(self.device)).cpu()
        vec = vec.view(-1, 2)
        # (no tool call at all: no failure either, 0 as in training)
        empty = {"tools/failure_frequency": 0.0}
        res = {f"eval/{k}": (float(v[0] / v[1]) if v[1] > 0 else empty.get(k, float("nan")))
               for k, v in zip(keys, vec)}
        res.update({f"eval/{k}": v for k, v in self._reward_fn_metrics().items()})
        return res

    def _eval_batch_sums(self, batch, idx: List[int], extra, group_size: int) -> Dict[str, tuple]:
        """``{name: (sum, count)}`` of one evaluation batch answering the evaluation prompts
        ``idx`` (:func:`_eval_sums` of its rewards); :meth:`evaluate` sums them over calls and
        ranks into the means ``eval/NAME``."""
        return self._scored_eval_sums(batch, idx, extra, group_size, self._batch_masks(batch)[2])[1]

    def _scored_eval_sums(self, batch, idx: List[int], extra, group_size: int, rm: torch.Tensor):
        """``(RewardOutput, sums)`` of one evaluation batch: its rewards and their
        :func:`_eval_sums` (``rm`` ``[B, L]`` bool its response mask), with the answers' texts for
        maj@k when every evaluation prompt has an answer field (all of them, not only this
        batch's: the same names on every rank)."""
        from rlhf_fast.trainers.evaluate import has_answer_fields

        out = self._score(batch, [self.eval_fields[i] for i in idx], extra)
        texts = list(batch.response_texts) if has_answer_fields(self.eval_fields) else None
        return out, _eval_sums(out, rm, group_size, texts)

    def _next_prompts(self) -> List[int]:
        """The indices of the next ``prompts_per_step`` prompts; a fresh seeded permutation
        each pass."""
        n, k = len(self.prompts), self.config.rollout.prompts_per_step
        out = []
        for pos in range(self.prompt_pos, self.prompt_pos + k):
            epoch, i = divmod(pos, n)
            if self.config.data.shuffle:
                g = torch.Generator().manual_seed((self.config.seed * 1_000_003 + epoch) % 2**63)
                i = int(torch.randperm(n, generator=g)[i])
            out.append(i)
        self.prompt_pos += k
        return out

    # ------------------------------------------------------------------ one step

    def rollout(self) -> tuple:
        """Generate, score and estimate advantages. Returns ``(RolloutTensors, metrics)``."""
        from rlhf_fast.distributed import reshard
        from rlhf_fast.models.logprobs import sequence_logprobs
        from rlhf_fast.rollout import logprob_gap

        cfg, ro = self.config, self.config.rollout
        m: Dict[str, float] = {}
        t0 = self.phase_clock.now()
        self._tool_counts = [0, 0, 0]
        batch, fields, extra = self._generate(0)
        t_gen = self.phase_clock.now() - t0
        out = self._score(batch, fields, extra)
        if ro.dynamic_sampling:
            batch, out, t_more, m["rollout/sampling_rounds"] = self._fill_informative_groups(batch, out)
            t_gen += t_more
        m.update(self._reward_fn_metrics())
        if self.tools:
            m.update(self._tool_metrics())
        if cfg.estimator in GROUP_ESTIMATORS:
            # groups whose answers all scored alike (or lost one to a bad reward) teach nothing:
            # TRL's frac_reward_zero_std
            m["rollout/uniform_group_frac"] = _uniform_group_frac(self._penalised(out, batch), ro.group_size)
        t1 = self.phase_clock.now()
        ids, am, rm = self._batch_masks(batch)
        dev = self.device
        beh = batch.behaviour_logp.to(dev).float() * rm
        recompute = cfg.ppo.old_logp == "recompute"
        # each prompt's answers are consecutive rows: groups of G (one shared prefix each)
        prompt_of = torch.arange(ids.shape[0], device=dev) // ro.group_size  # [B]
        share = self._share_kwargs(prompt_of, ids.shape[0])
        with torch.no_grad(), self._autocast():
            if recompute:
                old_logp, entropy = sequence_logprobs(self.policy, ids, am, response_mask=rm,
                                                      temperature=ro.temperature, return_entropy=True, **share)
            else:  # the sampler's log-probs stand in: one policy forward fewer per step
                old_logp, entropy = beh.clone(), None
                if cfg.ppo.top_entropy_quantile < 1.0:  # the high-entropy mask needs the entropies back
                    _, entropy = sequence_logprobs(self.policy, ids, am, response_mask=rm,
                                                   temperature=ro.temperature, return_entropy=True, **share)
            ref_logp = None  # no reference (no KL term): no forward, no KL metrics
            if self.reference is not None:
                with self._reference_on_device():
                    ref_logp = sequence_logprobs(self.reference, ids, am, response_mask=rm,
                                                 temperature=ro.temperature, **share)
            if self.reference_sharded:  # free the root's gathered copy (kept after forward for the head)
                reshard(self.reference)
            values = (self._critic_values(ids, am, rm, prompt_of) * rm if self.critic is not None
                      else torch.zeros_like(old_logp))
        t2 = self.phase_clock.now()
        for name, v in out.per_source.items():
            fin = torch.isfinite(v)
            m[f"reward/{name}"] = float(v[fin].mean()) if fin.any() else float("nan")
        # answers no source scored (TRL's convention) stay, as TRL's: out of the group statistics,
        # advantage 0, still in the loss's token count and KL; GAE / REINFORCE++ drop them
        unscored = out.unscored_rows() if cfg.estimator in GROUP_ESTIMATORS else torch.zeros_like(out.valid)
        keep = out.valid | unscored
        bad = ~keep
        G = ro.group_size
        if cfg.estimator in PROMPT_GROUP_ESTIMATORS and not keep.all():
            # a group with a dropped answer cannot give group-relative advantages: drop it whole
            keep = keep.view(-1, G).all(dim=1).repeat_interleave(G)
        # (dropped, kept) of every rank: the step's totals, and every rank raises together
        counts = self.ctx.all_gather_ints([int(bad.sum()), int(keep.sum())])
        n_dropped = sum(c[0] for c in counts)
        self.dropped_total += n_dropped
        m["reward/dropped"] = n_dropped
        m["reward/dropped_total"] = self.dropped_total
        if not any(c[1] for c in counts):
            raise RewardError(f"every sample of step {self.global_step} was dropped for a bad reward "
                              f"(per source: {out.dropped}); check the reward sources")
        if not all(c[1] for c in counts):
            raise RewardError(f"rank {[c[1] for c in counts].index(0)} dropped every one of its samples of "
                              f"step {self.global_step} for a bad reward (per source on this rank: "
                              f"{out.dropped}); check the reward sources")
        idx = keep.nonzero(as_tuple=True)[0].to(dev)
        truncated = self._truncated_rows(batch).to(dev)[idx]  # [b] bool: cut at max_new_tokens
        pen = cfg.reward.missing_eos_penalty  # TRL 0.x PPO: on the answers without an eos, before the rest
        raw = missing_eos_scores(out.total[keep.cpu()].to(dev), truncated, pen)
        unscored_kept = unscored[keep.cpu()].to(dev)
        if unscored_kept.any():  # TRL: rewards[unscorable_mask] = torch.nan
            raw = raw.masked_fill(unscored_kept, float("nan"))
        # reward.process_aggregation steps: the last token carries the other sources' part of the
        # total (the PRM's step rewards go on their own tokens: _step_rewards)
        scores = self._shaped_scores(raw if out.steps is None
                                     else missing_eos_scores(out.scalar[keep.cpu()].to(dev), truncated, pen))
        scores = clip_rewards(scores, cfg.reward.clip_range)  # TRL RLOO's: before the KL and the baseline
        ids, am, rm, prompt_of = ids[idx], am[idx], rm[idx], prompt_of[idx]
        # rollout.mask_truncated: truncated answers are scored and in their groups' statistics,
        # but no part of any loss: their tokens leave the loss mask (the sample count of the
        # adaptive KL still has them). The metrics of the loss's quantities (kl/token, entropy,
        # logprob_gap, is_weight, advantages) are over these tokens, as TRL's kl / entropy / sampling ratios
        # over its masked completion_mask; response_length over every answer (TRL's
        # completions/mean_length), kl/seq too (the adaptive controller's measure, per sample)
        loss_rm = rm & ~truncated[:, None] if ro.mask_truncated else rm
        old_logp, beh, values = (t[idx] for t in (old_logp, beh, values))
        ref_logp = ref_logp[idx] if ref_logp is not None else None
        entropy = entropy[idx] if entropy is not None else None
        kl_tok = (ops.kl_penalty(old_logp, ref_logp, "k1") * rm if ref_logp is not None
                  else torch.zeros_like(old_logp))  # [B, L]
        # the reward's term: kl.reward_kind (verl's kl_penalty, OpenRLHF's kl_estimator; k1 by
        # default, Ziegler et al.); the kl/* metrics and the adaptive controller stay on k1
        kl_reward = kl_tok
        if cfg.kl.reward_kind != "k1" and ref_logp is not None:
            kl_reward = ops.kl_penalty(old_logp, ref_logp, cfg.kl.reward_kind) * rm
        if ro.mask_truncated and cfg.estimator in GROUP_ESTIMATORS:
            # TRL's RLOO sums the KL over a completion mask that mask_truncated_completions has
            # zeroed: a truncated answer enters its group's baseline with its raw score, no KL
            kl_reward = kl_reward * ~truncated[:, None]
        beta = self.kl_ctl.value
        # whitening (ppo.whiten_advantages, and REINFORCE++'s own) takes its statistics over every
        # rank's tokens, as one process would see them; under rollout.mask_truncated over the loss
        # tokens only, as verl-tool's mask_overlong_loss / SkyRL's overlong filtering (the mask they
        # zero is the one their whitening reads; TRL RLOO's per-answer normalize_advantages, our
        # 'sequence', keeps every answer, as here)
        group = (self.ctx.group or torch.distributed.group.WORLD) if self.ctx.distributed else None
        multi = {}
        if cfg.reward.multi_objective_aggregation == "normalize_then_sum":
            # GDPO: every source's own (unweighted) scores, normalised per group before the sum; a
            # None (NaN, TRL's convention) is out of its source's statistics, as TRL's nanmean
            names = self.reward.names
            multi = dict(multi_objective_aggregation="normalize_then_sum",
                         rewards_per_func=torch.stack([out.per_source[n] for n in names], 1)[keep.cpu()].to(dev),
                         reward_weights=torch.tensor([w for _, w in self.reward.sources], dtype=torch.float32))
        adv, ret = compute_advantages(
            cfg.estimator, scores, rm, values=values if self.critic is not None else None, kl=kl_reward,
            kl_coef=beta if cfg.kl.placement == "reward" else 0.0, group_size=G, gamma=cfg.ppo.gamma,
            lam=cfg.ppo.lam, whiten=cfg.ppo.whiten_advantages, group=group, scale_rewards=cfg.scale_rewards,
            dense_rewards=self._step_rewards(batch, out, idx, ids, rm),
            whiten_mask=loss_rm if ro.mask_truncated else None, **multi)
        if recompute:  # (zero by construction otherwise)
            gap = logprob_gap(beh, old_logp, loss_rm)
            m["logprob_gap/mean"] = float(gap["mean"])
            m["logprob_gap/max"] = float(gap["max"])
            m["entropy"] = float(ops.masked_mean(entropy, loss_rm))
        w = is_masked = is_weight = None
        if cfg.ppo.is_cap is not None:
            # importance sampling: the rollout came from the behaviour distribution
            w, is_masked = self._is_weights(old_logp, beh, rm)
            # the metrics over the loss tokens (TRL's over its masked completion_mask)
            w_sum, w_n = _is_weight_mean_parts(w, loss_rm, cfg.ppo.is_mode.startswith("sequence"))
            m["is_weight/mean"] = float(w_sum / w_n.clamp(min=1))
            # over the response tokens after the bound, masked zeros included (TRL's min / max;
            # 0 with no loss token, as TRL's)
            lo, hi = _masked_min_max(w, loss_rm)
            m["is_weight/min"], m["is_weight/max"] = (lo, hi) if lo <= hi else (0.0, 0.0)
            if is_masked is not None:
                m["is_weight/masked_frac"] = float(ops.masked_mean(is_masked.float(), loss_rm))
            if cfg.ppo.policy_loss == "vespo":  # its sequence weight takes them (TRL): not in the advantages
                is_weight = w
            else:
                adv = adv * w
        seq_kl = (kl_tok.sum(1)).mean()
        m["rollout/truncated_frac"] = float(truncated.sum()) / max(1, truncated.numel())
        m.update({
            "reward/total": float(raw.mean()), "reward/shaped": float(scores.mean()),
            "reward/std": float(raw.std()) if raw.numel() > 1 else 0.0,
            "kl/seq": float(seq_kl), "kl/token": float(ops.masked_mean(kl_tok, loss_rm)), "kl/coef": beta,
            "response_length/mean": float(rm.sum(1).float().mean()),
            "response_length/max": float(rm.sum(1).max()),
            "advantages/mean": float(ops.masked_mean(adv, loss_rm)),  # the loss's advantages
            "returns/mean": float(ops.masked_mean(ret, rm)),
            "tokens_per_second": float(getattr(batch, "tokens_per_second", 0.0) or 0.0),
            "time/generate": t_gen, "time/logprobs": t2 - t1,
        })
        if unscored_kept.any():
            # TRL's reward / reward_std: torch.nanmean and nanstd (NaN under two scored answers)
            scored_rm = rm & ~unscored_kept[:, None]
            m.update({"reward/total": float(torch.nanmean(raw)), "reward/shaped": float(torch.nanmean(scores)),
                      "reward/std": float(nanstd(raw)), "returns/mean": float(ops.masked_mean(ret, scored_rm))})
        if self.critic is not None:
            var_r = float(torch.var(ret[rm])) if rm.sum() > 1 else 0.0
            var_e = float(torch.var((ret - values)[rm])) if rm.sum() > 1 else 0.0
            m["value/explained_variance"] = _explained_variance(var_e, var_r,
                                                                float(ops.masked_mean(ret * ret + values * values, rm)))
            m["value/mean"] = float(ops.masked_mean(values, rm))
        if self.ctx.distributed:  # the same numbers from every rank's rows together
            m.update(self._global_rollout_metrics(out.per_source, raw, scores, kl_tok, rm, entropy, adv, ret,
                                                  values, (beh - old_logp).abs() * rm if recompute else None,
                                                  w, truncated, is_masked,
                                                  is_per_answer=cfg.ppo.is_mode.startswith("sequence"),
                                                  loss_rm=loss_rm))
        if ref_logp is None:
            for k in ("kl/seq", "kl/token"):
                m.pop(k, None)
        self._sampled_rows = int(rm.any(dim=1).sum())
        ent_mask = loss_rm.clone()  # every loss token, unless ppo.top_entropy_quantile keeps fewer
        if cfg.ppo.top_entropy_quantile < 1.0:
            ent_mask, m["rollout/entropy_threshold"] = self._high_entropy_mask(entropy, loss_rm)
        data = RolloutTensors(ids, am, loss_rm, old_logp, ref_logp, beh, values, adv, ret, scores, ent_mask, is_weight,
                              prompt_of)
        self._last_texts = [(batch.prompt_texts[i], batch.response_texts[i],
                             None if unscored[i] else float(out.total[i])) for i in idx.tolist()]
        self._last_columns = [{k: v[i] for k, v in out.columns.items()} for i in idx.tolist()]
        return data, m

    def _step_rewards(self, batch, out, idx: torch.Tensor, ids: torch.Tensor, rm: torch.Tensor):
        """``[b, L]`` float32 of the kept rows ``idx`` (``ids`` / ``rm`` already those rows): each
        step reward of ``out.steps`` on the response token where its step ends
        (:func:`rlhf_fast.algorithms.process_rewards.step_token_rewards`); None without a dense
        reward source."""
        if out.steps is None:
            return None
        from rlhf_fast.algorithms.process_rewards import step_token_rewards

        if self.tools or self.tokenizer is None:
            raise ValueError("reward.process_aggregation 'steps' needs the policy's tokenizer and answers without "
                             "tool results (it maps each step's end in the text to the policy's token)")
        rows = idx.tolist()
        P, keep = batch.prompt_length, idx.cpu()
        if (batch.attention_mask[keep, P:].bool() & ~batch.response_mask[keep, P:].bool()).any():
            # a rollout function's env_mask holes: the texts hold the environment's tokens, the policy's
            # tokens do not, so every step after an environment turn would land on the answer's last token
            raise ValueError("reward.process_aggregation 'steps' needs answers of the policy's tokens alone; the "
                             "rollout function returned env_mask zeros (environment tokens in the answers): use a "
                             "scalar aggregation (min, last, mean, prod)")
        return step_token_rewards(self.tokenizer, ids, rm, [batch.response_texts[i] for i in rows],
                                  [out.steps[i] for i in rows])

    def _shaped_scores(self, raw: torch.Tensor) -> torch.Tensor:
        """``reward.whiten`` / ``reward.clip`` of this rank's raw scores ``[b]`` float32 (NaN =
        unscored, stays NaN) → ``[b]`` float32. Whitening takes its statistics, and updates the
        running moments, over every rank's scores, as one process has them: the shaped scores do
        not depend on the rank count, and every rank's moments stay equal (rank 0's are saved).
        Collective under ``reward.whiten`` on several ranks: every rank calls it."""
        rc = self.config.reward

        def shape(r):
            moments = self.reward_moments if rc.whiten else None
            return shape_scores(r, clip=rc.clip, whiten=rc.whiten, moments=moments)

        if not (rc.whiten and self.ctx.distributed):
            return _nan_shape(raw, shape)
        parts = self.ctx.all_gather_objects(raw.detach().cpu())  # rank order: the one-process row order
        start = sum(p.numel() for p in parts[:self.ctx.rank])
        return _nan_shape(torch.cat(parts), shape)[start:start + raw.numel()].to(raw.device)

    def _is_weights(self, old_logp: torch.Tensor, beh: torch.Tensor, rm: torch.Tensor):
        """``ppo.is_cap`` / ``ppo.is_mode``: the importance weights ``[B, L]`` float32 (0 outside
        ``rm``) of the recomputed old policy over the sampler, r = exp(old_logp − beh) per token,
        or per answer exp(Σ_t (old_logp − beh)) on every token of it, then truncated (clamped to
        [is_cap_min, is_cap]) or masked (0 where r > is_cap or r < is_cap_min), as TRL's
        ``vllm_importance_sampling_mode`` with its clip_max / clip_min; and
        the mask modes' ``[B, L]`` bool of the zeroed tokens (None for the truncate modes)."""
        p = self.config.ppo
        cap, lo = p.is_cap, p.is_cap_min
        if p.is_mode == "token_truncate" and lo is None:  # (the original expression, bit for bit)
            return torch.exp(torch.clamp(old_logp - beh, -20, 20)).clamp(max=cap) * rm, None
        if p.is_mode.startswith("token"):
            r = torch.exp(torch.clamp(old_logp - beh, -20, 20))
        else:  # no clamp: an overflow to inf is truncated to the cap or masked, as TRL's
            r = torch.exp(((old_logp - beh) * rm).sum(dim=1, keepdim=True)).expand_as(old_logp)
        if p.is_mode.endswith("truncate"):
            return r.clamp(min=lo, max=cap) * rm, None
        out = rm & (r > cap)
        if lo is not None:
            out = out | (rm & (r < lo))
        return torch.where(out, torch.zeros_like(r), r) * rm, out

    def _environment_prompts(self, which: List[int], params, split: str) -> tuple:
        """Fresh environments for the ``params.n`` answers to each prompt ``which`` of ``split``
        ("train" / "eval"), reset with the prompts' records: ``(prompts, params, instances,
        per_row, observations)`` (one per answer, prompt-major; None where ``reset`` returned
        none). What ``reset`` returns is appended to the prompt; when it makes the answers
        of a prompt read different prompts, each answer is its own prompt (``per_row``: n = 1,
        the rows and their seeds in the same order)."""
        from rlhf_fast.rollout import environments as E

        recs = [self._records[split][i] for i in which]
        names = [self._env_names[split][i] for i in which]
        n = params.n
        envs, obs = E.start(self._env_factories, recs, names, n)
        if all(o is None for o in obs):
            src = self.prompts if split == "train" else self.eval_prompts
            return [src[i] for i in which], params, envs, False, obs
        texts = [self._render(E.with_observation(recs[r // n][0], o), names[r // n]) for r, o in enumerate(obs)]
        if all(len(set(texts[j * n:(j + 1) * n])) == 1 for j in range(len(which))):
            return texts[::n], params, envs, False, obs
        return texts, replace(params, n=1), envs, True, obs

    def _run_engine(self, which: List[int], params, split: str = "train") -> tuple:
        """``(RolloutBatch, per-row reward fields or None, [calls, failures, answers])`` of the
        prompts ``which`` of ``split`` ("train" / "eval"), each answered ``params.n`` times: the
        engine's answers, with tool calls run (:func:`rlhf_fast.rollout.tools.tool_rollout`)
        when the run has tools — the fields then hold ``completion_messages``, each answer's
        turns as chat messages, and with environments ``environments``, each answer's
        instance — and this rank's tool counts (zeros without tools)."""
        prompts = [(self.prompts if split == "train" else self.eval_prompts)[i] for i in which]
        extra, row_tools, per_row, n, obs = {}, None, False, params.n, None
        if self._env_factories:
            from rlhf_fast.rollout.environments import environment_tools

            prompts, params, envs, per_row, obs = self._environment_prompts(which, params, split)
            extra["environments"] = envs
            row_tools = [self._standalone_tools + environment_tools(e) for e in envs]
        if self.rollout_func is not None:
            batch, fields = self._custom_rollout(which, n, split, prompts if per_row else
                                                 [p for p in prompts for _ in range(n)], obs)
            extra.update(fields)
            counts = [0, 0, 0]
        elif not self.tools:
            batch, counts = self.engine.generate(prompts, params), [0, 0, 0]
        else:
            from rlhf_fast.rollout.tools import tool_rollout

            sync = None
            if self.ctx.distributed:  # every rank makes the same generate calls (FSDP2 gathers weights in each)
                sync = lambda flag: any(c[0] for c in self.ctx.all_gather_ints([int(flag)]))  # noqa: E731
            batch, st = tool_rollout(self.engine, prompts, params, tools=self.tools, tokenizer=self.tokenizer,
                                     max_iterations=self.config.rollout.max_tool_calling_iterations,
                                     max_length=self._max_positions, row_tools=row_tools, sync_any=sync,
                                     chat_template_kwargs=self.config.data.chat_template_kwargs,
                                     tool_timeout=self.config.rollout.tool_timeout)
            extra["completion_messages"] = st.messages
            counts = [st.calls, st.failures, st.rows]
        if per_row:  # the answers of one prompt are one group again
            g = torch.arange(len(which), device=batch.group_index.device).repeat_interleave(n)
            batch = replace(batch, group_index=g)
        # each row's prompt as the data gives it, with what its environment's reset() appended: TRL's
        # `prompts`, and what a reward model renders with its own tokenizer's template
        recs = self._records[split]
        rows = [recs[which[g]][0] for g in batch.group_index.tolist()]
        if obs is not None:
            from rlhf_fast.rollout.environments import with_observation

            rows = [p if o is None else with_observation(p, o) for p, o in zip(rows, obs)]
        extra["_prompts"] = rows
        return batch, extra or None, counts

    def _custom_rollout(self, which: List[int], n: int, split: str, texts: List[str], obs=None) -> tuple:
        """The rollout function's answers to the prompts ``which`` of ``split``, each ``n`` times:
        ``(RolloutBatch, its extra per-row fields)``. It gets the prompts as the data gives them
        (a copy, TRL's), with the environments' ``reset`` observations (``obs``, per row);
        ``texts``: the rows' prompts as the policy reads them (the batch's prompt_texts)."""
        import copy

        from rlhf_fast.models.logprobs import unwrap
        from rlhf_fast.rollout.custom_rollout import run_rollout_func

        recs = self._records[split]
        rows = [copy.deepcopy(recs[i][0]) for i in which for _ in range(n)]
        if obs is not None:
            from rlhf_fast.rollout.environments import with_observation

            rows = [p if o is None else with_observation(p, o) for p, o in zip(rows, obs)]
        model = unwrap(self.policy)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
        tok = self.tokenizer
        pad = getattr(self.engine, "pad_id", None)
        if pad is None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # TRL's eos_token_ids (the tokenizer's and the generation config's) and its pad id
        stops = {t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if t is not None}
        gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen = gen.flatten().tolist() if isinstance(gen, torch.Tensor) else gen
        stops.update([gen] if isinstance(gen, int) else list(gen or []))

        def score(batch):  # logprobs None: the policy's by a scoring forward (TRL's old log-probs then)
            from rlhf_fast.models.logprobs import sequence_logprobs

            ids, am, rm = self._batch_masks(batch)
            share = self._share_kwargs(batch.group_index.to(self.device), ids.shape[0])
            with torch.no_grad(), self._autocast():
                return sequence_logprobs(self.policy, ids, am, response_mask=rm,
                                         temperature=self.config.rollout.temperature, **share)

        return run_rollout_func(self.rollout_func, rows, self, texts, n, tokenizer=self.tokenizer, pad_id=pad,
                                stop_ids=sorted(stops), vocab_size=vocab, score=score,
                                max_new_tokens=self.config.rollout.max_new_tokens, max_length=self._max_positions)

    def _generate(self, rnd: int, which: Optional[List[int]] = None, pick: Optional[Sequence[int]] = None):
        """This rank's share of the next ``prompts_per_step`` prompts, answered ``group_size``
        times: (the RolloutBatch of sampling round ``rnd`` — 0, then 1, 2, … with
        ``rollout.dynamic_sampling``, each round its own seeds —, the prompts' fields, and the
        per-row reward fields of :meth:`_run_engine`). ``which``: the step's prompts already
        taken (None: the next ones); ``pick``: the positions in this rank's share of those to
        answer (None: all; GKD's per-micro-batch mixing, rlhf_fast.trainers.distill), each
        answer with the seed its row has in the whole step."""
        from rlhf_fast.rollout import SamplingParams

        cfg, ro = self.config, self.config.rollout
        which = self._next_prompts() if which is None else which
        lo = 0
        if self.ctx.distributed:  # this rank's contiguous share of the step's prompts (whole groups)
            from rlhf_fast.trainers.sft import local_span

            lo, hi = local_span(len(which), self.ctx)
            which = which[lo:hi]
        pos = list(range(len(which))) if pick is None else list(pick)
        which = [which[j] for j in pos]
        seeds = {"seed": (cfg.seed * 1_000_003 + self.global_step + 7919 * self.ctx.rank + 104_729 * rnd) % (2**31)}
        if self.per_sample_seeds:  # by the row's index in the step's global batch: any number of ranks
            G, first = ro.group_size, lo * ro.group_size + rnd * cfg.batch_size
            seeds = {"sample_seeds": [_sample_seed(cfg.seed, self.global_step, first + j * G + r)
                                      for j in pos for r in range(G)]}
        params = SamplingParams(temperature=ro.temperature, max_new_tokens=ro.max_new_tokens, n=ro.group_size,
                                **ro.sampling_kwargs(), **seeds)
        with torch.no_grad():
            batch, extra, counts = self._run_engine(which, params)
        self._tool_counts = [a + b for a, b in zip(self._tool_counts, counts)]
        return batch, [self.prompt_fields[i] for i in which], extra

    def _batch_masks(self, batch):
        """(input_ids, attention_mask, response_mask) of ``batch`` on the training device, the
        masks bool; the response mask never set at column 0 (it has no log-prob)."""
        dev = self.device
        ids = batch.input_ids.to(dev)
        am = batch.attention_mask.to(dev).bool()
        rm = batch.response_mask.to(dev).bool() & am
        rm[:, 0] = False
        return ids, am, rm

    def _score(self, batch, fields: List[dict], extra: Optional[dict] = None):
        """The reward sources on ``batch`` (``fields``: those of each prompt it answers;
        ``extra``: per-row fields, name → B values, which win over a prompt field of that name):
        a RewardOutput. With tools (or a rollout_func's env_mask) the response lengths count the
        tool results' tokens too (the completion budget's measure, as TRL's ``completion_ids``). With
        ``reward.calling_convention: trl`` also TRL's inputs (:meth:`_trl_inputs`)."""
        ids, am, rm = self._batch_masks(batch)
        per_row = fields_per_row(fields, batch.group_index.tolist())
        lengths = rm.sum(1)
        trl = raw = None
        if extra and "_prompts" in extra:
            extra = dict(extra)
            raw = extra.pop("_prompts")
            if self.config.reward.calling_convention == "trl":
                trl = self._trl_inputs(batch, ids, am, raw, extra.get("completion_messages"))
        if extra:
            per_row = {**(per_row or {}), **extra}
        if self.tools or self.rollout_func is not None:  # (a rollout_func's env_mask holes count too)
            lengths = am[:, batch.prompt_length:].sum(1)
        return self.reward(list(batch.prompt_texts), list(batch.response_texts),
                           RewardContext(input_ids=ids, attention_mask=am, response_lengths=lengths.tolist(),
                                         fields=per_row, trl=trl, prompts=raw,
                                         chat_template_kwargs=self.config.data.chat_template_kwargs))

    def _trl_inputs(self, batch, ids: torch.Tensor, am: torch.Tensor, prompts: list, messages=None):
        """TRL's reward-function inputs of ``batch`` (ids / am ``[B, L]``, the left-padded
        prompt then the answer): ``prompts`` one per row as the data gives them, the
        completions in TRL's form (``messages``: each answer's turns with tools), the tokens
        after the prompt (tool results included: TRL's ``completion_ids``), a
        ``transformers.TrainerState`` of the run so far, and the run's :class:`RewardLog`."""
        from transformers import TrainerState

        cfg, P = self.config, batch.prompt_length
        tail, keep = ids[:, P:].cpu(), am[:, P:].cpu()
        per_epoch = len(self.prompts) / cfg.rollout.prompts_per_step  # steps per pass over the prompts
        state = TrainerState(
            epoch=self.global_step / per_epoch, global_step=self.global_step, max_steps=cfg.steps,
            num_train_epochs=math.ceil(cfg.steps / per_epoch), train_batch_size=cfg.batch_size,
            logging_steps=cfg.log_every,
            is_world_process_zero=self.ctx.is_main, is_local_process_zero=self.ctx.local_rank == 0)
        return TRLRewardInputs(prompts=list(prompts),
                               completions=trl_completions(prompts, list(batch.response_texts), messages),
                               completion_ids=[t[k].tolist() for t, k in zip(tail, keep)],
                               trainer_state=state, log=self._reward_log)

    def _reward_fn_metrics(self) -> Dict[str, float]:
        """``reward_fn/NAME``: the mean of the values TRL-convention reward functions gave
        ``log_metric(NAME, value)`` since the last call, over every rank's calls (TRL's sum /
        count); the same on every rank. Empty with ``reward.calling_convention: ours``."""
        if self.config.reward.calling_convention != "trl":
            return {}
        local = self._reward_log.pop_metrics()
        # ranks may log different names: merge them, as TRL's gather_object of the names
        parts = self.ctx.all_gather_objects(local) if self.ctx.distributed else [local]
        sums: Dict[str, tuple] = {}
        for part in parts:
            for k, (v, n) in part.items():
                a, b = sums.get(k, (0.0, 0.0))
                sums[k] = (a + v, b + n)
        return {f"reward_fn/{k}": v / n for k, (v, n) in sorted(sums.items()) if n > 0}

    def _fill_informative_groups(self, batch, out):
        """DAPO's dynamic sampling: groups whose answers all got the same reward (zero
        group-relative advantage: no policy gradient) are replaced by groups of further prompts,
        sampled in up to ``rollout.max_sampling_rounds`` rounds in all, until the step has
        ``prompts_per_step`` groups with differing rewards over all ranks. The step keeps
        ``prompts_per_step`` groups: the first informative ones in the order sampled, then — if
        the rounds ran out — uniform ones; each rank takes its contiguous share of them in
        sampled order, wherever they were generated. So the choice is the one process's, whatever
        the number of ranks (the rows equal too with ``rollout.per_sample_seeds``).
        Returns (batch, reward output, seconds spent generating, rounds)."""
        from rlhf_fast.algorithms import RewardOutput
        from rlhf_fast.rollout import RolloutBatch
        from rlhf_fast.trainers.sft import local_span

        ctx, ro = self.ctx, self.config.rollout
        G, P = ro.group_size, ro.prompts_per_step
        width = -(-P // ctx.world_size)  # the longest share of a round's groups (shares may differ by one)

        def flags(o, b):  # every rank's informative flags for its groups of one round, in rank order
            # judged on the rewards the estimator sees: reward.missing_eos_penalty included (verl's
            # filter_groups and TRL's frac_reward_zero_std look at the final scores)
            mine = [int(x) for x in _informative_groups(self._penalised(o, b), G).tolist()]
            return [[f for f in r if f >= 0] for r in ctx.all_gather_ints(mine + [-1] * (width - len(mine)))]

        batches, outs, rounds = [batch], [out], [flags(out, batch)]
        t_gen = 0.0
        while (len(batches) < ro.max_sampling_rounds
               and sum(f for rnd in rounds for r in rnd for f in r) < P):
            t = self.phase_clock.now()
            more, fields, extra = self._generate(len(batches))
            t_gen += self.phase_clock.now() - t
            batches.append(more)
            outs.append(self._score(more, fields, extra))
            rounds.append(flags(outs[-1], more))
        # every group of the step as (round, rank, index on that rank): the sampled order,
        # the one process's prompt order
        keys = [(k, r, j) for k, rnd in enumerate(rounds) for r, fl in enumerate(rnd) for j in range(len(fl))]
        info = [rounds[k][r][j] == 1 for k, r, j in keys]
        chosen = sorted(([i for i in range(len(keys)) if info[i]] + [i for i in range(len(keys)) if not info[i]])[:P])
        lo, hi = local_span(len(chosen), ctx) if ctx.distributed else (0, len(chosen))
        mine = [keys[i] for i in chosen[lo:hi]]
        pad = getattr(self.engine, "pad_id", None)
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0

        def rows_of(groups):  # the rows of groups given as (round, index) into the rounds' concatenation
            first = [0]
            for b in batches:
                first.append(first[-1] + b.batch_size // G)
            g = torch.tensor([first[k] + j for k, j in groups], dtype=torch.int64)
            return (g[:, None] * G + torch.arange(G)).reshape(-1)

        if not ctx.distributed:
            rows = rows_of([(k, j) for k, _, j in mine])
            return RolloutBatch.concat(batches, pad, rows), RewardOutput.concat(outs, rows), t_gen, len(batches)
        # each rank sends its chosen groups (in sampled order) to every rank, which keeps its share
        sent = [(k, j) for k, r, j in (keys[i] for i in chosen) if r == ctx.rank]
        rows = rows_of(sent)
        o = RewardOutput.concat(outs, rows)
        part = (ctx.rank, sent, RolloutBatch.concat(batches, pad, rows).to("cpu"),
                RewardOutput(total=o.total.cpu(), per_source={n: v.cpu() for n, v in o.per_source.items()},
                             valid=o.valid.cpu(), dropped=o.dropped, columns=o.columns,
                             unscored=None if o.unscored is None else o.unscored.cpu()))
        parts = [p for p in ctx.all_gather_objects(part) if p[1]]
        where, n = {}, 0  # (round, rank, index) → its place among the gathered groups
        for r, groups, _, _ in parts:
            for k, j in groups:
                where[(k, r, j)] = n
                n += 1
        g = torch.tensor([where[key] for key in mine], dtype=torch.int64)
        rows = (g[:, None] * G + torch.arange(G)).reshape(-1)
        return (RolloutBatch.concat([p[2] for p in parts], pad, rows),
                RewardOutput.concat([p[3] for p in parts], rows), t_gen, len(batches))

    def _penalised(self, out, batch):
        """``out`` (a RewardOutput of ``batch``) with ``reward.missing_eos_penalty`` taken off the
        ``total`` ``[B]`` of the answers cut at ``rollout.max_new_tokens``, then clipped
        (``reward.clip_range``, ``reward.clip``), as :meth:`rollout` takes them before the
        advantages: what DAPO's filter and ``rollout/uniform_group_frac`` judge (verl's
        filter_groups judges ``seq_final_reward``, the rewards the estimator sees), so a group
        whose scores differ only beyond the clip is uniform. Under ``reward.whiten`` the clips act
        on whitened scores, whose statistics only the step's batch gives: not applied here (the
        whitening itself, affine, keeps a group's spread). ``out`` itself when none applies."""
        rc = self.config.reward
        total = out.total
        if rc.missing_eos_penalty is not None:
            total = missing_eos_scores(total, self._truncated_rows(batch), rc.missing_eos_penalty)
        if not rc.whiten:  # (NaN, an unscored answer, stays NaN)
            if rc.clip is not None:
                total = total.clamp(-rc.clip, rc.clip)
            total = clip_rewards(total, rc.clip_range)
        return out if total is out.total else replace(out, total=total)

    def _tool_metrics(self) -> Dict[str, float]:
        """``tools/call_count`` (the step's tool calls, every rank and sampling round),
        ``tools/call_frequency`` (per answer generated, TRL's) and ``tools/failure_frequency``
        (failed calls per call, 0 without calls), the same on every rank."""
        counts = self.ctx.all_gather_ints(self._tool_counts)  # one collective: [calls, failures, rows] per rank
        calls, failures, rows = (sum(c[k] for c in counts) for k in range(3))
        return {"tools/call_count": float(calls), "tools/call_frequency": calls / max(rows, 1),
                "tools/failure_frequency": failures / calls if calls else 0.0}

    def _truncated_rows(self, batch) -> torch.Tensor:
        """``[B]`` bool: rows whose answer was cut at ``rollout.max_new_tokens`` (the engine's
        finish reason "length"). An engine that gives no finish reasons counts none, and then
        ``rollout.mask_truncated`` is refused (it could not mask anything)."""
        reasons = list(getattr(batch, "finish_reasons", None) or [])
        B = batch.input_ids.shape[0]
        if len(reasons) != B:
            if self.config.reward.missing_eos_penalty is not None:
                raise ValueError(f"reward.missing_eos_penalty needs the engine's finish_reasons (one per row, "
                                 f"{B}); {type(self.engine).__name__} gave {len(reasons)}")
            if self.config.rollout.mask_truncated:
                raise ValueError(f"rollout.mask_truncated needs the engine's finish_reasons (one per row, "
                                 f"{B}); {type(self.engine).__name__} gave {len(reasons)}")
            return torch.zeros(B, dtype=torch.bool)
        return torch.tensor([r == "length" for r in reasons], dtype=torch.bool)

    def _global_rollout_metrics(self, per_source, raw, scores, kl_tok, rm, entropy, adv, ret, values, gap,
                                is_w, truncated, is_masked=None, is_per_answer=False, loss_rm=None):
        """The rollout metrics of every rank's rows together, as one process computes them
        on the whole batch: sums, counts and second moments in one all-reduce, maxima in a
        second. All ``[b, L]`` tensors are this rank's kept rows; ``gap`` is |behaviour −
        recomputed log-prob| on response tokens, ``is_w`` the importance weights or None,
        ``truncated`` ``[b]`` bool the rows cut at max_new_tokens, ``is_masked`` ``[b, L]`` bool
        the tokens a mask mode of ``ppo.is_mode`` zeroed (or None), ``is_per_answer``: a sequence
        ``ppo.is_mode`` (``is_weight/mean`` over the answers, :func:`_is_weight_mean_parts`);
        ``entropy`` and ``gap`` are None with ``ppo.old_logp='behaviour'`` (no forward);
        ``loss_rm`` ``[b, L]`` bool the loss tokens (``rollout.mask_truncated``: ``rm`` without the
        truncated rows; None: ``rm``), which ``kl/token``, ``entropy``, ``logprob_gap/*``,
        ``is_weight/*`` and ``advantages/mean`` are over (0 with none, as TRL's clamp(min=1))."""
        d = lambda t: t.double().sum()  # noqa: E731
        rows, tok = float(raw.numel()), d(rm)
        lrm = rm if loss_rm is None else loss_rm
        ltok = d(lrm)
        parts = {f"reward/{k}": (d(v[torch.isfinite(v)]), d(torch.isfinite(v)))
                 for k, v in per_source.items()}
        scored = ~torch.isnan(raw)  # [b] (unscored answers: TRL's nanmean / nanstd leave them out)
        r, s, n_r, ret_rm = raw, scores, rows, (d(ret * rm), tok)
        if not bool(scored.all()):
            r, s, n_r = raw[scored], scores[scored], float(scored.sum())
            ret_rm = (d(ret * rm * scored[:, None]), d(rm & scored[:, None]))
        parts.update({
            "reward/total": (d(r), n_r), "reward/shaped": (d(s), n_r), "kl/seq": (d(kl_tok), rows),
            "kl/token": (d(kl_tok * lrm), ltok), "response_length/mean": (tok, rows),
            "advantages/mean": (d(adv * lrm), ltok), "returns/mean": ret_rm,
            "reward/sq": (d(r * r), n_r), "rollout/truncated_frac": (d(truncated), rows),
        })
        if gap is not None:
            parts.update({"entropy": (d(entropy * lrm), ltok), "logprob_gap/mean": (d(gap * lrm), ltok)})
        if is_w is not None:
            parts["is_weight/mean"] = _is_weight_mean_parts(is_w, lrm, is_per_answer)
        if is_masked is not None:
            parts["is_weight/masked_frac"] = (d(is_masked & lrm), ltok)
        if self.critic is not None:
            err = ret - values
            parts.update({"value/mean": (d(values * rm), tok), "value/ret_sq": (d(ret * ret * rm), tok),
                          "value/err": (d(err * rm), tok), "value/err_sq": (d(err * err * rm), tok),
                          "value/v_sq": (d(values * values * rm), tok)})
        vec = torch.tensor([float(x) for pair in parts.values() for x in pair], dtype=torch.float64)
        vec = self.ctx.all_reduce_sum(vec.to(self.device)).cpu().view(-1, 2)
        tot = {k: (float(v[0]), float(v[1])) for k, v in zip(parts, vec)}
        out = {k: (s / n if n > 0 else float("nan")) for k, (s, n) in tot.items() if k not in ("reward/sq",)}
        for k in ("kl/token", "entropy", "logprob_gap/mean", "is_weight/mean", "is_weight/masked_frac",
                  "advantages/mean"):
            # no loss token anywhere: 0, as one process
            if k in tot and tot[k][1] == 0:
                out[k] = 0.0

        def var(s, sq, n):  # unbiased, as torch.var
            return (sq - s * s / n) / (n - 1) if n > 1 else 0.0

        n = tot["reward/total"][1]
        out["reward/std"] = max(var(tot["reward/total"][0], tot["reward/sq"][0], n), 0.0) ** 0.5
        if n < tot["response_length/mean"][1] and n <= 1:  # unscored answers: TRL's nanstd
            out["reward/std"] = float("nan")
        if self.critic is not None:
            n = tot["returns/mean"][1]
            var_r = var(tot["returns/mean"][0], tot["value/ret_sq"][0], n)
            var_e = var(tot["value/err"][0], tot["value/err_sq"][0], n)
            scale = (tot["value/ret_sq"][0] + tot["value/v_sq"][0]) / max(n, 1)
            out["value/explained_variance"] = _explained_variance(var_e, var_r, scale)
            for k in ("value/ret_sq", "value/err", "value/err_sq", "value/v_sq"):
                out.pop(k)
        lo_hi = _masked_min_max(is_w, lrm) if is_w is not None else (0.0, 0.0)
        mx = torch.tensor([float(rm.sum(1).max()), float((gap * lrm).max()) if gap is not None else 0.0,
                           -lo_hi[0], lo_hi[1]], dtype=torch.float64, device=self.device)
        mx = self.ctx.all_reduce_max(mx).cpu()
        out["response_length/max"] = float(mx[0])
        if gap is not None:
            out["logprob_gap/max"] = float(mx[1])
        if is_w is not None:
            lo, hi = -float(mx[2]), float(mx[3])
            out["is_weight/min"], out["is_weight/max"] = (lo, hi) if lo <= hi else (0.0, 0.0)  # (no loss token)
        return out

    @contextlib.contextmanager
    def _reference_on_device(self):
        """With ``distributed.offload_reference`` on an accelerator, move the frozen reference
        to the training device for its log-prob pass and back to the CPU after it, so the
        device holds it only for that pass (one host-device copy of its weights each way per
        step). Otherwise (or on a CPU device) a no-op."""
        move = self.config.distributed.offload_reference and self.device.type != "cpu"
        if move:
            self.reference.to(self.device)
        try:
            yield
        finally:
            if move:
                self.reference.to("cpu")

    def _high_entropy_mask(self, entropy: torch.Tensor, mask: torch.Tensor):
        """``ppo.top_entropy_quantile``'s mask ``[B, L]`` bool and threshold (a float, nan when
        no rank holds a loss token): the (1 − ρ) quantile of the rollout policy's entropies over
        every loss token of the step on every rank, so that neither micro-batching nor the split
        over ranks, mini-batches or epochs moves it."""
        from rlhf_fast.algorithms import policy_losses as pl

        vals = entropy[mask].float()
        if self.ctx.distributed:
            vals = torch.cat([v.to(vals.device) for v in self.ctx.all_gather_objects(vals.cpu())])
        if vals.numel() == 0:
            return torch.zeros_like(mask), float("nan")
        thr = pl.quantile(vals, 1.0 - float(self.config.ppo.top_entropy_quantile))
        return pl.high_entropy_mask(entropy, mask, 0.0, threshold=thr), float(thr)

    def _policy_loss(self, d: "RolloutTensors", norm, kw: dict):
        """(loss, stats) of the policy on the rows ``d`` (``kw``: :meth:`_loss_kwargs`, ``norm``:
        the mini-batch's normaliser). PPO's clip without masks is the fused kernel's
        :func:`rlhf_fast.models.logprobs.policy_loss`; ``ppo.policy_loss`` cispo / sapo, the
        high-entropy and the off-policy masks compose per-token log-probs and entropies of the
        fused head with :func:`rlhf_fast.algorithms.policy_losses.policy_loss_from_logp`. Under
        ``bf16`` autocast (on CUDA)."""
        with self._autocast():
            return self._policy_loss_forward(d, norm, kw)

    def _autocast(self):
        """``bf16`` or ``fp16`` autocast for a forward (on CUDA; nothing on the CPU)."""
        if fp16_on(self.config.fp16, self.device):
            return fp16_autocast(self.device)
        return autocast_context(self.device, self.config.bf16)

    def _share_kwargs(self, group: Optional[torch.Tensor], n_rows: int) -> dict:
        """``sequence_logprobs``' keywords for ``n_rows`` rows whose groups are ``group`` ``[B]``
        (None: each row its own): none for the padded forward; with ``ppo.prefix_sharing`` the
        groups' shared-prefix row; with ``ppo.padding_free`` alone that row of one-row groups,
        which is the padding-free row (each sequence its own causal block)."""
        p = self.config.ppo
        if not (p.prefix_sharing or p.padding_free):
            return {}
        from rlhf_fast.models.logprobs import row_groups

        groups = (row_groups(group) if p.prefix_sharing and group is not None
                  else torch.arange(n_rows, device=self.device)[:, None])
        return dict(prefix_sharing=True, prefix_groups=groups)

    def _critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       response_mask: torch.Tensor, group: Optional[torch.Tensor]) -> torch.Tensor:
        """The critic's V(s_t) ``[B, L]`` float32 (:func:`critic_values`) of rows whose groups are
        ``group`` ``[B]`` (None: each row its own); with ``ppo.prefix_sharing`` from the groups'
        shared-prefix row (:func:`rlhf_fast.models.shared_values.shared_critic_values`: the response
        tokens' values, 0 elsewhere; ``ppo.padding_free``: the padding-free row, :meth:`_share_kwargs`)
        unless the critic keeps its padded forward."""
        if not self._critic_shared:
            return critic_values(self.critic, input_ids, attention_mask)
        from rlhf_fast.models.shared_values import shared_critic_values

        groups = self._share_kwargs(group, input_ids.shape[0])["prefix_groups"]
        return shared_critic_values(self.critic, input_ids, attention_mask, response_mask, groups)

    def _shuffle_units(self, data: "RolloutTensors") -> Optional[List[int]]:
        """What the update's shuffle permutes: None, single rows (``ppo.padding_free`` too: any
        rows pack); with ``ppo.prefix_sharing`` the groups, as their row counts in the global row
        order (rank by rank; a group never spans ranks), so each mini- and micro-batch holds whole
        groups."""
        if not self.config.ppo.prefix_sharing or data.group is None:
            return None
        g = data.group
        starts = torch.ones_like(g, dtype=torch.bool)
        starts[1:] = g[1:] != g[:-1]
        first = starts.nonzero(as_tuple=True)[0]
        sizes = torch.diff(first, append=first.new_tensor([g.numel()])).tolist()
        if not self.ctx.distributed:
            return sizes
        return [n for part in self.ctx.all_gather_objects(sizes) for n in part]

    @staticmethod
    def _permutation(gen: torch.Generator, n_rows: int, units: Optional[List[int]]) -> torch.Tensor:
        """A seeded permutation ``[n_rows]`` of the global rows: of single rows (``units`` None), or
        of the consecutive runs of rows whose lengths ``units`` lists, each run's rows kept together
        in order."""
        if units is None:
            return torch.randperm(n_rows, generator=gen)
        sizes = torch.tensor(units, dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        order = torch.randperm(len(units), generator=gen)
        return torch.cat([torch.arange(int(starts[i]), int(starts[i] + sizes[i])) for i in order.tolist()])

    def _policy_loss_forward(self, d: "RolloutTensors", norm, kw: dict):
        from rlhf_fast.models.logprobs import _target_mask, policy_loss, sequence_logprobs

        p = self.config.ppo
        share = self._share_kwargs(d.group, d.input_ids.shape[0])
        if not (p.composed_loss or self.config.kl.use_bias_correction_kl or d.is_weight is not None):
            groups = {"prefix_groups": share["prefix_groups"]} if share else {}
            loss, st = policy_loss(self.policy, d.input_ids, d.attention_mask, d.response_mask, d.old_logp,
                                   d.advantages, ref_logp=d.ref_logp, normalizer=norm, **groups, **kw)
            return loss, self._clip_extremes(st, d, kw)
        from rlhf_fast.algorithms import policy_losses

        mask = _target_mask(d.attention_mask, d.response_mask)  # the loss tokens, as policy_loss takes them
        logp, entropy = sequence_logprobs(self.policy, d.input_ids, d.attention_mask, response_mask=mask,
                                          temperature=kw["temperature"], return_entropy=True, **share)
        extra = {k: v for k, v in kw.items() if k != "temperature"}
        return policy_losses.policy_loss_from_logp(
            logp, entropy, d.old_logp, d.advantages, mask, ref_logp=d.ref_logp, normalizer=norm,
            policy_loss=p.policy_loss, sapo_temperature_pos=p.sapo_temperature_pos,
            sapo_temperature_neg=p.sapo_temperature_neg, top_entropy_quantile=p.top_entropy_quantile,
            entropy_mask=d.entropy_mask if p.top_entropy_quantile < 1.0 else None,
            off_policy_mask_threshold=p.off_policy_mask_threshold,
            use_bias_correction_kl=self.config.kl.use_bias_correction_kl, is_weight=d.is_weight,
            vespo_k_pos=p.vespo_k_pos, vespo_lambda_pos=p.vespo_lambda_pos, vespo_k_neg=p.vespo_k_neg,
            vespo_lambda_neg=p.vespo_lambda_neg, clip_cov_ratio=p.clip_cov_ratio, clip_cov_lb=p.clip_cov_lb,
            clip_cov_ub=p.clip_cov_ub, kl_cov_ratio=p.kl_cov_ratio, ppo_kl_coef=p.ppo_kl_coef, kl_fn=ops.kl_penalty,
            **extra)

    @staticmethod
    def _clip_extremes(st: dict, d: "RolloutTensors", kw: dict) -> dict:
        """``st`` of the fused kernel's clip / luspo loss with TRL's ``clip_ratio/low_min`` /
        ``high_max`` (:func:`rlhf_fast.algorithms.policy_losses.clip_region_extremes` of its
        ``logp``), as the composed path's stats hold them."""
        from rlhf_fast.algorithms.policy_losses import clip_region_extremes
        from rlhf_fast.models.logprobs import _target_mask

        st["clip_low_min"], st["clip_high_max"] = clip_region_extremes(
            st["logp"], d.old_logp, d.advantages, _target_mask(d.attention_mask, d.response_mask),
            clip_low=kw["clip_low"], clip_high=kw["clip_high"], dual_clip=kw["dual_clip"],
            importance_sampling_level=kw["importance_sampling_level"])
        return st

    def _entropy_coef(self) -> float:
        """The entropy-bonus coefficient of the next optimizer step: ``ppo.entropy_coef``, or
        under ``ppo.use_adaptive_entropy`` the controller's, applied only while the entropy last
        measured is at or below ``ppo.entropy_target`` (TRL's gating)."""
        p = self.config.ppo
        if not p.use_adaptive_entropy:
            return p.entropy_coef
        return self.entropy_coef if self.last_entropy <= p.entropy_target else 0.0

    def _adapt_entropy(self, entropy: float) -> None:
        """One step of the adaptive entropy controller (Skywork-OR1, TRL's update) after an
        optimizer step whose mean entropy over the entropy-bonus tokens of every rank was
        ``entropy``: the coefficient rises by ``ppo.entropy_coef_delta`` (up to
        ``entropy_coef_max``) when that is ≤ ``ppo.entropy_target``, else falls (down to
        ``entropy_coef_min``)."""
        p = self.config.ppo
        if entropy <= p.entropy_target:
            self.entropy_coef = min(self.entropy_coef + p.entropy_coef_delta, p.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - p.entropy_coef_delta, p.entropy_coef_min)
        self.last_entropy = entropy

    def _aux_steps(self, rows: int, mb: int, steps: int):
        """The divisor of a micro-batch's MoE term of a mini-batch of ``steps`` micro-batches of
        ``mb`` rows, this rank holding ``rows`` of its rows (:meth:`RouterAux.term_steps`: the
        micro-batches holding rows on every rank over the world size). Collective."""
        return self.moe.term_steps(self.ctx, -(-rows // mb), steps)

    def _loss_kwargs(self, data: Optional["RolloutTensors"] = None) -> dict:
        """The loss's keywords for the mini-batch ``data``; with an entropy bonus on the
        high-entropy tokens under ``ppo.agg: token-mean``, ``entropy_normalizer``: their count over
        the whole mini-batch (every rank; collective), TRL's bonus being a mean over them."""
        cfg = self.config
        in_loss = cfg.kl.placement == "loss"
        kw = dict(kl_coef=self.kl_ctl.value if in_loss else 0.0, kl_kind=cfg.kl.loss_kind,
                  entropy_coef=self._entropy_coef(), temperature=cfg.rollout.temperature, clip_low=cfg.ppo.clip_low,
                  clip_high=cfg.ppo.clip_high, dual_clip=cfg.ppo.dual_clip, agg=cfg.ppo.agg,
                  importance_sampling_level=cfg.ppo.importance_sampling_level)
        if (data is not None and data.entropy_mask is not None and kw["entropy_coef"] != 0.0
                and cfg.ppo.top_entropy_quantile < 1.0 and cfg.ppo.agg == "token-mean"):
            kw["entropy_normalizer"] = self._global_normalizer(data.entropy_mask, "token-mean")
        return kw

    def policy_backward(self, data: RolloutTensors, micro_batch_size: Optional[int] = None,
                        n_micro: Optional[int] = None) -> Dict[str, float]:
        """Accumulate the policy gradient of the whole batch ``data`` (one mini-batch) over
        micro-batches of ``micro_batch_size`` rows; the normaliser (token or row count of the
        whole mini-batch) is computed once so the gradient does not depend on the split.
        ``n_micro``: run that many micro-batches (at least the ones ``data`` fills), the extra
        ones on a blank row that adds nothing — so every rank runs the same forwards and
        backwards, as FSDP2 needs, however many rows it holds (``data`` may be empty).
        Returns the loss and statistics, averaged over micro-batches by token count."""
        mb = micro_batch_size or self.config.ppo.micro_batch_size
        kw = self._loss_kwargs(data)
        norm = self._global_normalizer(data.response_mask, kw["agg"])
        ntok = data.response_mask.sum().clamp(min=1).float()
        per_answer = kw["importance_sampling_level"] in _ANSWER_LEVELS
        acc: Dict[str, float] = {}
        B = data.input_ids.shape[0]
        steps = max(-(-B // mb) if n_micro is None else max(n_micro, -(-B // mb)), 1)  # TRL's accumulation steps
        aux_steps = self._aux_steps(B, mb, steps)
        for d, real, more in _micro_batches(data, mb, n_micro):
            with self._no_sync(self.policy, more), self.moe.collect() as aux:
                loss, st = self._policy_loss(d, norm, kw)
                # DDP averages gradients over ranks; grad_scale turns that into the global sum;
                # TRL's MoE term (GRPO): coef × aux / the accumulation steps, left to DDP's average
                aux_val: List[float] = []
                loss_part = self.moe.with_term(loss * self.ctx.grad_scale, aux, aux_steps, aux_val, counts=real)
                self.scaler.scale(loss_part).backward()  # fp16: times the loss scale
            if self.moe.enabled:  # the mini-batch's mean aux loss (update() adds its term to the loss); the
                # key on every rank, a blank micro-batch's part 0, for the reduction of the statistics
                acc["aux_loss"] = acc.get("aux_loss", 0.0) + (aux_val[0] / steps if aux_val else 0.0)
            w = float(d.response_mask.sum()) / float(ntok)
            # the sequence levels' clip and ratio statistics are shares of answers: weighed by rows
            w_row = d.response_mask.shape[0] / max(data.response_mask.shape[0], 1) if per_answer else w
            acc["loss"] = acc.get("loss", 0.0) + float(loss.detach())
            # a blank row's statistics are of no token: it adds the keys (the same on every
            # rank, for the reduction of the statistics) but no value (ratios are > 0)
            for k in ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "kl", "entropy", "entropy_mask_frac",
                      "off_policy_mask_frac", "vespo_phi_mean", "clip_low_frac", "clip_high_frac", "cov_frac"):
                if k in st:
                    wk = w_row if k in _ANSWER_STATS else w
                    acc[k] = acc.get(k, 0.0) + (wk * float(st[k]) if real else 0.0)
            acc["ratio_max"] = max(acc.get("ratio_max", 0.0), float(st["ratio_max"]) if real else 0.0)
            for k in _MIN_STATS + _MAX_STATS:
                if k in st:  # a NaN (no answer with a loss token: TRL's nanmin skips it) is the neutral ±inf
                    lo = k in _MIN_STATS
                    v = float(st[k]) if real else math.nan
                    v = (math.inf if lo else -math.inf) if math.isnan(v) else v
                    acc[k] = (min if lo else max)(acc.get(k, v), v)
            if self.config.ppo.use_adaptive_entropy:
                # the entropy summed over the bonus's tokens and their count (the controller's
                # measure, made global by update())
                n = float(d.response_mask.sum()) * (float(st.get("entropy_mask_frac", 1.0)) if real else 0.0)
                acc["_entropy_sum"] = acc.get("_entropy_sum", 0.0) + n * float(st.get("entropy_kept", st["entropy"]))
                acc["_entropy_tokens"] = acc.get("_entropy_tokens", 0.0) + n
        return acc

    def _global_count(self, n: float) -> torch.Tensor:
        """``n`` (this rank's rows, pairs, ...) summed over the ranks, at least 1: a 0-dim tensor
        on the device, the denominator of a loss averaged over a whole mini-batch."""
        t = torch.tensor(float(n), device=self.device)
        if self.ctx.distributed:
            t = self.ctx.all_reduce_sum(t)
        return t.clamp(min=1)

    def _loss_backward(self, data: RolloutTensors, micro_batch_size: Optional[int], n_micro: Optional[int],
                       loss_fn, on_real) -> float:
        """The micro-batch loop of a subclass whose loss replaces the policy loss (online DPO,
        A*-PO): ``loss_fn(d) -> (loss, out)`` on each real micro-batch ``d`` (its loss already
        divided by the mini-batch's global count), then ``on_real(d, out)``; a blank micro-batch
        (``n_micro``: a rank with fewer rows) runs a zero loss through the same forward, so the
        ranks stay in step. Each loss times ``grad_scale`` (DDP's average → the global sum) and
        fp16's loss scale is back-propagated. Returns the losses' sum."""
        from rlhf_fast.models.logprobs import sequence_logprobs

        total = 0.0
        for d, real, more in _micro_batches(data, micro_batch_size or self.config.ppo.micro_batch_size, n_micro):
            with self._no_sync(self.policy, more):
                if real:
                    loss, out = loss_fn(d)
                else:
                    with self._autocast():
                        loss = sequence_logprobs(self.policy, d.input_ids, d.attention_mask,
                                                 response_mask=d.response_mask,
                                                 **self._share_kwargs(d.group, d.input_ids.shape[0])).sum() * 0.0
                self.scaler.scale(loss * self.ctx.grad_scale).backward()  # fp16: the loss scale (else as it is)
            total += float(loss.detach())
            if real:
                on_real(d, out)
        return total

    def critic_backward(self, data: RolloutTensors, micro_batch_size: Optional[int] = None,
                        n_micro: Optional[int] = None) -> Dict[str, float]:
        """Accumulate the clipped value-loss gradient of ``data`` over micro-batches
        (``n_micro`` as in :meth:`policy_backward`)."""
        mb = micro_batch_size or self.config.ppo.micro_batch_size
        agg = self.config.ppo.agg
        norm = self._global_normalizer(data.response_mask, agg)
        out = {"value_loss": 0.0, "value_clip_frac": 0.0}
        ntok = data.response_mask.sum().clamp(min=1).float()
        for d, real, more in _micro_batches(data, mb, n_micro):
            with self._no_sync(self.critic, more):
                with self._autocast():
                    v = self._critic_values(d.input_ids, d.attention_mask, d.response_mask, d.group).float()
                loss, st = ops.ppo_value_loss(v, d.values, d.returns, d.response_mask,
                                              clip=self.config.ppo.value_clip, agg=agg, normalizer=norm)
                self.critic_scaler.scale(self.config.ppo.value_coef * self.ctx.grad_scale * loss).backward()
            out["value_loss"] += float(loss.detach())
            if real:
                out["value_clip_frac"] += float(st["clip_frac"]) * float(d.response_mask.sum()) / float(ntok)
        return out

    @contextlib.contextmanager
    def _no_sync(self, model, skip: bool):
        """No gradient reduction for this micro-batch (``skip``; DDP ``no_sync``, FSDP2
        ``set_requires_gradient_sync(False)``): gradients accumulate locally and are reduced
        once per mini-batch, on its last micro-batch (:func:`rlhf_fast.distributed.no_gradient_sync`)."""
        if not (skip and self.ctx.distributed):
            yield
        else:
            from rlhf_fast.distributed import no_gradient_sync

            with no_gradient_sync(model):
                yield

    def _global_normalizer(self, mask: torch.Tensor, agg: str):
        """:func:`_token_normalizer` of every rank's rows together (one process: unchanged)."""
        budget = self.config.rollout.max_new_tokens
        if not self.ctx.distributed:
            return _token_normalizer(mask, agg, budget)
        if agg == "token-mean":  # clamped after the sum: a rank may hold no token
            return self.ctx.all_reduce_sum(mask.sum().to(torch.float32)).clamp(min=1)
        n = _token_normalizer(mask, agg, budget)
        return self.ctx.all_reduce_sum(torch.tensor(float(n), device=mask.device))

    def _row_mean_stats(self) -> frozenset:
        """Keys of :meth:`policy_backward`'s statistics that are means over the answers (rows)
        rather than over tokens, so :meth:`_global_stats` weights each rank's by its rows."""
        return frozenset()

    def _global_stats(self, st: Dict[str, float], mask: torch.Tensor) -> Dict[str, float]:
        """:meth:`policy_backward` statistics over every rank, as one process computes them:
        token-weighted means (row-weighted for the sequence levels' answer statistics), the loss parts
        summed, ratio_max the maximum, clip_low_min / clip_high_max the minimum / maximum."""
        keys = sorted(k for k in st if k not in ("loss", "ratio_max") + _MIN_STATS + _MAX_STATS)
        n = float(mask.sum())
        rows = float(mask.shape[0]) if self.config.ppo.importance_sampling_level in _ANSWER_LEVELS else n
        row_means = self._row_mean_stats()  # a subclass's per-answer means: weighted by answers
        slot = {k: 2 if k in _ANSWER_STATS else 3 if k in row_means else 1 for k in keys}
        weight = {1: n, 2: rows, 3: float(mask.shape[0])}
        w = [weight[slot[k]] for k in keys]
        vec = [st["loss"], n, rows, weight[3]] + [st[k] * wk if wk > 0 else 0.0 for k, wk in zip(keys, w)]
        vec = torch.tensor(vec, dtype=torch.float64, device=self.device)
        vec = self.ctx.all_reduce_sum(vec)
        den = {k: max(float(vec[slot[k]]), 1.0) for k in keys}
        out = {"loss": float(vec[0]), **{k: float(v) / den[k] for k, v in zip(keys, vec[4:])}}
        if "ratio_max" in st:
            out["ratio_max"] = float(self.ctx.all_reduce_max(torch.tensor(st["ratio_max"], dtype=torch.float64,
                                                                            device=self.device)))
        ext = [k for k in _MIN_STATS + _MAX_STATS if k in st]
        if ext:  # a min is the max of the negated values
            sign = torch.tensor([-1.0 if k in _MIN_STATS else 1.0 for k in ext], dtype=torch.float64,
                                device=self.device)
            v = sign * self.ctx.all_reduce_max(sign * torch.tensor([st[k] for k in ext], dtype=torch.float64,
                                                                   device=self.device))
            out.update(zip(ext, v.tolist()))
        return out

    def _minibatches(self, perm: torch.Tensor, counts: Sequence[int]) -> list:
        """``(rows, n_micro)`` of each mini-batch of one epoch. ``perm`` is a permutation of
        the global batch — rank r's rows numbered after those of ranks < r, ``counts[r]`` of
        them — the same on every rank; mini-batch j is ``perm[j·mbs:(j+1)·mbs]``, as one
        process takes it. ``rows``: this rank's (local) rows of it, possibly none;
        ``n_micro``: the most micro-batches any rank needs for its rows of it, so every rank
        runs the same number of forwards (None on one process)."""
        B, mbs = perm.shape[0], self.config.ppo.mini_batch_size
        if not self.ctx.distributed:
            return [(perm[s:s + mbs], None) for s in range(0, B, mbs)]
        mb, rank = self.config.ppo.micro_batch_size, self.ctx.rank
        ends = torch.tensor(counts, device=perm.device).cumsum(0)
        lo = int(ends[rank]) - counts[rank]
        out = []
        for s in range(0, B, mbs):
            glob = perm[s:s + mbs]
            owner = torch.bucketize(glob, ends, right=True)  # the rank holding each row
            per_rank = torch.bincount(owner, minlength=len(counts)).tolist()
            out.append((glob[owner == rank] - lo, max(1, max(-(-c // mb) for c in per_rank))))
        return out

    @torch.no_grad()
    def _surrogate(self, data: RolloutTensors, pre_logp: torch.Tensor, norm, n_micro: Optional[int] = None):
        """(loss, KL to the policy whose log-probs are ``pre_logp``) of the current parameters on
        ``data`` (no grad), over every rank's rows (``norm``: the global normaliser), so all ranks
        take the same line-search decisions. The KL is 0.5·(logp − pre_logp)² averaged over the
        response tokens, which were sampled from that policy: to second order KL(pre ‖ current).
        The loss is :meth:`_moe_surrogate_loss`'s, by ``ppo.micro_batch_size`` micro-batches as the
        update's backward (the whole mini-batch in one forward could run out of memory where they
        fit; ``n_micro`` as there), with the MoE term when it is on."""
        loss, logp = self._moe_surrogate_loss(data, norm, n_micro)
        d = logp - pre_logp
        if not self.ctx.distributed:
            return float(loss), float(ops.masked_mean(0.5 * d * d, data.response_mask))
        m = data.response_mask
        vec = torch.stack([loss.detach().double(), (0.5 * d * d * m).double().sum(), m.double().sum()])
        vec = self.ctx.all_reduce_sum(vec)
        return float(vec[0]), float(vec[1] / vec[2].clamp(min=1))

    @torch.no_grad()
    def _moe_surrogate_loss(self, data: RolloutTensors, norm, n_micro: Optional[int]) -> tuple:
        """(loss, logp ``[B, L]``) of ``data`` with ``ppo.router_aux_loss_coef``'s term as
        :meth:`policy_backward`'s gradient has it, so the line search judges the step by the
        objective that chose it: over the same micro-batches (``n_micro`` as there; blank ones
        add nothing), each one's policy loss plus coef × its aux loss / :meth:`_aux_steps`, that
        term divided by the world size (DDP averages it over ranks; the policy loss's grad_scale makes
        its part a sum, as the caller's all-reduce does)."""
        kw = self._loss_kwargs(data)
        mb = self.config.ppo.micro_batch_size
        B = data.input_ids.shape[0]
        steps = max(-(-B // mb) if n_micro is None else max(n_micro, -(-B // mb)), 1)  # policy_backward's
        aux_steps = self._aux_steps(B, mb, steps)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        logps = []
        for d, real, _ in _micro_batches(data, mb, n_micro):
            with self.moe.collect(evaluation=True) as col:  # no grad here: record the no-grad forward too
                loss, st = self._policy_loss(d, norm, kw)
            term, _ = self.moe.term(col if real else None, aux_steps)
            total += loss.double() + (0.0 if term is None else term.double() / self.ctx.world_size)
            if real:
                logps.append(st["logp"])
        logp = torch.cat(logps) if logps else data.old_logp.new_zeros(data.old_logp.shape)
        return total, logp

    def _trpo_step(self, data: RolloutTensors) -> Dict[str, float]:
        """Take the optimiser's proposed step, then backtrack along it (the step times
        ``trpo_backtrack_ratio``^k, k < ``trpo_backtrack_steps``) until the surrogate does not get
        worse and the KL to the rollout (old) policy — TRPO's constraint, KL(π_old ‖ π_θ) — is
        within ``ppo.trpo_max_kl``; if no such step is found the parameters stay where they were.

        The KL is measured on this mini-batch's response tokens against ``data.old_logp``: an
        accepted step ends within the bound of the rollout policy on these rows, whatever the
        earlier steps of the update did (steps do not add up past it there); rows of other
        mini-batches are not measured, so the whole batch's KL may exceed it. With the whole batch
        as one mini-batch and one epoch this is TRPO's trust region; the step direction is the
        optimiser's (not the natural gradient), and its state (Adam moments) has advanced even
        when the step is shrunk or refused."""
        from rlhf_fast.distributed import reshard

        cfg = self.config.ppo
        params = [p for p in self.policy.parameters() if p.requires_grad]
        norm = self._global_normalizer(data.response_mask, self.config.ppo.agg)
        n_micro = None
        if self.ctx.distributed:  # update()'s micro-batch count: as many surrogate forwards on every rank
            mb = cfg.micro_batch_size  # (FSDP2 gathers the weights in each; and the gradient's aux term)
            n_micro = max(1, max(-(-c[0] // mb) for c in self.ctx.all_gather_ints([data.input_ids.shape[0]])))
        # (a rank holding none of the mini-batch runs n_micro blank micro-batches)
        # the rollout policy's log-probs of the sampled tokens: the trust region's centre
        pre_logp = data.old_logp
        loss0, _ = self._surrogate(data, pre_logp, norm, n_micro)
        old = [p.detach().clone() for p in params]
        self.optimizer.step()
        delta = [p.detach() - o for p, o in zip(params, old)]
        frac, accepted = 1.0, False
        for _ in range(cfg.trpo_backtrack_steps):
            with torch.no_grad():
                for p, o, dl in zip(params, old, delta):
                    p.copy_(o + frac * dl)
            reshard(self.policy)  # FSDP2: the surrogate's forward gathers the new parameters
            loss, kl = self._surrogate(data, pre_logp, norm, n_micro)
            if kl <= cfg.trpo_max_kl and loss <= loss0:
                accepted = True
                break
            frac *= cfg.trpo_backtrack_ratio
        if not accepted:
            with torch.no_grad():
                for p, o in zip(params, old):
                    p.copy_(o)
            frac = 0.0
        reshard(self.policy)
        return {"trpo_step_frac": frac}

    def update(self, data: RolloutTensors) -> Dict[str, float]:
        """``ppo.epochs`` passes over ``data`` in shuffled mini-batches; returns mean statistics."""
        from rlhf_fast.trainers.sft import scalar_norm

        cfg = self.config.ppo
        # rows on every rank: the global batch one process would hold, numbered rank by rank
        counts = [c[0] for c in self.ctx.all_gather_ints([data.input_ids.shape[0]])]
        g = torch.Generator().manual_seed((self.config.seed * 7919 + self.global_step) % 2**63)
        units = self._shuffle_units(data)  # ppo.prefix_sharing: whole groups
        sums: Dict[str, float] = {}
        skipped: Dict[str, int] = {}  # the mini-batches whose min / max statistic had no answer
        n_updates, stopped, step_lr = 0, False, None
        for _ in range(cfg.epochs):
            perm = self._permutation(g, sum(counts), units).to(data.input_ids.device)
            for rows, n_micro in self._minibatches(perm, counts):
                mini = data.select(rows)
                self.optimizer.zero_grad(set_to_none=True)
                st = self.policy_backward(mini, n_micro=n_micro)
                ent = [st.pop("_entropy_sum", 0.0), st.pop("_entropy_tokens", 0.0)]
                if self.ctx.distributed:  # the same statistics on every rank, so early stopping agrees
                    st = self._global_stats(st, mini.response_mask)
                if "aux_loss" in st:  # TRL's loss holds the MoE term
                    st["loss"] += self.moe.coef * st["aux_loss"]
                    if cfg.use_adaptive_entropy:
                        ent = self.ctx.all_reduce_sum(torch.tensor(ent, dtype=torch.float64,
                                                                   device=self.device)).tolist()
                if cfg.max_grad_norm is not None:
                    # (fp16: of the unscaled gradient; inf / nan on an overflow)
                    gnorm = self.scaler.clip_grad_norm_(self.optimizer, self.policy.parameters(), cfg.max_grad_norm)
                    st["grad_norm"] = scalar_norm(gnorm)
                stepped = True
                step_lr = self.optimizer.param_groups[0]["lr"]  # the LR this step trains with: logged
                if cfg.trpo:  # (not with fp16)
                    st.update(self._trpo_step(mini))
                else:
                    stepped = self.scaler.step(self.optimizer)
                if stepped:  # fp16: an overflowed step moves neither the weights nor the LR (transformers)
                    self.scheduler.step()
                if cfg.use_adaptive_entropy:  # the next step's coefficient, from this step's entropy
                    self._adapt_entropy(ent[0] / max(ent[1], 1.0))
                    st["entropy_coef"] = self.entropy_coef
                if self.critic is not None:
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    cst = self.critic_backward(mini, n_micro=n_micro)
                    if self.ctx.distributed:
                        gs = self._global_stats({"loss": cst["value_loss"], "value_clip_frac": cst["value_clip_frac"]},
                                                mini.response_mask)
                        cst = {"value_loss": gs["loss"], "value_clip_frac": gs["value_clip_frac"]}
                    st.update(cst)
                    if cfg.max_grad_norm is not None:
                        self.critic_scaler.clip_grad_norm_(self.critic_optimizer, self.critic.parameters(),
                                                           cfg.max_grad_norm)
                    if self.critic_scaler.step(self.critic_optimizer):
                        self.critic_scheduler.step()
                for k, v in st.items():
                    if k in _MIN_STATS + _MAX_STATS and not math.isfinite(v):  # TRL's NaN: out of the mean
                        v, skipped[k] = 0.0, skipped.get(k, 0) + 1
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
                if cfg.target_kl is not None and st["approx_kl"] > 1.5 * cfg.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        out = {f"policy/{k}" if not k.startswith("value") else k.replace("value_", "value/"):
               v / (n_updates - skipped.get(k, 0)) if n_updates > skipped.get(k, 0) else math.nan
               for k, v in sums.items()}
        if self.reference is None:  # a KL to no reference is no metric
            out.pop("policy/kl", None)
        out["policy/updates"] = n_updates
        out["policy/early_stopped"] = int(stopped)
        # the last optimizer step's LR, before its scheduler step (transformers 5's learning_rate)
        out["lr"] = step_lr if step_lr is not None else self.scheduler.get_last_lr()[0]
        out.update(self.scaler.metrics("policy/loss_scale"))  # fp16 only
        if self.critic is not None:
            out.update(self.critic_scaler.metrics("value/loss_scale"))
        if hasattr(self.engine, "update_weights"):
            from rlhf_fast.distributed import unwrap

            self.engine.update_weights(unwrap(self.policy))  # engines holding a weight copy resync here
        return out

    def step(self) -> Dict[str, float]:
        """One rollout + update. Returns the step's metrics (also logged when a run folder is open)."""
        compile_rl_models(self)  # (a no-op without torch_compile, and once every model is compiled)
        clock = self.phase_clock
        t0 = clock.now()
        data, m = self.rollout()
        t1 = clock.now()
        m.update(self.update(data))
        m["time/update"] = clock.now() - t1
        m = self.ctx.mean_metrics(m)  # every rank then updates β with the same numbers
        # Ziegler et al. update β with the measured sequence KL, counted in samples: the kept rows
        # with a response on every rank (ranks may drop different numbers), masked-out truncated
        # answers included (their KL is in kl/seq)
        n = torch.tensor(float(self._sampled_rows), device=self.device)
        if self.ctx.distributed:
            n = self.ctx.all_reduce_sum(n)
        if "kl/seq" in m:  # (no reference: a fixed β of 0, nothing to update)
            self.kl_ctl.update(m["kl/seq"], int(n.item()))
        self.global_step += 1
        every = self.config.kl.ref_sync_steps
        if every and self.global_step % every == 0:
            self._sync_reference()
        m["time/step"] = clock.now() - t0
        evaluated = self._eval_due()
        if evaluated:  # after the step's update: the policy as trained so far
            t2 = clock.now()
            m.update(self.evaluate())
            m["time/eval"] = clock.now() - t2
        # log_every (TRL's logging_steps) as the offline trainers: those steps, the last one, the
        # ones with an evaluation and those of a checkpoint (a resume then logs as the uninterrupted run)
        save_every = self.config.save_every
        logged = (self.global_step % self.config.log_every == 0 or self.global_step == self.config.steps
                  or evaluated or bool(save_every and self.global_step % save_every == 0))
        if self._logger is not None:  # log_every > 1: the steps since the last log averaged, as TRL
            self._log_window.add(m)
            if logged:
                self._logger.log(self.global_step, self._log_window.pop())
        self._write_samples()  # (every rank: its rows are gathered; rank 0 writes)
        return m

    @torch.no_grad()
    def _sync_reference(self) -> None:
        """reference ← α·policy + (1 − α)·reference (``kl.ref_sync_alpha``), parameter by
        parameter: on each rank's shards when FSDP2 shards both alike, from the gathered
        parameter when only the policy is sharded (an offloaded reference), on the reference's
        device and dtype."""
        from rlhf_fast.distributed import unwrap

        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch build without torch.distributed: nothing is sharded
            DTensor = ()
        a = float(self.config.kl.ref_sync_alpha)
        for r, p in zip(unwrap(self.reference).parameters(), unwrap(self.policy).parameters()):
            if isinstance(r, DTensor) and isinstance(p, DTensor):
                r, src = r.to_local(), p.to_local()
            else:
                src = p.full_tensor() if isinstance(p, DTensor) else p
            r.mul_(1.0 - a).add_(src.to(device=r.device, dtype=r.dtype), alpha=a)

    # ------------------------------------------------------------------ run folder

    def _write_samples(self) -> None:
        every = self.config.sample_every
        if not every or self.global_step % every != 0 or self.run_dir is None:
            return
        rows = self._sample_rows()  # (every rank: the rows are gathered)
        if not self.ctx.is_main:
            return
        with open(os.path.join(self.run_dir.path, "samples.jsonl"), "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
        self._logger.log_table(self.global_step, "completions", rows)  # TRL's completions table
        if self.config.num_completions_to_print:
            print_samples(rows[: self.config.num_completions_to_print], self.global_step)

    def _sample_rows(self) -> List[Dict[str, Any]]:
        """The rows samples.jsonl gets this step: the answers of the first two prompts, or with
        ``log_unique_prompts`` the first answer of each prompt (TRL's unique-prompt table), of
        the whole step: under torchrun every rank's rows are gathered, in the global row order
        (a collective: every rank calls it), so the rows are those one process writes."""
        columns = getattr(self, "_last_columns", ())
        unique, first = self.config.log_unique_prompts, 2 * self.config.rollout.group_size
        rows = [{"step": self.global_step, "prompt": p, "completion": c, "reward": r,
                 **(columns[k] if k < len(columns) else {})}
                for k, (p, c, r) in enumerate(self._last_texts if unique else self._last_texts[:first])]
        if self.ctx.distributed:
            rows = [row for part in self.ctx.all_gather_objects(rows) for row in part]
        picked, seen = [], set()
        for k, row in enumerate(rows):
            if unique:
                key = json.dumps(row["prompt"], sort_keys=True, default=str)  # chat prompts are lists of messages
                if key in seen:
                    continue
                seen.add(key)
            elif k >= first:
                break
            picked.append(row)
        return picked

    def state_dict_extra(self) -> dict:
        """JSON state that checkpoints carry besides weights/optimisers/RNG."""
        out = {"step": self.global_step, "prompt_pos": self.prompt_pos, "kl_ctl": self.kl_ctl.state_dict(),
               "reward_moments": self.reward_moments.state_dict(), "dropped_total": self.dropped_total}
        if self.scaler.enabled:  # fp16's loss scales (transformers' scaler.pt)
            out["scaler"] = {"policy": self.scaler.state_dict(), "critic": self.critic_scaler.state_dict()}
        if self.config.ppo.use_adaptive_entropy:  # (inf, before any measurement, is no JSON number)
            out["entropy_ctl"] = {"coef": self.entropy_coef,
                                  "last_entropy": None if self.last_entropy == float("inf") else self.last_entropy}
        window = getattr(self, "_log_window", None)
        if self._logger is not None and window is not None and window.state():
            from rlhf_fast.trainers.common import LOG_WINDOW_KEY

            out[LOG_WINDOW_KEY] = window.state()  # a stop inside a log window: its steps so far
        return out

    def _ckpt_parts(self):
        from rlhf_fast.distributed import unwrap

        models = {"policy": unwrap(self.policy)}
        opts = {"policy": self.optimizer}
        scheds = {"policy": self.scheduler}
        if self.critic is not None:
            models["critic"] = _StateDictOnly(unwrap(self.critic))
            opts["critic"], scheds["critic"] = self.critic_optimizer, self.critic_scheduler
        if self.config.kl.ref_sync_steps:  # no longer the initial policy: its weights are state
            models["reference"] = _StateDictOnly(unwrap(self.reference))
        return models, opts, scheds

    def save(self) -> str:
        """Write an atomic checkpoint of everything needed to continue; returns its folder."""
        from rlhf_fast.trainers.checkpoint import checkpoint_dir, prune_checkpoints, save_checkpoint
        from rlhf_fast.trainers.merging import merge_policy_into  # TRL's MergeModelCallback.on_save (a product)

        if self.config.distributed.strategy != "none":
            return merge_policy_into(self, self._save_sharded(checkpoint_dir(self.run_dir.path, self.global_step)),
                                     checkpoint=True)
        models, opts, scheds = self._ckpt_parts()
        path = save_checkpoint(checkpoint_dir(self.run_dir.path, self.global_step), models=models, optimizers=opts,
                               schedulers=scheds, extra=self.state_dict_extra())
        prune_checkpoints(self.run_dir.path, self.config.keep_checkpoints)
        return merge_policy_into(self, path, checkpoint=True)

    def _sharded_parts(self):
        parts = [("policy", self.policy, self.optimizer, self.scheduler)]
        if self.critic is not None:
            parts.append(("critic", self.critic, self.critic_optimizer, self.critic_scheduler))
        if self.config.kl.ref_sync_steps:
            parts.append(("reference", self.reference, None, None))
        return parts

    def _save_sharded(self, path: str) -> str:
        """Every rank writes its shard of each model/optimiser (torch.distributed.checkpoint);
        rank 0 adds extra.json and COMPLETE last. Loadable on any number of ranks."""
        from rlhf_fast.distributed import save_sharded
        from rlhf_fast.trainers.checkpoint import prune_checkpoints

        for name, model, opt, sched in self._sharded_parts():
            save_sharded(os.path.join(path, name), model, opt, self.ctx,
                         extra={"scheduler": sched.state_dict() if sched is not None else None})
        if self.ctx.is_main:
            with open(os.path.join(path, "extra.json"), "w", encoding="utf-8") as f:
                json.dump(self.state_dict_extra(), f)
            with open(os.path.join(path, "COMPLETE"), "w") as f:
                f.write("ok\n")
            prune_checkpoints(self.run_dir.path, self.config.keep_checkpoints)
        self.ctx.barrier()
        return path

    def load(self, run_dir: str) -> int:
        """Restore the latest checkpoint of ``run_dir``; returns its step. Metrics logged after
        that checkpoint are discarded so the log continues as if never stopped."""
        from rlhf_fast.trainers.checkpoint import (checkpoint_step, keeping_hyperparameters, latest_checkpoint,
                                                   load_checkpoint, restoring_extra)

        ck = latest_checkpoint(run_dir)
        if ck is None:
            raise FileNotFoundError(f"resume: no complete checkpoint under {os.path.join(run_dir, 'checkpoints')}")
        if self.config.kl.ref_sync_steps and not any(
                os.path.isdir(os.path.join(ck, *sub)) for sub in (("reference",), ("models", "reference"))):
            raise ValueError(f"resume: {ck} has no reference weights (kl.ref_sync_steps was off when it was "
                             "written); resume with kl.ref_sync_steps 0")
        _, opts, scheds = self._ckpt_parts()
        # the optimisers keep the settings of this run's config (a resume may change optim.lr)
        with keeping_hyperparameters(list(opts.values()), list(scheds.values())):
            if os.path.isfile(os.path.join(ck, "policy", ".metadata")):  # sharded: any number of ranks
                from rlhf_fast.distributed import load_sharded

                for name, model, opt, sched in self._sharded_parts():
                    # (each part holds the same RNG states: restored once)
                    state = load_sharded(os.path.join(ck, name), model, opt, self.ctx,
                                         init_key="model.model_init_kwargs", restore_rng=name == "policy")
                    if sched is not None:
                        sched.load_state_dict(state["scheduler"])
                with restoring_extra(ck), open(os.path.join(ck, "extra.json"), encoding="utf-8") as f:
                    extra = json.load(f)
            else:
                models, opts, scheds = self._ckpt_parts()
                extra = load_checkpoint(ck, models=models, optimizers=opts, schedulers=scheds,
                                        init_key="model.model_init_kwargs")
        step = checkpoint_step(ck, extra, ("step", "prompt_pos", "kl_ctl", "reward_moments"))
        with restoring_extra(ck):
            self.prompt_pos = int(extra["prompt_pos"])
            self.kl_ctl.resume_from(extra["kl_ctl"])  # (a fixed kl.coef, target, horizon: the config's)
            self.reward_moments.load_state_dict(extra["reward_moments"])
            self.dropped_total = int(extra.get("dropped_total", 0))
            ent = extra.get("entropy_ctl")
            if self.config.ppo.use_adaptive_entropy and ent is not None:  # (absent: the run had it off)
                self.entropy_coef = float(ent["coef"])
                self.last_entropy = float("inf") if ent["last_entropy"] is None else float(ent["last_entropy"])
        scalers = extra.get("scaler") or {}  # fp16's loss scales
        self.scaler.load_state_dict(scalers.get("policy"), f"checkpoint {ck}")
        if self.critic is not None:
            self.critic_scaler.load_state_dict(scalers.get("critic"), f"checkpoint {ck} (critic)")
        self.global_step = step
        # a stop inside a log window logged its steps so far at its step: that record goes, and its
        # steps go back into the window (train()), which the next log averages as the uninterrupted run
        from rlhf_fast.trainers.common import LOG_WINDOW_KEY

        self._resumed_window = extra.get(LOG_WINDOW_KEY) or []
        for name in ("metrics.jsonl", "samples.jsonl"):
            p = os.path.join(run_dir, name)
            if os.path.exists(p) and self.ctx.is_main:
                from rlhf_fast.trainers.common import log_records_up_to
                from rlhf_fast.trainers.config import atomic_write_text

                upto = self.global_step - (bool(self._resumed_window) and name == "metrics.jsonl")
                atomic_write_text(p, "".join(log_records_up_to(p, upto)))
        self.ctx.barrier()
        return self.global_step

    def _check_run_kind(self, path: str, option: str) -> None:
        """Refuse the folder ``path`` (config key ``option``) when it holds a run of another kind
        than this config's — another trainer's, or another RL command's
        (:func:`~rlhf_fast.trainers.config.saved_run_kind`) — or one whose estimator differs from
        this one in having a critic (gae; reinforce++ of the same ``ppo`` family has none): its
        checkpoints hold other models and state, and its config.yaml, log and checkpoints would be
        overwritten by those of this run. ValueError naming ``option``, the folder and both kinds,
        before anything in it is touched; a folder without a config.yaml rlhf-fast can read, or
        one holding no log, checkpoint or final model, has nothing to compare."""
        from rlhf_fast.trainers.common import held_run_kind
        from rlhf_fast.trainers.report import read_config, run_kind

        theirs = held_run_kind(path)
        if theirs is None:
            return
        their_est = read_config(path).get("estimator")
        ours = run_kind({"estimator": self.config.estimator, "rollout": {}})
        critic = {e: "with a critic" if e in CRITIC_ESTIMATORS else "without a critic"
                  for e in (their_est, self.config.estimator)}
        if theirs == ours and critic[their_est] == critic[self.config.estimator]:
            return
        held = f"rlhf-fast {theirs}" + (f" (estimator {their_est}, {critic[their_est]})" if their_est else "")
        how = (f"continue it with estimator {their_est} (rlhf-fast {theirs}), or start this run in another "
               "output_dir" if option == "resume" and their_est
               else f"choose another {option}, or remove that folder first")
        raise ValueError(f"{option} {path} holds a run of {held}, not of rlhf-fast {ours} (estimator "
                         f"{self.config.estimator}, {critic[self.config.estimator]}): {how}")

    def _restarts(self, path: str) -> bool:
        """Whether resuming the run folder ``path`` starts its run again from step 0, as the
        offline trainers do (:func:`~rlhf_fast.trainers.common.open_supervised_run`): the run
        (its config.yaml) was stopped before its first checkpoint (``save_every`` 0 saves only at
        the end), so its log and samples are dropped. FileNotFoundError for a folder that holds
        no run; ValueError for one holding a final model but no checkpoint."""
        from rlhf_fast.trainers.checkpoint import latest_checkpoint
        from rlhf_fast.trainers.common import check_fresh_run_dir

        if not restarts_from_step_zero(path):
            if latest_checkpoint(path) is not None:
                return False
            raise FileNotFoundError(f"resume: no complete checkpoint under "
                                    f"{os.path.join(path, 'checkpoints')} and no run (config.yaml) in {path}")
        check_fresh_run_dir(path, option="resume", resume_hint=None, include_log=False)
        if self.ctx.is_main:
            import sys

            for name in ("metrics.jsonl", "samples.jsonl"):
                if os.path.exists(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
            print(f"resume {path}: no checkpoint yet (the run stopped before its first); starting it again "
                  "from step 0", file=sys.stderr)
        self.ctx.barrier()
        return True

    def train(self, steps: Optional[int] = None) -> List[Dict[str, float]]:
        """Run until ``config.steps`` (or ``steps`` more steps) in the run folder
        ``config.output_dir`` (or ``config.resume`` to continue it). Returns the metrics of the
        steps run here. Saves a checkpoint every ``save_every`` steps and at the end, and the
        final policy (and critic) under ``RUN_DIR/final``."""
        from rlhf_fast.trainers.common import LogWindow, MetricsLogger, RunDir, check_fresh_run_dir
        from rlhf_fast.trainers.stop import StopOnSignal, TrainingStopped
        from rlhf_fast.trainers.config import save_config

        cfg = self.config
        out_dir = cfg.resume or cfg.output_dir
        if self.run_dir is None:  # (a later train() call continues this trainer's run)
            self._check_run_kind(out_dir, "resume" if cfg.resume else "output_dir")
        if self.run_dir is None and not cfg.resume:  # a new run
            check_fresh_run_dir(out_dir, resume_hint=f"resume: {out_dir}, or --resume {out_dir}")
        restart = bool(cfg.resume) and self.run_dir is None and self._restarts(cfg.resume)
        self.run_dir = RunDir(out_dir)
        if cfg.resume and not restart:
            self.load(cfg.resume)  # before config.yaml is rewritten: a failed resume leaves the run as it was
            if cfg.steps < self.global_step:
                # training on would do nothing, and config.yaml would then record a run shorter than its log
                raise ValueError(f"steps ({cfg.steps}) is below step {self.global_step}, which the run in {cfg.resume} "
                                 f"has reached; a resumed run can only train further (steps >= {self.global_step})")
        if self.ctx.is_main:  # the resolved config, as this (possibly resumed, with new overrides) run uses it
            # output_dir: where the run really is (a resumed run stays in its own folder)
            save_config(replace(cfg, resume=None, output_dir=out_dir), os.path.join(self.run_dir.path, "config.yaml"))
        end = cfg.steps if steps is None else min(cfg.steps, self.global_step + steps)
        resumed, self._resumed_window = getattr(self, "_resumed_window", []), []
        self._logger = (MetricsLogger.for_config(self.run_dir.path, cfg, resume_step=self.global_step,
                                                 relogged=bool(resumed)) if self.ctx.is_main else None)
        self._log_window = LogWindow()
        self._log_window.load(resumed)  # (the steps of a stop's window, from its checkpoint)
        history = []
        bar = None
        if cfg.progress and self.ctx.is_main:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, initial=self.global_step, desc=f"{cfg.estimator}", dynamic_ncols=True)
            except ImportError:
                bar = None
        try:
            with StopOnSignal() as stop:
                while self.global_step < end:
                    m = self.step()
                    history.append(m)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(**self._progress_postfix(m))
                    # a stop signal ends the run at this step with a checkpoint
                    signum = stop.requested(self.ctx) if self.global_step < end else 0
                    if (cfg.save_every and self.global_step % cfg.save_every == 0) or signum:
                        self.save()
                    if signum:
                        raise TrainingStopped(signum, self.global_step, self.run_dir.path,
                                              f"--resume {self.run_dir.path}")
                # (a signal from here on lets the run end as it would have)
                if not cfg.save_every or self.global_step % cfg.save_every != 0:
                    self.save()
                if self.global_step >= cfg.steps:
                    self.save_final()
        finally:
            if bar is not None:
                bar.close()
            if self._logger is not None:
                pending = self._log_window.pop()  # the steps up to a stop's or this call's checkpoint
                if pending:
                    self._logger.log(self.global_step, pending)
                self._logger.close()
            self._logger = None
        return history

    def _progress_postfix(self, m: Dict[str, float]) -> Dict[str, str]:
        """What the progress bar shows of a step's metrics ``m``."""
        return {"reward": f"{m['reward/total']:.3f}", "kl": f"{m.get('kl/seq', float('nan')):.3f}"}

    def save_final(self) -> str:
        """save_pretrained of the policy, tokenizer (and critic) under ``RUN_DIR/final``, written
        beside it and renamed into place by rank 0
        (:func:`~rlhf_fast.trainers.checkpoint.staged_folder`: a failed save leaves no torn model)."""
        from rlhf_fast.distributed import full_state_dict, unwrap
        from rlhf_fast.trainers.checkpoint import staged_folder

        path = os.path.join(self.run_dir.path, "final")
        # FSDP2: every rank helps gather the full weights (None otherwise)
        strategy = self.config.distributed.strategy
        policy_sd = full_state_dict(self.policy, self.ctx, strategy)
        critic_sd = full_state_dict(self.critic, self.ctx, strategy) if self.critic is not None else None
        if self.ctx.is_main:  # DDP: every rank holds the same full weights
            with staged_folder(path) as tmp:
                from rlhf_fast.models.loading import peft_save_kwargs

                kw = {"state_dict": policy_sd} if policy_sd is not None else {}
                kw.update(peft_save_kwargs(unwrap(self.policy)))  # (not a LoRA reference's adapter copy)
                unwrap(self.policy).save_pretrained(os.path.join(tmp, "policy"), **kw)
                if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(os.path.join(tmp, "policy"))
                critic = unwrap(self.critic) if self.critic is not None else None
                if critic is not None and hasattr(critic, "save_pretrained"):
                    _save_critic(critic, os.path.join(tmp, "critic"), critic_sd)
        self.ctx.barrier()
        from rlhf_fast.trainers.merging import merge_policy_into

        return merge_policy_into(self, path, checkpoint=False)  # final/merged: TRL's on_train_end


class PPOTrainer(RLTrainer):
    """PPO with a critic and GAE: :class:`RLTrainer` with ``estimator="gae"``."""

    def __init__(self, config: RLConfig, *args, **kwargs):
        super().__init__(replace(config, estimator="gae"), *args, **kwargs)


class GRPOTrainer(RLTrainer):
    """GRPO: :class:`RLTrainer` with ``estimator="grpo"`` (``dr_grpo=True`` for Dr.GRPO)."""

    def __init__(self, config: RLConfig, *args, dr_grpo: bool = False, **kwargs):
        super().__init__(replace(config, estimator="dr_grpo" if dr_grpo else "grpo"), *args, **kwargs)


class RLOOTrainer(RLTrainer):
    """RLOO: :class:`RLTrainer` with ``estimator="rloo"``."""

    def __init__(self, config: RLConfig, *args, **kwargs):
        super().__init__(replace(config, estimator="rloo"), *args, **kwargs)


__all__ = ["RLTrainer", "PPOTrainer", "GRPOTrainer", "RLOOTrainer", "RolloutTensors", "build_tiny_policy",
           "load_prompts", "load_prompt_records", "prompt_record", "read_prompt_records", "critic_values",
           "missing_eos_scores"]
